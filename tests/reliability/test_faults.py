"""Fault injection: every row of ``faults.FAULTS``, built from copies of the session's phantoms and model.

For each row: the exit status, the one line the user sees (naming the file), no temporary, partial
or lock file left anywhere under the test's folders, and inputs byte-identical afterwards.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import SESSION_DATASET_ID, nnunet_bin
from entrust_nnunet import cli
from entrust_nnunet.data.io import MAP_NAMES, write_image
from faults import FAULTS, README, line_pattern, readme_text

TRAINER = "nnUNetTrainerEnTrust_tinyCPU"
FAST = ["-f", "2", "--num-samples", "2", "--disable_tta", "-npp", "1", "-nps", "1"]
#: the export pool too (elsewhere the suite exports inline: conftest's nnUNet_nps)
POOLS = [*FAST[:-1], "2"]
LEFTOVERS = (".tmp-*", ".trash-*", ".entrust-predict.lock")
NOBODY = 65534
N_MANY = 12
#: inputs of the scenarios interrupted by a signal: enough cases that the prediction is still running when the
#: first mask appears (with 12, a quiet machine had predicted them all before the signal arrived)
N_LONG = 48


@dataclass
class Run:
    argv: list[str]
    places: dict[str, Path]
    inputs: list[Path]  # hashed before and after: must stay byte-identical
    how: str = "here"  # "here": cli.main in this process; "nobody": the same as another user; "custom": ``action``
    action: Callable[[], tuple[int, str, str]] | None = None
    absent: list[Path] = field(default_factory=list)  # must not exist afterwards (nothing partial)
    check: Callable[[], None] | None = None
    scan: list[Path] = field(default_factory=list)  # further folders to search for leftovers
    scratch: list[Path] = field(default_factory=list)  # folders outside tmp_path: made writable and removed after


@dataclass
class Ctx:
    env: dict
    raw: Path
    model: Path  # the session's trained model
    lean: Path  # a copy holding only what prediction reads
    many: Path  # N_MANY input cases
    long: Path  # N_LONG input cases, long enough a prediction to interrupt it
    scratch: pytest.TempPathFactory


@pytest.fixture(scope="module")
def ctx(trained_entrust, tmp_path_factory):
    env, name, model = trained_entrust
    raw = Path(env["nnUNet_raw"]) / name
    lean = tmp_path_factory.mktemp("lean") / "model"
    (lean / "fold_2").mkdir(parents=True)
    for f in ("dataset.json", "plans.json", "fold_2/checkpoint_final.pth"):
        shutil.copy(model / f, lean / f)
    many, long = (_cases(raw, tmp_path_factory.mktemp(name) / "in", n) for name, n in (("many", N_MANY), ("long", N_LONG)))
    return Ctx({**env, "nnUNet_def_n_proc": "2", "nnUNet_n_proc_DA": "2"}, raw, model, lean, many, long,
               tmp_path_factory)


def _cases(raw: Path, folder: Path, n: int) -> Path:
    """``n`` input cases (copies of the two test phantoms) in ``folder``."""
    folder.mkdir()
    for i in range(n):
        for c in range(3):
            shutil.copy(raw / "imagesTs" / f"test_{i % 2:03d}_{c:04d}.nii.gz", folder / f"c{i:02d}_{c:04d}.nii.gz")
    return folder


# ------------------------------------------------------------------------------------------- helpers
def tree_hash(path: Path) -> dict[str, str]:
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def edit_image(path: Path, change) -> None:
    image = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(image)
    new = sitk.GetImageFromArray(change(arr))
    new.CopyInformation(image)
    sitk.WriteImage(new, str(path))


def nan_voxels(arr):
    arr = arr.astype(np.float32)
    arr.reshape(-1)[:100] = np.nan
    return arr


def inputs_copy(ctx: Ctx, tmp: Path) -> Path:
    src = tmp / "in"
    shutil.copytree(ctx.raw / "imagesTs", src)
    return src


def model_copy(ctx: Ctx, tmp: Path) -> Path:
    return Path(shutil.copytree(ctx.lean, tmp / "model"))


def predict_argv(src: Path, out: Path, model: Path) -> list[str]:
    return ["predict", "-i", str(src), "-o", str(out), "-m", str(model), *FAST]


def _as_from_a_terminal() -> None:
    # a script's background job (CI may run us as one) inherits SIGINT ignored; a terminal's command does not
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def entrust(ctx: Ctx, *args, **kw) -> subprocess.Popen:
    return subprocess.Popen([nnunet_bin("entrust"), *map(str, args)], env=kw.pop("env", ctx.env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", errors="replace",
                            start_new_session=True, preexec_fn=_as_from_a_terminal, **kw)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"finished before the fault could be injected:\n{proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, "timed out waiting to inject the fault"
        time.sleep(0.02)


def maps_complete(out: Path) -> None:
    """Nothing partial: every mask on disk has all its maps (they are renamed into place before it)."""
    for mask in masks(out):
        case = mask.name[: -len(".nii.gz")]
        assert all((out / "uncertainty" / f"{case}_{m}.nii.gz").is_file() for m in MAP_NAMES), case


def world_folder(tmp: Path) -> Path:
    """A folder another user can reach (pytest's own tmp folders are 0700); removed by the test's finalizer."""
    folder = Path(tempfile.mkdtemp(prefix="entrust-reliability-", dir="/tmp"))
    folder.chmod(0o755)
    (tmp / "world").symlink_to(folder)
    return folder


def as_nobody(argv: list[str]) -> tuple[int, str, str]:
    """cli.main(argv) in a forked child that runs as another user (root may write anywhere)."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only Python-level work before it exits
        code = 99
        try:
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)  # not pytest's capture
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            code = cli.main(argv)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(out_w)
    os.close(err_w)
    with os.fdopen(out_r) as o, os.fdopen(err_r) as e:
        stdout, stderr = o.read(), e.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), stdout, stderr


