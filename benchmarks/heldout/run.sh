#!/bin/bash
# Plain nnU-Net against EnTrust on phantoms of a generator the project did not write, trained with the stock
# nnUNetv2_train and a user's short trainer subclass; scored the way issue 12's table is.
#   bash benchmarks/heldout/run.sh OUT [REPEATS]      (~5 min per repeat and dataset on 2 CPU cores)
#   SCHEDULE=Long bash benchmarks/heldout/run.sh OUT [REPEATS]   (50 epochs x 25 iterations instead of 12 x 25: the
#       trainers nnUNetTrainerLong / nnUNetTrainerEnTrustLong; ~4x the time; metrics tagged f0_long)
#   VARIANT=CrossModal bash benchmarks/heldout/run.sh OUT [REPEATS]   (EnTrust with the cross-modal prediction conflict,
#       nnUNetTrainerEnTrustCrossModal; the same plain nnU-Net runs; metrics tagged f0_crossmodal)
#   FOLDS="0 1 2 3 4" bash benchmarks/heldout/run.sh OUT [REPEATS]   (nnU-Net's cross-validation: every fold
#       trained, `entrust calibrate` on all of them, both methods predicted as fold ensembles; ~5x the time)
# Datasets: 701 (conflict blobs in half of the training cases), 702 (conflict only in the test cases).
# Prints one table per dataset (mean ± std over the repeats); OUT/metrics_ID_fFOLDS_rR.json holds every number.
set -e
OUT=$(realpath -m "$1"); REPEATS=${2:-2}; HERE=$(cd "$(dirname "$0")" && pwd)
FOLDS=${FOLDS:-0}; TAG=f${FOLDS// /}; NFOLDS=$(wc -w <<< "$FOLDS")  # predictions and metrics per fold set (f0: fold 0)
SCHEDULE=${SCHEDULE:-Short}; PLAIN=nnUNetTrainer$SCHEDULE; OURS=nnUNetTrainerEnTrust${VARIANT:-}$SCHEDULE  # trainers/
case $SCHEDULE in Short|Long) ;; *) echo "run.sh: error: SCHEDULE=$SCHEDULE: must be Short or Long" >&2; exit 2;; esac
case ${VARIANT:-} in ""|CrossModal) ;; *) echo "run.sh: error: VARIANT=$VARIANT: must be empty or CrossModal" >&2; exit 2;; esac
[ "$SCHEDULE" = Short ] || TAG=${TAG}_${SCHEDULE,,}  # ... and per schedule (f0_long)
[ -z "${VARIANT:-}" ] || TAG=${TAG}_${VARIANT,,}  # ... and per EnTrust variant (f0_crossmodal)
export nnUNet_raw=$OUT/raw nnUNet_preprocessed=$OUT/pre nnUNet_extTrainer=$HERE/trainers
export nnUNet_def_n_proc=${nnUNet_def_n_proc:-2} nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-2}
for SPEC in "701 Dataset701_Heldout 11 0.5" "702 Dataset702_HeldoutUnseen 12 0"; do
  set -- $SPEC; ID=$1; NAME=$2
  [ -d "$nnUNet_raw/$NAME" ] || python "$HERE/generate.py" "$nnUNet_raw/$NAME" --seed "$3" --n-train 40 --n-test 60 \
      --conflict-in-train "$4" --conflict-in-test 0.6
  [ -d "$nnUNet_preprocessed/$NAME/nnUNetPlans_2d" ] || nnUNetv2_plan_and_preprocess -d "$ID" -c 2d -np 2 \
      --verify_dataset_integrity > "$OUT/plan_$ID.log" 2>&1
  for ((R = 0; R < REPEATS; R++)); do
    export nnUNet_results=$OUT/results_r$R; P=$OUT/pred_r$R/$NAME/$TAG
    for F in $FOLDS; do
      for TR in "$PLAIN" "$OURS"; do
        [ -f "$nnUNet_results/$NAME/${TR}__nnUNetPlans__2d/fold_$F/checkpoint_final.pth" ] || \
          nnUNetv2_train "$ID" 2d "$F" -tr "$TR" -device cpu > "$OUT/train_${ID}_${TR}_f${F}_r$R.log" 2>&1
      done
    done
    # several folds: `entrust calibrate` on them in a view of EnTrust's model folder (its folds linked), so that the
    # shared folder keeps no calibration file and a prediction with one fold still uses the trainer's own fit
    MODEL=$NAME/${OURS}__nnUNetPlans__2d; ENTRUST_RESULTS=$nnUNet_results
    if [ "$NFOLDS" -gt 1 ] && [ ! -f "$P/entrust/done" ]; then
      ENTRUST_RESULTS=$OUT/results_r${R}_$TAG; mkdir -p "$ENTRUST_RESULTS/$MODEL"
      for X in "$nnUNet_results/$MODEL"/*; do
        [ "$(basename "$X")" = entrust_calibration.json ] || ln -sfn "$X" "$ENTRUST_RESULTS/$MODEL/"
      done
      nnUNet_results=$ENTRUST_RESULTS entrust calibrate -d "$ID" -c 2d -tr "$OURS" -f $FOLDS \
          > "$OUT/calibrate_${ID}_${TAG}_r$R.log" 2>&1
    fi
    [ -f "$P/plain/done" ] || { nnUNetv2_predict -i "$nnUNet_raw/$NAME/imagesTs" -o "$P/plain" -d "$ID" -c 2d -f $FOLDS \
        -tr "$PLAIN" --save_probabilities -device cpu -npp 1 -nps 1 > "$OUT/predict_plain_${ID}_${TAG}_r$R.log" 2>&1 \
        && touch "$P/plain/done"; }
    [ -f "$P/entrust/done" ] || { nnUNet_results=$ENTRUST_RESULTS entrust predict -i "$nnUNet_raw/$NAME/imagesTs" -o "$P/entrust" -d "$ID" -c 2d -f $FOLDS \
        -tr "$OURS" --save_probabilities -device cpu > "$OUT/predict_entrust_${ID}_${TAG}_r$R.log" 2>&1 \
        && touch "$P/entrust/done"; }
    python "$HERE/score.py" case "$nnUNet_raw/$NAME" "$P/plain" "$P/entrust" "$OUT/metrics_${ID}_${TAG}_r$R.json" > /dev/null
  done
done
python "$HERE/score.py" table "$OUT" "$TAG"
