#!/usr/bin/env bash
# GPU readiness check of EnTrust-nnU-Net: one script, under 8 minutes on one CUDA GPU (docs/design.md, "GPU check").
#
# Prints (1) nnU-Net's train_step time of nnUNetTrainerEnTrust vs nnUNetTrainer with AMP on a BraTS-like 3D plan
# (patch, batch and architecture nnU-Net's planner gave a 240x240x155 4-channel dataset at 1 mm) and the ratio;
# (2) one-patch inference time of EnTrust K=1 and K=8 (all maps) and torch.cuda.max_memory_allocated vs plain;
# (3) a short stock `nnUNetv2_train ... -device cuda` of a tiny variant on 3D phantoms, which must finish.
#
#   bash benchmarks/gpu_check.sh                    # in the project's venv, on a machine with a CUDA GPU
#   DEVICE=cpu TINY=1 NP=1 bash benchmarks/gpu_check.sh  # dry run of every step on CPU (tiny plan, few repeats)
set -euo pipefail
DEVICE=${DEVICE:-cuda}
TINY=${TINY:-0}
PYTHON=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT
eval "$(entrust env --root "$ROOT")"
# torch.compile would add minutes of compilation to both trainers; the ratio is of eager execution
export nnUNet_compile=false nnUNet_def_n_proc=${nnUNet_def_n_proc:-4} nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-4}
ID=981
NAME=Dataset${ID}_GPUCheck
start=$(date +%s)
step() { echo "== [$(( $(date +%s) - start )) s] $*"; }
# run quietly into a log; on failure show its end and stop
quiet() { local log=$1; shift; "$@" > "$log" 2>&1 || { tail -n 40 "$log"; echo "FAILED: $*"; exit 1; }; }

step "3D phantoms (4 modalities) and nnU-Net's 3d_fullres plan"
quiet "$ROOT/phantoms.log" entrust phantoms "$nnUNet_raw/$NAME" --dim 3 --modalities 4 -n 8 --num-test 2
quiet "$ROOT/plan.log" nnUNetv2_plan_and_preprocess -d $ID -c 3d_fullres -np "${NP:-4}"

step "training step and inference, EnTrust vs plain ($DEVICE)"
if [ "$TINY" = 1 ]; then extra=(--tiny); else extra=(--brats); fi
timeout 300 "$PYTHON" "$HERE/gpu_check.py" $ID --device "$DEVICE" "${extra[@]}" | grep -v '^{'

step "stock nnUNetv2_train of a tiny variant on $DEVICE"
TRAINER=nnUNetTrainerEnTrust_tinyCPU
quiet "$ROOT/train.log" timeout 240 nnUNetv2_train $ID 3d_fullres 0 -tr $TRAINER -device "$DEVICE"
FOLD="$nnUNet_results/$NAME/${TRAINER}__nnUNetPlans__3d_fullres/fold_0"
test -f "$FOLD/checkpoint_final.pth" || { echo "FAILED: no checkpoint_final.pth"; exit 1; }
grep -E "Epoch time|Mean Validation Dice|CalibHead fitted" "$ROOT/train.log" | tail -n 4
step "done: nnUNetv2_train finished with checkpoint_final.pth and $(ls "$FOLD/validation/uncertainty" | wc -l) validation map files"