BUILDERS: dict[str, Callable[[Ctx, Path], Run]] = {}


def builds(fault_id: str):
    def register(fn):
        BUILDERS[fault_id] = fn
        return fn
    return register


# ------------------------------------------------------------------------------------------- predict: images
def _image_fault(ctx, tmp, change) -> Run:
    src, out = inputs_copy(ctx, tmp), tmp / "out"
    change(src)
    return Run(predict_argv(src, out, ctx.lean), {"IN": src, "OUT": out}, [src, ctx.lean], absent=[out])


for _id, _change in {
    "predict-truncated-image": lambda s: truncate(s / "test_000_0001.nii.gz"),
    "predict-corrupt-image": lambda s: (s / "test_000_0001.nii.gz").write_bytes(np.random.default_rng(0).bytes(4000)),
    "predict-nan": lambda s: edit_image(s / "test_000_0001.nii.gz", nan_voxels),
    "predict-inf": lambda s: edit_image(s / "test_001_0002.nii.gz",
                                        lambda a: np.where(np.arange(a.size).reshape(a.shape) == 7, np.inf, a)),
    "predict-missing-channel": lambda s: (s / "test_001_0002.nii.gz").unlink(),
    "predict-extra-channel": lambda s: shutil.copy(s / "test_000_0000.nii.gz", s / "test_000_0003.nii.gz"),
    "predict-geometry": lambda s: _respace(s / "test_000_0002.nii.gz"),
    "predict-empty-input": lambda s: [p.unlink() for p in s.iterdir()],
}.items():
    builds(_id)(lambda ctx, tmp, _c=_change: _image_fault(ctx, tmp, _c))


def _respace(path: Path) -> None:
    image = sitk.ReadImage(str(path))
    image.SetSpacing([s * 2 for s in image.GetSpacing()])
    sitk.WriteImage(image, str(path))


