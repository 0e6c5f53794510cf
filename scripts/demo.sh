#!/usr/bin/env bash
# The main job end to end on a synthetic dataset in the Kaggle layout:
# install -> synth -> check -> train -> fit thresholds -> predict a submission -> score it -> report.
# On the CPU it is a small, minutes-long run; with GPUs it trains at 512 px on every GPU (torchrun).
# Re-running is safe: the dataset is reused and a finished run folder resumes to its end.
# Override the sizes with DEMO_N, DEMO_SIZE, DEMO_EPOCHS, DEMO_BATCH, DEMO_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=.venv/bin/python
FASTHPA=.venv/bin/fasthpa
DIR="${DEMO_DIR:-demo}"

GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
if [ "$GPUS" -gt 0 ]; then
    N="${DEMO_N:-4000}"; SIZE="${DEMO_SIZE:-512}"; EPOCHS="${DEMO_EPOCHS:-8}"; BATCH="${DEMO_BATCH:-64}"
    TEST_N=$((N / 5)); IMAGE="$SIZE"
    TRAIN=(.venv/bin/torchrun --standalone --nproc_per_node="$GPUS" -m fasthpa.train)
    echo "[demo] $GPUS GPU(s): $N samples at $SIZE px, $EPOCHS epochs, batch $BATCH per GPU"
else
    N="${DEMO_N:-800}"; SIZE="${DEMO_SIZE:-128}"; EPOCHS="${DEMO_EPOCHS:-6}"; BATCH="${DEMO_BATCH:-32}"
    TEST_N=$((N / 5)); IMAGE="$SIZE"
    TRAIN=("$PY" -m fasthpa.train)
    echo "[demo] no GPU: a small CPU run ($N samples at $SIZE px, $EPOCHS epochs); minutes, not hours"
fi

if [ ! -f "$DIR/data/train.csv" ]; then
    "$FASTHPA" synth "$DIR/data" --n "$N" --size "$SIZE" --test-n "$TEST_N" --seed 0 --workers 2
fi
"$FASTHPA" check "$DIR/data"

# fasthpa's default recipe (fasthpa/recipes.py); --recipe reference would run the report's
"${TRAIN[@]}" --data "$DIR/data" --out "$DIR/run" --epochs "$EPOCHS" --batch-size "$BATCH" \
    --image-size "$IMAGE" --split 0.8,0.1,0.1 --workers 2 --log-every 10

# thresholds refitted from the run's dev probabilities, shown as a table (the trainer wrote its own)
"$FASTHPA" thresholds --probs "$DIR/run/dev_probs.npz" --out "$DIR/thresholds.json"

"$FASTHPA" predict --run "$DIR/run" --data "$DIR/data" --tta flips --out "$DIR/submission.csv"

# the synthetic test set has a hidden truth: score the submission like the Kaggle leaderboard
"$PY" - "$DIR/submission.csv" "$DIR/data/test_labels.csv" <<'PY'
import sys

from fasthpa.predict.score import score_submission

s = score_submission(sys.argv[1], sys.argv[2])
print(
    f"[demo] submission macro F1 on the synthetic test set: {s['macro_f1']:.4f} ({s['samples']} "
    f"samples; rarest 9 labels {s['rare_macro_f1']:.4f}; {s['labels_per_row']:.2f} labels per "
    f"row predicted, {s['labels_per_row_true']:.2f} true)"
)
PY

"$FASTHPA" report "$DIR/run" --out "$DIR/report"
echo "[demo] done: run folder $DIR/run, submission $DIR/submission.csv, report $DIR/report/report.md"
