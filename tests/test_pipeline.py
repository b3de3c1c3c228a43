"""The demo's steps: quiet by default (output to a log per step), loud with verbose, a failing step shows its log."""
import os
import subprocess
import sys

import pytest

from entrust_nnunet.pipeline import LOG_TAIL_LINES, step_output


def test_step_output_goes_to_the_log_also_from_child_processes(tmp_path, capfd):
    log = tmp_path / "logs" / "step.log"
    with step_output(log):
        print("from python")
        os.write(1, b"from fd 1\n")
        subprocess.run([sys.executable, "-c", "import sys; print('from a child'); print('child err', file=sys.stderr)"])
    print("after the step")
    out, err = capfd.readouterr()
    text = log.read_text()
    assert "from python" in text and "from fd 1" in text and "from a child" in text and "child err" in text
    assert "from" not in out + err and "after the step" in out


def test_verbose_keeps_output_on_the_terminal(tmp_path, capfd):
    log = tmp_path / "step.log"
    with step_output(log, verbose=True):
        print("visible")
    assert "visible" in capfd.readouterr().out and not log.exists()


def test_failing_step_prints_the_tail_of_its_log(tmp_path, capfd):
    log = tmp_path / "step.log"
    with pytest.raises(RuntimeError, match="boom"):
        with step_output(log):
            for i in range(40):
                print(f"line {i}")
            raise RuntimeError("boom")
    err = capfd.readouterr().err
    assert str(log) in err and f"line {39}" in err and f"line {39 - LOG_TAIL_LINES}\n" not in err
    assert "line 39" in log.read_text()


def test_fresh_deletes_only_a_demo_working_folder(tmp_path):
    """--fresh on a folder holding anything the demo did not write (a mistyped --dataset-dir, the home folder) is
    refused with one line and deletes nothing; the demo's own folder (its roots, outputs, a killed run's
    temporaries) is deleted."""
    from entrust_nnunet.data.io import InputError
    from entrust_nnunet.pipeline import DEMO_ENTRIES, remove_demo_folder, run_demo

    mine = tmp_path / "mine"
    (mine / "nnUNet_raw").mkdir(parents=True)
    (mine / "thesis.tex").write_text("keep")
    with pytest.raises(InputError, match="thesis.tex.*--fresh deletes only") as e:
        run_demo(mine, fresh=True)
    assert len(str(e.value).splitlines()) == 1 and (mine / "thesis.tex").read_text() == "keep"
    demo = tmp_path / "demo"
    for name in DEMO_ENTRIES:
        (demo / name).mkdir(parents=True)
    (demo / ".tmp-999999999-0123abcd-summary.json").write_text("{")
    remove_demo_folder(demo)
    assert not demo.exists()


def test_entrust_plans_preprocess_the_configurations_they_do_not_share(monkeypatch, tmp_path):
    """EnTrustPlanner shares nnUNetPlans' 2d/3d_fullres data (one preprocessing), but its 3d_lowres has a spacing
    of its own (the network's memory estimate): that one is preprocessed for nnUNetEnTrustPlans too."""
    import nnunetv2.experiment_planning.plan_and_preprocess_api as api

    from entrust_nnunet import pipeline
    from entrust_nnunet.nnunet import annotators

    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        monkeypatch.setenv(var, str(tmp_path / var))
    calls = []
    monkeypatch.setattr(pipeline, "check_labels", lambda d: None)
    monkeypatch.setattr(api, "extract_fingerprints", lambda *a, **k: None)
    names = {"EnTrustPlanner": "nnUNetEnTrustPlans", "ExperimentPlanner": "nnUNetPlans"}
    monkeypatch.setattr(api, "plan_experiment_dataset", lambda d, cls: (None, names[cls.__name__]))
    monkeypatch.setattr(api, "preprocess", lambda ids, ident, configurations, num_processes: calls.append(
        ("preprocess", ident, tuple(configurations))))
    monkeypatch.setattr(annotators, "preprocess_annotators", lambda d, ident, configurations, n: calls.append(
        ("annotators", ident, tuple(configurations))))
    pipeline.plan_and_preprocess([5], configurations=("2d", "3d_fullres", "3d_lowres"))
    assert calls == [("preprocess", "nnUNetPlans", ("2d", "3d_fullres", "3d_lowres")),
                     ("annotators", "nnUNetPlans", ("2d", "3d_fullres", "3d_lowres")),
                     ("preprocess", "nnUNetEnTrustPlans", ("3d_lowres",)),
                     ("annotators", "nnUNetEnTrustPlans", ("3d_lowres",))]
    calls.clear()
    pipeline.plan_and_preprocess([5], configurations=("2d",))
    assert [c[1] for c in calls] == ["nnUNetPlans", "nnUNetPlans"]  # 2d alone: EnTrust's plans share it
