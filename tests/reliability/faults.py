"""The fault table of the reliability suite: what goes wrong, and what the user then sees.

``test_faults.py`` builds every fault from copies of the session's phantoms and model and checks the
exit status and the line below against what really happens. The README's table is generated from
this list (``python tests/reliability/faults.py --update-readme``; a test checks that it is current).

In ``line``, ``{IN}``, ``{OUT}``, ``{MODEL}``, ... stand for the paths the test uses (the README shows
them without braces) and ``*`` for any text.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
BEGIN, END = "<!-- faults:begin -->", "<!-- faults:end -->"

CKPT = "{MODEL}/fold_2/checkpoint_final.pth"


@dataclass(frozen=True)
class Fault:
    id: str
    command: str
    fault: str
    status: int  # exit status; -9: killed by SIGKILL
    line: str | None  # the last line on stderr (or stdout for status 0), None: nothing to say
    also: str = ""  # what else the test checks beyond status, line, leftovers and untouched inputs
    covered_by: str = ""  # tested elsewhere (``file::test``): not run again here


FAULTS = (
    # --------------------------------------------------------------- predict: images
    Fault("predict-truncated-image", "predict", "an input image cut to half its bytes", 2,
          "entrust: error: {IN}/test_000_0001.nii.gz: truncated or corrupt file (*)"),
    Fault("predict-corrupt-image", "predict", "an input image overwritten with random bytes", 2,
          "entrust: error: {IN}/test_000_0001.nii.gz: unreadable or corrupt image (*)"),
    Fault("predict-nan", "predict", "100 NaN voxels in one channel", 2,
          "entrust: error: {IN}/test_000_0001.nii.gz: image contains NaN or Inf values"),
    Fault("predict-inf", "predict", "one +Inf voxel in one channel", 2,
          "entrust: error: {IN}/test_001_0002.nii.gz: image contains NaN or Inf values"),
    Fault("predict-missing-channel", "predict", "a case lacks channel 2; the model was trained without modality dropout", 2,
          "entrust: error: {IN}/test_001_0002.nii.gz: channel 2 (FLAIR) of case test_001 is missing and the model was "
          "trained by nnUNetTrainerEnTrust_tinyCPU without modality dropout; give every channel or use a model trained "
          "with modality dropout (e.g. nnUNetTrainerEnTrustModDrop)"),
    Fault("predict-extra-channel", "predict", "a case has a 4th channel", 2,
          "entrust: error: {IN}/test_000_0003.nii.gz: case test_000 has channel 3 but the model expects 3 channels"),
    Fault("predict-geometry", "predict", "one channel with another spacing", 2,
          "entrust: error: {IN}/test_000_0002.nii.gz: geometry differs from channel 0 of case test_000 "
          "(spacing *)"),
    Fault("predict-empty-input", "predict", "an empty input folder", 2,
          "entrust: error: {IN}: no images ending with .nii.gz"),
    # --------------------------------------------------------------- predict: model
    Fault("predict-truncated-checkpoint", "predict", "checkpoint cut to half its bytes", 2,
          f"entrust: error: {CKPT}: truncated or corrupt checkpoint (*)"),
    Fault("predict-mismatched-checkpoint", "predict", "checkpoint lacks one weight of the network", 2,
          f"entrust: error: {CKPT}: does not fit the model described by {{MODEL}}/plans.json "
          "(missing weight(s) *)"),
    Fault("predict-unsafe-checkpoint", "predict", "checkpoint holds a pickled call of os.system", 2,
          f"entrust: error: {CKPT}: refused: the file holds objects that would execute code when loaded "
          "(posix.system); only weights are loaded", also="the call did not run"),
    Fault("predict-no-model", "predict", "-m names a folder without a model", 2,
          "entrust: error: {MODEL}: no trained model here (dataset.json missing)"),
    Fault("predict-default-plans", "predict", "no -p; only nnUNetEnTrustPlans has a trained model", 0,
          "entrust: using plans nnUNetEnTrustPlans, the only one with a trained nnUNetTrainerEnTrust_tinyCPU 2d "
          "model (-p nnUNetPlans is the default otherwise)", also="the masks are written"),
    Fault("predict-nnunetplans", "predict", "no -p; the model was trained with the default nnUNetPlans", 0, None,
          also="the masks are written, as nnUNetv2_predict would"),
    # --------------------------------------------------------------- predict: output
    Fault("predict-output-is-input", "predict", "-o is the input folder", 2,
          "entrust: error: {IN}: output folder is the input folder; choose another so inputs stay untouched"),
    Fault("predict-output-under-file", "predict", "-o lies below a file", 2,
          "entrust: error: {FILE}: is a file, not a folder (cannot create {FILE}/out)"),
    Fault("predict-output-read-only", "predict", "-o is a read-only folder (run as another user)", 2,
          "entrust: error: {OUT}: output folder is not writable"),
    Fault("predict-uncertainty-read-only", "predict", "OUT/uncertainty is read-only (run as another user)", 2,
          "entrust: error: {OUT}/uncertainty: output folder is not writable"),
    Fault("predict-concurrent", "predict", "a second predict into the OUT of a running one", 2,
          "entrust: error: {OUT}/.entrust-predict.lock: another entrust predict (pid *) is writing into {OUT}; "
          "wait for it or choose another output folder", also="the first run is not disturbed"),
    # --------------------------------------------------------------- predict: interruptions
    Fault("predict-sigint", "predict", "Ctrl-C (SIGINT to the process group) mid-prediction", 130,
          "entrust: interrupted", also="the only line on stderr: no worker tracebacks; finished masks have all maps"),
    Fault("predict-sigterm", "predict", "SIGTERM to entrust mid-prediction", 143, "entrust: terminated",
          also="finished masks have all maps"),
    Fault("predict-sigkill-rerun", "predict", "SIGKILL to the process group mid-prediction, stale temporaries "
          "and lock of dead processes in OUT, then the same command again", 0, None,
          also="the rerun removes them; nnUNetv2_evaluate_folder works on OUT"),
    # --------------------------------------------------------------- evaluate
    Fault("evaluate-missing-case", "evaluate", "a reference case has no prediction", 2,
          "entrust: error: {PRED}: no prediction for reference case(s) test_001"),
    Fault("evaluate-undeclared-label", "evaluate", "a mask holds label 7, not in dataset.json", 2,
          "entrust: error: {PRED}/test_000.nii.gz: label value(s) 7 not declared in dataset.json labels [0, 1, 2]"),
    Fault("evaluate-truncated-mask", "evaluate", "a mask cut to half its bytes", 2,
          "entrust: error: {PRED}/test_001.nii.gz: unreadable or corrupt image (*)"),
    Fault("evaluate-missing-map", "evaluate", "one uncertainty map of a case is missing", 0,
          "entrust: warning: {PRED}/uncertainty/test_001_total.nii.gz: missing; case test_001 is left out of the "
          "metrics of the total map", also="the line is on stderr; the summary is written"),
    # --------------------------------------------------------------- phantoms
    Fault("phantoms-exists", "phantoms", "the dataset folder exists (no --overwrite)", 2,
          "entrust: error: {DATASET}: already exists (use --overwrite to replace it)"),
    Fault("phantoms-overwrite-file", "phantoms", "--overwrite where a file has the dataset's name", 0,
          "wrote {DATASET}", also="the file is replaced; no .trash-* or .tmp-* left"),
    Fault("phantoms-negative-test", "phantoms", "--num-test -1", 2, "entrust: error: --num-test -1: must be >= 0"),
    Fault("phantoms-under-file", "phantoms", "the dataset's parent is a file", 2,
          "entrust: error: {FILE}: is a file, not a folder"),
    Fault("phantoms-read-only", "phantoms", "the dataset's parent is read-only (run as another user)", 2,
          "entrust: error: {ROOT}: output folder is not writable"),
    Fault("phantoms-umask", "phantoms", "umask 022 (another user or container uid reads the data)", 0,
          "wrote {DATASET}", also="every folder is drwxr-xr-x"),
    # --------------------------------------------------------------- convert
    Fault("convert-empty-source", "convert folder", "the source folder is empty", 2,
          "entrust: error: {SRC}: no case folders found (expected one sub-folder per case)"),
    Fault("convert-id-taken", "convert folder", "another dataset already has the id", 2,
          "entrust: error: {RAW}/Dataset952_Other: dataset id 952 is already taken"),
    Fault("convert-truncated-image", "convert folder", "a source image cut to half its bytes", 2,
          "entrust: error: {SRC}/case_000/T2.nii.gz: truncated or corrupt file (*)"),
    Fault("convert-nan", "convert folder", "NaN voxels in a source image", 2,
          "entrust: error: {SRC}/case_001/FLAIR.nii.gz: image contains NaN or Inf values"),
    Fault("convert-geometry", "convert folder", "a label with another origin than its images", 2,
          "entrust: error: {SRC}/case_001/label.nii.gz: geometry differs from T1.nii.gz, the first channel of "
          "case case_001 (origin *)"),
    Fault("convert-label-gap", "convert folder", "labels 0, 1, 3 (label 2 nowhere)", 2,
          "entrust: error: {SRC}/case_000/label.nii.gz: holds label 3 but no case holds label 2; labels must be "
          "consecutive integers from 0 (found [0, 1, 3])"),
    Fault("convert-umask", "convert folder", "umask 022 (another user or container uid reads the data)", 0,
          "wrote {RAW}/Dataset952_Custom", also="every folder is drwxr-xr-x"),
    # --------------------------------------------------------------- training
    Fault("train-sigkill-continue", "nnUNetv2_train", "SIGKILL mid-training, then `--c`", 0, None,
          also="training resumes from checkpoint_latest and finishes; entrust predict loads the result",
          covered_by="tests/nnunet/test_trainers.py::test_interrupted_training_resumes_with_c_and_predict_loads"),
)


def _cell(text: str) -> str:
    return text.replace("{", "").replace("}", "").replace("|", "\\|")


def readme_section() -> str:
    """The README's fault table (between the markers), generated from :data:`FAULTS`."""
    rows = ["| command | fault | exit status | what the user sees |", "| --- | --- | --- | --- |"]
    for f in FAULTS:
        status = "killed" if f.status == -9 else str(f.status)
        sees = f"`{_cell(f.line)}`" if f.line else ""
        extra = _cell(f.also) + (f" (tested in `{f.covered_by}`)" if f.covered_by else "")
        sees = "; ".join(x for x in (sees, extra) if x)
        rows.append(f"| `{f.command}` | {_cell(f.fault)} | {status} | {sees} |")
    return "\n".join(rows)


def readme_text(readme: str) -> str:
    """``readme`` with the section between the markers replaced by :func:`readme_section`."""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(readme):
        raise ValueError(f"README has no {BEGIN} ... {END} section")
    return pattern.sub(lambda _: f"{BEGIN}\n{readme_section()}\n{END}", readme)


def line_pattern(line: str, places: dict[str, str]) -> re.Pattern:
    """``line`` as a regular expression: ``{NAME}`` -> that path, ``*`` -> any text, the rest literal."""
    parts = re.split(r"(\{[A-Z]+\}|\*)", line)
    out = []
    for part in parts:
        if part == "*":
            out.append(".*")
        elif re.fullmatch(r"\{[A-Z]+\}", part):
            out.append(re.escape(str(places[part[1:-1]])))
        else:
            out.append(re.escape(part))
    return re.compile("".join(out))


if __name__ == "__main__":
    if sys.argv[1:] == ["--update-readme"]:
        README.write_text(readme_text(README.read_text(encoding="utf-8")), encoding="utf-8")
        print(f"updated {README}")
    else:
        print(readme_section())
