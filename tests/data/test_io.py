"""IO helpers: one geometry check naming the file, dataset folder names, atomic writes."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from entrust_nnunet.data.io import (InputError, atomic_file, check_same_geometry, dataset_prefix, nnunet_dataset_name,
                                    read_image, write_image)


def _image(spacing=(1.0, 1.0), size=(4, 5)):
    img = sitk.GetImageFromArray(np.zeros(size[::-1], np.float32))
    img.SetSpacing(spacing)
    return img


def test_check_same_geometry_names_the_file_and_the_reference(tmp_path):
    check_same_geometry(_image(), "a.nii.gz", _image(), "b.nii.gz")
    with pytest.raises(InputError) as e:
        check_same_geometry(_image(), "a.nii.gz", _image(spacing=(1.0, 2.0)), "b.nii.gz", "channel 0 of case x")
    assert str(e.value).startswith("b.nii.gz: geometry differs from channel 0 of case x (spacing")
    with pytest.raises(InputError, match=r"^b.nii.gz: geometry differs from a.nii.gz \(size"):
        check_same_geometry(_image(), "a.nii.gz", _image(size=(4, 6)), "b.nii.gz")


def test_dataset_names():
    assert dataset_prefix(7) == "Dataset007_" and nnunet_dataset_name(501, "X") == "Dataset501_X"
    with pytest.raises(InputError, match="between 1 and 999"):
        dataset_prefix(1000)


def test_writes_are_atomic_and_leave_no_temporary(tmp_path):
    path = tmp_path / "img.nii.gz"
    write_image(_image(), path)
    assert read_image(path).GetSize() == (4, 5)
    with pytest.raises(ValueError):
        with atomic_file(tmp_path / "a.json") as f:
            f.write("{")
            raise ValueError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.nii.gz"]


def test_replacing_a_folder_keeps_the_old_one_when_the_final_rename_fails(tmp_path, monkeypatch):
    """Between moving the old folder aside and renaming the new one into place, an interrupt (or a failed rename)
    puts the old folder back: the caller keeps its data, as the docstring promises."""
    import os

    from entrust_nnunet.data import io

    final = tmp_path / "dataset"
    final.mkdir()
    (final / "keep.txt").write_text("old")
    real_replace, calls = os.replace, []

    def interrupted(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new folder's rename
            raise KeyboardInterrupt
        return real_replace(src, dst)

    with pytest.raises(KeyboardInterrupt):
        with io.atomic_directory(final, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            monkeypatch.setattr(io.os, "replace", interrupted)
    monkeypatch.undo()
    assert (final / "keep.txt").read_text() == "old" and not (final / "new.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]  # no temporary or trash left


def test_another_machines_temporaries_and_locks_are_left_alone(tmp_path):
    """On a folder shared between machines a pid says nothing about another machine's process: its temporaries
    stay and its lock is refused (with how to proceed); this machine's dead ones (and names without a host, written
    before it) are cleaned up as before."""
    from entrust_nnunet.data import io

    dead = 999999999  # no such pid here
    other = "0badf00d" if io.HOST_TAG != "0badf00d" else "0badf00e"
    mine, legacy = tmp_path / f".tmp-{dead}-h{io.HOST_TAG}-01234567-a", tmp_path / f".tmp-{dead}-01234567-b"
    theirs = tmp_path / f".tmp-{dead}-h{other}-01234567-c"
    for p in (mine, legacy, theirs):
        p.write_text("x")
    assert sorted(p.name for p in io.remove_stale_temporaries(tmp_path)) == sorted([mine.name, legacy.name])
    assert theirs.exists()
    assert io.temporary_path(tmp_path / "f.nii.gz").name.startswith(f".tmp-{os.getpid()}-h{io.HOST_TAG}-")
    lock = tmp_path / ".lock"
    lock.write_text(f"{dead} {other}\n")
    with pytest.raises(InputError, match=f"pid {dead} on another machine.*remove the lock"):
        with io.folder_lock(tmp_path, ".lock", "entrust predict"):
            pass
    lock.write_text(f"{dead}\n")  # a lock written before the host tag, by a dead process of this machine: taken over
    with io.folder_lock(tmp_path, ".lock", "entrust predict"):
        assert lock.read_text().split() == [str(os.getpid()), io.HOST_TAG]
    assert not lock.exists()


def _hold_lock(folder, seconds):
    """A separate process holding ``folder/.lock`` for ``seconds`` (printing "held" once it does)."""
    import subprocess
    import sys

    code = ("import sys, time; from pathlib import Path; from entrust_nnunet.data import io\n"
            "with io.folder_lock(Path(sys.argv[1]), '.lock', 'entrust predict'):\n"
            "    print('held', flush=True); time.sleep(float(sys.argv[2]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_lock_is_held_by_a_live_process_not_by_the_pid_in_its_file(tmp_path):
    """The lock is an flock: a live holder is refused (naming its pid); one killed with SIGKILL leaves a file that
    the next run takes over; a file naming a live pid that holds nothing (a reused pid) is stale too."""
    import signal

    from entrust_nnunet.data import io

    holder = _hold_lock(tmp_path, 60)
    try:
        with pytest.raises(InputError, match=f"another entrust predict \\(pid {holder.pid}\\) is writing into"):
            with io.folder_lock(tmp_path, ".lock", "entrust predict"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = tmp_path / ".lock"
    assert lock.read_text().split() == [str(holder.pid), io.HOST_TAG]  # SIGKILL: no cleanup ran
    with io.folder_lock(tmp_path, ".lock", "entrust predict"):
        assert lock.read_text().split() == [str(os.getpid()), io.HOST_TAG]
    assert not lock.exists()
    lock.write_text(f"{os.getppid()} {io.HOST_TAG}\n")  # alive, but not holding the lock
    with io.folder_lock(tmp_path, ".lock", "entrust predict"):
        assert lock.read_text().split() == [str(os.getpid()), io.HOST_TAG]


def _try_stale_lock(folder, barrier, results, release):
    from entrust_nnunet.data import io

    barrier.wait()
    try:
        with io.folder_lock(folder, ".lock", "entrust predict"):
            results.put("took")
            release.wait(60)  # held until every other process has tried (not a sleep: a loaded machine is slow)
    except InputError:
        results.put("refused")


def test_a_stale_lock_is_taken_over_by_one_of_several_processes_at_once(tmp_path):
    import multiprocessing as mp

    (tmp_path / ".lock").write_text("999999999\n")  # a dead pid of this machine
    ctx = mp.get_context("fork")
    barrier, results, release = ctx.Barrier(6), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_try_stale_lock, args=(tmp_path, barrier, results, release)) for _ in range(6)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=60) for _ in procs)
    release.set()
    for p in procs:
        p.join(30)
    assert outcomes == ["refused"] * 5 + ["took"]
    assert not (tmp_path / ".lock").exists()


def test_a_prediction_folder_is_written_under_its_lock_and_cleaned_of_a_killed_runs_temporaries(tmp_path):
    """predict, postprocess and ensemble write OUT through one function: OUT is locked while they write, and the
    temporaries of a dead process (SIGKILL) in OUT and its sub-folders are gone before and after."""
    from entrust_nnunet.data import io

    dead = 999999999
    (tmp_path / "uncertainty").mkdir()
    before = [tmp_path / f".tmp-{dead}-h{io.HOST_TAG}-01234567-a.nii.gz",
              tmp_path / "uncertainty" / f".tmp-{dead}-h{io.HOST_TAG}-01234567-b.nii.gz"]
    for p in before:
        p.write_text("partial")
    with io.writing_prediction_folder(tmp_path, ("uncertainty",), {"labels": {}}, {"plans": 1}, "entrust ensemble"):
        assert not any(p.exists() for p in before)
        assert json.loads((tmp_path / "plans.json").read_text()) == {"plans": 1}
        with pytest.raises(InputError, match=f"another entrust postprocess \\(pid {os.getpid()}\\)"):
            with io.folder_lock(tmp_path, io.OUTPUT_LOCK, "entrust postprocess"):
                pass
        during = tmp_path / "uncertainty" / f".tmp-{dead}-h{io.HOST_TAG}-01234567-c.nii.gz"  # a worker killed now
        during.write_text("partial")
    assert not during.exists() and not (tmp_path / io.OUTPUT_LOCK).exists()


def test_an_atomic_write_removes_a_killed_writers_temporary_of_the_same_file(tmp_path):
    """A SIGKILLed `entrust evaluate` or `calibrate` leaves `.tmp-PID-...-summary.json`; the next write of that file
    removes it; another file's temporary, or one of a live process, stays."""
    from entrust_nnunet.data import io

    dead = 999999999
    same = tmp_path / f".tmp-{dead}-h{io.HOST_TAG}-01234567-summary.json"
    other = tmp_path / f".tmp-{dead}-h{io.HOST_TAG}-01234567-plans.json"
    live = tmp_path / f".tmp-{os.getpid()}-h{io.HOST_TAG}-01234567-summary.json"
    for p in (same, other, live):
        p.write_text("partial")
    with io.atomic_file(tmp_path / "summary.json") as f:
        f.write("{}")
    assert not same.exists() and other.exists() and live.exists()
    assert (tmp_path / "summary.json").read_text() == "{}"