# ------------------------------------------------------------------------------------------- predict: model
class RunsCode:
    """Pickles as a call of os.system: what a malicious checkpoint would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _checkpoint_fault(ctx, tmp, change) -> Run:
    src, out, model = inputs_copy(ctx, tmp), tmp / "out", model_copy(ctx, tmp)
    check = change(model / "fold_2" / "checkpoint_final.pth", tmp)
    return Run(predict_argv(src, out, model), {"IN": src, "OUT": out, "MODEL": model}, [src, model],
               absent=[out], check=check)


def _load_trusted(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)  # the session's own checkpoint


def _drop_weight(path: Path, tmp: Path):
    ckpt = _load_trusted(path)
    # a learned weight (the network's first state entry is an optional buffer, defaulted when absent)
    del ckpt["network_weights"][next(k for k in ckpt["network_weights"] if k.endswith(".weight"))]
    torch.save(ckpt, path)


def _unsafe(path: Path, tmp: Path):
    marker = tmp / "code-ran"
    ckpt = _load_trusted(path)
    ckpt["payload"] = RunsCode(marker)
    torch.save(ckpt, path)
    return lambda: not marker.exists() or pytest.fail("loading the checkpoint ran its code")


builds("predict-truncated-checkpoint")(lambda ctx, tmp: _checkpoint_fault(ctx, tmp, lambda p, t: truncate(p)))
builds("predict-mismatched-checkpoint")(lambda ctx, tmp: _checkpoint_fault(ctx, tmp, _drop_weight))
builds("predict-unsafe-checkpoint")(lambda ctx, tmp: _checkpoint_fault(ctx, tmp, _unsafe))


@builds("predict-no-model")
def _(ctx, tmp):
    src, out, model = inputs_copy(ctx, tmp), tmp / "out", tmp / "nothing"
    model.mkdir()
    return Run(predict_argv(src, out, model), {"IN": src, "OUT": out, "MODEL": model}, [src], absent=[out])


# ------------------------------------------------------------------------------------------- predict: output
@builds("predict-output-is-input")
def _(ctx, tmp):
    src = inputs_copy(ctx, tmp)
    return Run(predict_argv(src, src, ctx.lean), {"IN": src}, [src, ctx.lean])


@builds("predict-output-under-file")
def _(ctx, tmp):
    src, blocker = inputs_copy(ctx, tmp), tmp / "a_file"
    blocker.write_text("not a folder")
    return Run(predict_argv(src, blocker / "out", ctx.lean), {"IN": src, "FILE": blocker}, [src, ctx.lean, blocker])


def _read_only(ctx, tmp, sub: str | None) -> Run:
    world = world_folder(tmp)
    src, out = inputs_copy(ctx, tmp), world / "out"
    out.mkdir(mode=0o777)
    out.chmod(0o777 if sub else 0o555)  # mkdir's mode goes through the umask
    if sub:
        (out / sub).mkdir()
        (out / sub).chmod(0o555)
    how = "nobody" if os.geteuid() == 0 else "here"
    return Run(predict_argv(src, out, ctx.lean), {"IN": src, "OUT": out}, [src, ctx.lean, out], how=how,
               scan=[world], scratch=[world])


builds("predict-output-read-only")(lambda ctx, tmp: _read_only(ctx, tmp, None))
builds("predict-uncertainty-read-only")(lambda ctx, tmp: _read_only(ctx, tmp, "uncertainty"))


# ------------------------------------------------------------------------------------------- predict: runs
# Whole predictions are what costs time here (spawned workers import torch): each scenario runs once per
# session and answers several rows.
_SCENARIOS: dict[str, dict] = {}
_ROOTS: dict[str, Path] = {}


def scenario_root(ctx: Ctx, name: str) -> Path:
    if name not in _ROOTS:
        _ROOTS[name] = ctx.scratch.mktemp(name)
    return _ROOTS[name]


def scenario(ctx: Ctx, name: str) -> dict:
    if name not in _SCENARIOS:
        _SCENARIOS[name] = SCENARIOS[name](ctx, scenario_root(ctx, name))
    return _SCENARIOS[name]


def masks(out: Path) -> list[Path]:
    """The masks in ``out`` (a temporary ``.tmp-*.nii.gz`` is not one)."""
    return [p for p in out.glob("*.nii.gz") if not p.name.startswith(".")]


def holds_lock(out: Path) -> bool:
    """A prediction holds ``out``'s lock: its pid is in the file (written after ``flock``, not merely opened)."""
    try:
        return bool((out / ".entrust-predict.lock").read_text().strip())
    except FileNotFoundError:
        return False


def _interrupted(ctx: Ctx, out: Path, sig: int, group: bool, before=None, src: Path | None = None,
                 at_lock: bool = False) -> tuple[int, str, str, dict]:
    """Start a prediction of ``src`` (ctx.long), wait until it has written a mask (its workers all run; with
    ``at_lock``: until it holds the output's lock), send ``sig`` (to the process group as Ctrl-C does, or to entrust
    alone as ``kill`` does). ``before`` runs once it holds the lock."""
    src = ctx.long if src is None else src
    proc = entrust(ctx, *predict_argv(src, out, ctx.lean))
    results = {}
    if before or at_lock:
        wait_for(lambda: holds_lock(out), proc)
    if before:
        results = before()
    if not at_lock:
        wait_for(lambda: any(masks(out)), proc)
    (os.killpg if group else os.kill)(proc.pid, sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert len(masks(out)) < len(list(src.glob("*_0000.nii.gz"))), "finished before the signal"
    return proc.returncode, stdout, stderr, results


def _sigint(ctx: Ctx, root: Path) -> dict:
    status, stdout, stderr, _ = _interrupted(ctx, root / "out", signal.SIGINT, group=True)
    return {"root": root, "out": root / "out", "predict-sigint": (status, stdout, stderr)}


def _concurrent_then_sigterm(ctx: Ctx, root: Path) -> dict:
    """A second predict into the OUT of a running one, which is then ended with SIGTERM."""
    out = root / "out"

    def second():
        return {"predict-concurrent": _here(predict_argv(ctx.many, out, ctx.lean))}

    status, stdout, stderr, results = _interrupted(ctx, out, signal.SIGTERM, group=False, before=second)
    return {"root": root, "out": out, "predict-sigterm": (status, stdout, stderr), **results}


def _sigkill_then_rerun(ctx: Ctx, root: Path) -> dict:
    """SIGKILL mid-prediction (plus what a kill mid-write leaves, which timing cannot promise), then the
    same prediction again, this time by -d/-tr without -p from a results folder where only
    nnUNetEnTrustPlans has a trained model (nnUNetPlans' folder has no checkpoint)."""
    out, results = root / "out", root / "results" / ctx.model.parent.name
    # at the lock: the N_MANY cases (the rerun below predicts them all) take half a second once the first is written
    status = _interrupted(ctx, out, signal.SIGKILL, group=True, src=ctx.many, at_lock=True)[0]
    assert status == -signal.SIGKILL
    dead = _dead_pid()
    (out / "uncertainty").mkdir(exist_ok=True)
    for folder in (out, out / "uncertainty"):
        (folder / f".tmp-{dead}-0badc0de-c00.nii.gz").write_bytes(b"partial")
    (out / ".entrust-predict.lock").write_text(f"{dead}\n")
    results.mkdir(parents=True)
    (results / f"{TRAINER}__nnUNetEnTrustPlans__2d").symlink_to(ctx.model)
    (results / f"{TRAINER}__nnUNetPlans__2d" / "fold_2").mkdir(parents=True)
    rerun = entrust(ctx, "predict", "-i", ctx.many, "-o", out, "-d", SESSION_DATASET_ID, "-c", "2d", "-tr", TRAINER,
                    *FAST, env={**ctx.env, "nnUNet_results": str(root / "results")})
    stdout, stderr = rerun.communicate(timeout=300)
    done = (rerun.returncode, stdout, stderr)
    return {"root": root, "out": out, "predict-sigkill-rerun": done, "predict-default-plans": done}


def _nnunetplans(ctx: Ctx, root: Path) -> dict:
    """-d/-tr without -p where the one trained model sits under the default plans name nnUNetPlans."""
    out, src, results = root / "out", root / "in", root / "results" / ctx.model.parent.name
    src.mkdir()
    for c in range(3):
        shutil.copy(ctx.raw / "imagesTs" / f"test_000_{c:04d}.nii.gz", src)
    results.mkdir(parents=True)
    (results / f"{TRAINER}__nnUNetPlans__2d").symlink_to(ctx.model)
    before = tree_hash(src)
    proc = entrust(ctx, "predict", "-i", src, "-o", out, "-d", SESSION_DATASET_ID, "-c", "2d", "-tr", TRAINER,
                   *POOLS, env={**ctx.env, "nnUNet_results": str(root / "results")})
    stdout, stderr = proc.communicate(timeout=300)
    assert "using plans" not in stdout  # the default needs no word
    assert tree_hash(src) == before
    assert (out / "test_000.nii.gz").is_file()
    return {"root": root, "out": out, "predict-nnunetplans": (proc.returncode, stdout, stderr)}


SCENARIOS = {"sigint": _sigint, "sigterm": _concurrent_then_sigterm, "sigkill": _sigkill_then_rerun,
             "nnunetplans": _nnunetplans}


def _evaluate_folder_works(ctx: Ctx, out: Path, root: Path) -> None:
    gt = root / "gt"
    gt.mkdir(exist_ok=True)
    for i in range(N_MANY):
        shutil.copy(ctx.raw / "labelsTs" / f"test_{i % 2:03d}.nii.gz", gt / f"c{i:02d}.nii.gz")
    r = subprocess.run([nnunet_bin("nnUNetv2_evaluate_folder"), str(gt), str(out), "-djfile",
                        str(out / "dataset.json"), "-pfile", str(out / "plans.json"), "-np", "1"],
                       env=ctx.env, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(json.loads((out / "summary.json").read_text())["metric_per_case"]) == N_MANY


def _from_scenario(name: str, row: str, check=None):
    def build(ctx, tmp):
        def action():
            return scenario(ctx, name)[row]

        root = scenario_root(ctx, name)

        def checks():
            out = scenario(ctx, name)["out"]
            maps_complete(out)
            if check:
                check(ctx, out, scenario(ctx, name)["root"])

        return Run([], {"IN": ctx.many, "OUT": root / "out"}, [ctx.many, ctx.lean], how="custom", action=action,
                   check=checks, scan=[root])
    return build


def _all_masks(ctx, out, root):
    assert len(masks(out)) == N_MANY


builds("predict-sigint")(_from_scenario("sigint", "predict-sigint"))
builds("predict-sigterm")(_from_scenario("sigterm", "predict-sigterm"))
builds("predict-concurrent")(_from_scenario("sigterm", "predict-concurrent"))
builds("predict-default-plans")(_from_scenario("sigkill", "predict-default-plans", _all_masks))
builds("predict-nnunetplans")(_from_scenario("nnunetplans", "predict-nnunetplans"))
builds("predict-sigkill-rerun")(_from_scenario(
    "sigkill", "predict-sigkill-rerun", lambda ctx, out, root: _all_masks(ctx, out, root) or
    _evaluate_folder_works(ctx, out, root)))


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------------- evaluate
def _evaluate_fault(ctx, tmp, change) -> Run:
    pred = tmp / "pred"
    (pred / "uncertainty").mkdir(parents=True)
    shutil.copy(ctx.raw / "dataset.json", pred)
    for case in ("test_000", "test_001"):
        mask = ctx.raw / "labelsTs" / f"{case}.nii.gz"
        shutil.copy(mask, pred)
        reference = sitk.ReadImage(str(mask))
        for name in MAP_NAMES:
            image = sitk.GetImageFromArray(np.full(sitk.GetArrayViewFromImage(reference).shape, 0.1, np.float32))
            image.CopyInformation(reference)
            write_image(image, pred / "uncertainty" / f"{case}_{name}.nii.gz")
    change(pred)
    summary = tmp / "summary.json"
    argv = ["evaluate", "--pred", str(pred), "--gt", str(ctx.raw / "labelsTs"), "-o", str(summary), "-np", "1"]
    return Run(argv, {"PRED": pred}, [pred, ctx.raw / "labelsTs"], absent=[summary],
               check=lambda: None)


builds("evaluate-missing-case")(lambda ctx, tmp: _evaluate_fault(ctx, tmp, lambda p: (p / "test_001.nii.gz").unlink()))
builds("evaluate-undeclared-label")(lambda ctx, tmp: _evaluate_fault(
    ctx, tmp, lambda p: edit_image(p / "test_000.nii.gz", lambda a: np.where(a == 2, 7, a).astype(a.dtype))))
builds("evaluate-truncated-mask")(lambda ctx, tmp: _evaluate_fault(ctx, tmp, lambda p: truncate(p / "test_001.nii.gz")))


@builds("evaluate-missing-map")
def _(ctx, tmp):
    run = _evaluate_fault(ctx, tmp, lambda p: (p / "uncertainty" / "test_001_total.nii.gz").unlink())
    summary = Path(run.argv[run.argv.index("-o") + 1])
    run.absent, run.check = [], lambda: summary.is_file() or pytest.fail("no summary written")
    return run


# ------------------------------------------------------------------------------------------- phantoms
def phantoms_argv(dataset: Path, *extra) -> list[str]:
    return ["phantoms", str(dataset), "-n", "1", "--num-test", "0", "--size", "16", *extra]


def all_folders_readable(root: Path) -> None:
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        assert folder.stat().st_mode & 0o777 == 0o755, (folder, oct(folder.stat().st_mode))


@builds("phantoms-exists")
def _(ctx, tmp):
    dataset = tmp / "Dataset"
    dataset.mkdir()
    (dataset / "keep.txt").write_text("mine")
    return Run(phantoms_argv(dataset), {"DATASET": dataset}, [dataset])


@builds("phantoms-overwrite-file")
def _(ctx, tmp):
    dataset = tmp / "Dataset"
    dataset.write_text("a file where the dataset goes")
    return Run(phantoms_argv(dataset, "--overwrite"), {"DATASET": dataset}, [],
               check=lambda: (dataset / "dataset.json").is_file() or pytest.fail("not replaced"))


builds("phantoms-negative-test")(lambda ctx, tmp: Run(
    ["phantoms", str(tmp / "Dataset"), "-n", "1", "--num-test", "-1", "--size", "16"], {}, [],
    absent=[tmp / "Dataset"]))


@builds("phantoms-under-file")
def _(ctx, tmp):
    blocker = tmp / "a_file"
    blocker.write_text("not a folder")
    return Run(phantoms_argv(blocker / "Dataset"), {"FILE": blocker}, [blocker])


@builds("phantoms-read-only")
def _(ctx, tmp):
    root = world_folder(tmp) / "raw"
    root.mkdir()
    root.chmod(0o555)
    return Run(phantoms_argv(root / "Dataset"), {"ROOT": root}, [root], how="nobody" if os.geteuid() == 0 else "here",
               scan=[root.parent], scratch=[root.parent])


@builds("phantoms-umask")
def _(ctx, tmp):
    dataset = tmp / "Dataset"
    return Run(phantoms_argv(dataset), {"DATASET": dataset}, [], check=lambda: all_folders_readable(dataset))


# ------------------------------------------------------------------------------------------- convert folder
def _convert_fault(ctx, tmp, change) -> Run:
    src, raw = tmp / "src", tmp / "raw"
    raw.mkdir()
    for i in range(2):
        case = src / f"case_{i:03d}"
        case.mkdir(parents=True)
        for c, name in enumerate(("T1", "T2", "FLAIR")):
            shutil.copy(ctx.raw / "imagesTr" / f"case_{i:03d}_{c:04d}.nii.gz", case / f"{name}.nii.gz")
        shutil.copy(ctx.raw / "labelsTr" / f"case_{i:03d}.nii.gz", case / "label.nii.gz")
    change(src, raw)
    argv = ["convert", "folder", str(src), "-d", "952", "--modalities", "T1,T2,FLAIR", "-o", str(raw)]
    return Run(argv, {"SRC": src, "RAW": raw}, [src], absent=[raw / "Dataset952_Custom"])


def _gap(src, raw):
    for i in range(2):
        edit_image(src / f"case_{i:03d}" / "label.nii.gz", lambda a: np.where(a == 2, 3, a).astype(a.dtype))


def _shift_origin(path: Path) -> None:
    image = sitk.ReadImage(str(path))
    image.SetOrigin([o + 5 for o in image.GetOrigin()])
    sitk.WriteImage(image, str(path))


for _id, _change in {
    "convert-empty-source": lambda s, r: shutil.rmtree(s) or s.mkdir(),
    "convert-id-taken": lambda s, r: (r / "Dataset952_Other").mkdir(),
    "convert-truncated-image": lambda s, r: truncate(s / "case_000" / "T2.nii.gz"),
    "convert-nan": lambda s, r: edit_image(s / "case_001" / "FLAIR.nii.gz", nan_voxels),
    "convert-geometry": lambda s, r: _shift_origin(s / "case_001" / "label.nii.gz"),
    "convert-label-gap": _gap,
}.items():
    builds(_id)(lambda ctx, tmp, _c=_change: _convert_fault(ctx, tmp, _c))


@builds("convert-umask")
def _(ctx, tmp):
    run = _convert_fault(ctx, tmp, lambda s, r: None)
    dataset = run.absent.pop()
    run.check = lambda: all_folders_readable(dataset)
    return run


# ------------------------------------------------------------------------------------------- the suite
def _here(argv: list[str]) -> tuple[int, str, str]:
    """cli.main in this process (the console script is ``sys.exit(main())``)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = cli.main([str(a) for a in argv])
    return status, out.getvalue(), err.getvalue()


def _execute(run: Run) -> tuple[int, str, str]:
    if run.how == "custom":
        return run.action()
    if run.how == "nobody":
        return as_nobody([str(a) for a in run.argv])
    old = os.umask(0o022)  # what most systems have; the written folders must follow it
    try:
        return _here(run.argv)
    finally:
        os.umask(old)


def _restore_permissions(run: Run) -> None:
    for root in run.scratch:
        for p in [root, *root.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
        shutil.rmtree(root, ignore_errors=True)


HERE = [f for f in FAULTS if not f.covered_by]


@pytest.mark.parametrize("fault", HERE, ids=[f.id for f in HERE])
def test_fault(fault, ctx, tmp_path):
    run = BUILDERS[fault.id](ctx, tmp_path)
    before = {p: tree_hash(p) for p in run.inputs}
    try:
        status, stdout, stderr = _execute(run)
        _check(fault, run, status, stdout, stderr, tmp_path, before)
    finally:
        _restore_permissions(run)


def _check(fault, run: Run, status: int, stdout: str, stderr: str, tmp_path: Path, before: dict) -> None:
    leftovers = [p for root in [tmp_path, *run.scan] for pattern in LEFTOVERS for p in root.rglob(pattern)]
    report = f"status {status}\nstdout: {stdout[-1500:]}\nstderr: {stderr[-3000:]}"
    assert status == fault.status, report
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if fault.line is not None:
        pattern = line_pattern(fault.line, run.places)
        if fault.status != 0:  # an error is ONE line: no traceback, no worker noise
            assert len(lines) == 1 and pattern.fullmatch(lines[0]), report
        else:
            assert any(pattern.fullmatch(ln) for ln in (stdout + "\n" + stderr).splitlines()), report
    elif fault.status == 0:
        assert not any("error" in ln.lower() for ln in lines), report
    assert "Traceback" not in stderr, report
    assert not leftovers, leftovers
    for path in run.absent:
        assert not path.exists(), f"{path} was left behind"
    assert {p: tree_hash(p) for p in run.inputs} == before, "an input was modified"
    if run.check:
        run.check()


def test_every_fault_has_a_builder():
    assert set(BUILDERS) == {f.id for f in HERE}


def test_faults_tested_elsewhere_exist():
    root = README.parent
    for fault in (f for f in FAULTS if f.covered_by):
        path, name = fault.covered_by.split("::")
        assert f"def {name}(" in (root / path).read_text(), fault.covered_by


def test_readme_fault_table_is_generated_from_the_suite():
    text = README.read_text(encoding="utf-8")
    assert text == readme_text(text), "run: python tests/reliability/faults.py --update-readme"
