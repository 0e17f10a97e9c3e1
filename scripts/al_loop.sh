#!/usr/bin/env bash
# Active-learning loop: round 0 trains the base model; every later round queries the pool with
# the previous round's best model, then trains on the labelled data plus every query set.
# Each setting is an environment variable or the flag of the same name in lower case
# (e.g. ROUNDS=3 or --rounds 3). Run with --help for the list.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/al_loop.sh [--name value ...]      (or the upper-case environment variables)

  --train_data DIR        training LMDB root                         (data/train_data_lmdb)
  --valid_data DIR        validation LMDB root used during training  (data/test_data_lmdb)
  --test_data DIR         LMDB root evaluated by test.py each round  (= valid_data)
  --select_data NAMES     base datasets, '-'-separated               (CVPR2016-NIPS2014)
  --batch_ratio SHARES    their batch shares                         (0.5-0.5)
  --label_ratio R         labelled fraction (--total_data_usage_ratio) (0.1)
  --query NAME            query strategy of data_sampling.py         (random)
  --base_calibrator NAME  calibrator of round 0                      (CE)
  --al_calibrator NAME    calibrator of later rounds                 (boost_soft)
  --rounds N              rounds after the base round                (3)
  --query_ratio R         share of the pool queried per round        (0.01)
  --num_query N           or a fixed number per round (overrides --query_ratio)
  --noise_ratio R         simulated annotator noise on queried labels (0)
  --base_iters N          iterations of round 0                      (2000)
  --iters N               iterations of each later round             (1000)
  --val_interval N        validation interval                        (500)
  --arch "FLAGS"          architecture and optimiser flags for train.py
                          ("--Transformation TPS --FeatureExtraction ResNet --SequenceModeling BiLSTM --Prediction Attn")
  --train_args "FLAGS"    extra flags for every train.py call        ("")
  --batch_size N          batch size                                 (192)
  --workers N             data-loading workers                       (4)
  --seed N                --manualSeed                               (1111)
  --out DIR               output root; this run goes to DIR/<query>  (runs/al)

Round 0 trains on the labelled part. Round k >= 1 runs data_sampling.py with round k-1's
best_accuracy.pth, then train.py --mode al from that model on the base datasets plus every
query set so far. The batch shares follow the original's rule: the base shares are halved and
the other half is split equally among the query sets (e.g. 0.5-0.5 -> 0.25-0.25-0.5 in round 1,
0.25-0.25-0.25-0.25 in round 2). The query sets of this run live in DIR/<query>/train_data,
beside links to the base datasets, so runs of different strategies never see each other's picks.
Results: DIR/<query>/rounds.csv, rounds.md; DIR/learning_curve.png covers every run under DIR.
EOF
}

TRAIN_DATA=${TRAIN_DATA:-data/train_data_lmdb}
VALID_DATA=${VALID_DATA:-data/test_data_lmdb}
TEST_DATA=${TEST_DATA:-}
SELECT_DATA=${SELECT_DATA:-CVPR2016-NIPS2014}
BATCH_RATIO=${BATCH_RATIO:-0.5-0.5}
LABEL_RATIO=${LABEL_RATIO:-0.1}
QUERY=${QUERY:-random}
BASE_CALIBRATOR=${BASE_CALIBRATOR:-CE}
AL_CALIBRATOR=${AL_CALIBRATOR:-boost_soft}
ROUNDS=${ROUNDS:-3}
QUERY_RATIO=${QUERY_RATIO:-0.01}
NUM_QUERY=${NUM_QUERY:-}
NOISE_RATIO=${NOISE_RATIO:-0}
BASE_ITERS=${BASE_ITERS:-2000}
ITERS=${ITERS:-1000}
VAL_INTERVAL=${VAL_INTERVAL:-500}
ARCH=${ARCH:---Transformation TPS --FeatureExtraction ResNet --SequenceModeling BiLSTM --Prediction Attn}
TRAIN_ARGS=${TRAIN_ARGS:-}
BATCH_SIZE=${BATCH_SIZE:-192}
WORKERS=${WORKERS:-4}
SEED=${SEED:-1111}
OUT=${OUT:-runs/al}
PYTHON=${PYTHON:-python}

while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --*)
      [ $# -ge 2 ] || { echo "error: $1 needs a value" >&2; exit 2; }
      var=$(printf '%s' "${1#--}" | tr '[:lower:]' '[:upper:]')
      case "$var" in
        TRAIN_DATA|VALID_DATA|TEST_DATA|SELECT_DATA|BATCH_RATIO|LABEL_RATIO|QUERY|BASE_CALIBRATOR|\
        AL_CALIBRATOR|ROUNDS|QUERY_RATIO|NUM_QUERY|NOISE_RATIO|BASE_ITERS|ITERS|VAL_INTERVAL|ARCH|\
        TRAIN_ARGS|BATCH_SIZE|WORKERS|SEED|OUT|PYTHON) printf -v "$var" '%s' "$2" ;;
        *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
      esac
      shift 2 ;;
    *) echo "error: unexpected argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
TEST_DATA=${TEST_DATA:-$VALID_DATA}

for dir in "$TRAIN_DATA" "$VALID_DATA" "$TEST_DATA"; do
  [ -d "$dir" ] || { echo "error: $dir: no such folder (run \`make data\` or set --train_data/--valid_data)" >&2; exit 2; }
done

RUN="$OUT/$QUERY"
RUN_TRAIN="$RUN/train_data"
if [ -e "$RUN/models/round0" ]; then
  echo "error: $RUN already holds a run; remove it or choose another --out" >&2
  exit 2
fi
mkdir -p "$RUN_TRAIN" "$RUN/models" "$RUN/eval"
# Links to the base datasets keep this run's query sets apart from every other run's.
IFS='-' read -r -a BASE_NAMES <<< "$SELECT_DATA"
for name in "${BASE_NAMES[@]}"; do
  src=$(cd "$TRAIN_DATA" && pwd)/$name
  [ -e "$src" ] || { echo "error: --select_data $name: $TRAIN_DATA/$name does not exist" >&2; exit 2; }
  [ -e "$RUN_TRAIN/$name" ] || ln -s "$src" "$RUN_TRAIN/$name"
done

# shellcheck disable=SC2206
ARCH_ARGS=($ARCH)
# shellcheck disable=SC2206
EXTRA_ARGS=($TRAIN_ARGS)
COMMON=(--valid_data "$VALID_DATA" --manualSeed "$SEED" --batch_size "$BATCH_SIZE" --workers "$WORKERS"
        --total_data_usage_ratio "$LABEL_RATIO" --no_progress)

run_step() {
  echo "+ $*"
  if ! "$@"; then
    echo "error: round $round failed in: $*" >&2
    exit 1
  fi
}

evaluate_round() {
  run_step "$PYTHON" test.py --eval_data "$TEST_DATA" --saved_model "$RUN/models/round$round/best_accuracy.pth" \
    --batch_size "$BATCH_SIZE" --workers "$WORKERS" --output "$RUN/eval/round$round"
}

select="$SELECT_DATA"
ratio="$BATCH_RATIO"
for round in $(seq 0 "$ROUNDS"); do
  start=$(date +%s)
  if [ "$round" -eq 0 ]; then
    run_step "$PYTHON" train.py --train_data "$RUN_TRAIN" "${COMMON[@]}" "${ARCH_ARGS[@]}" "${EXTRA_ARGS[@]}" \
      --select_data "$select" --batch_ratio "$ratio" --calibrator "$BASE_CALIBRATOR" --mode base \
      --num_iter "$BASE_ITERS" --valInterval "$VAL_INTERVAL" --query_iter "${QUERY}_iter_0" \
      --output_dir "$RUN/models" --exp_name round0
  else
    previous="$RUN/models/round$((round - 1))/best_accuracy.pth"
    query_size=(--ratio "$QUERY_RATIO")
    [ -n "$NUM_QUERY" ] && query_size=(--num_query "$NUM_QUERY")
    run_step "$PYTHON" data_sampling.py --train_data "$RUN_TRAIN" "${COMMON[@]}" --select_data "$SELECT_DATA" \
      --batch_ratio "$BATCH_RATIO" --saved_model "$previous" --query "$QUERY" "${query_size[@]}" \
      --out_name "${QUERY}_iter_${round}" --mode al
    summary="$RUN_TRAIN/${QUERY}_iter_${round}/summary.json"
    select=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["next_select_data"])' "$summary")
    ratio=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["next_batch_ratio"])' "$summary")
    run_step "$PYTHON" train.py --train_data "$RUN_TRAIN" "${COMMON[@]}" "${ARCH_ARGS[@]}" "${EXTRA_ARGS[@]}" \
      --select_data "$select" --batch_ratio "$ratio" --calibrator "$AL_CALIBRATOR" --mode al \
      --saved_model "$previous" --num_iter "$ITERS" --valInterval "$VAL_INTERVAL" \
      --query_iter "${QUERY}_iter_${round}" --noise_ratio "$NOISE_RATIO" \
      --output_dir "$RUN/models" --exp_name "round$round"
  fi
  evaluate_round
  echo "$round $(( $(date +%s) - start ))" >> "$RUN/round_times.txt"
  run_step "$PYTHON" tools/al_report.py --run "$RUN" --query "$QUERY"
done
cat "$RUN/rounds.md"
echo "rounds: $RUN/rounds.csv  $RUN/rounds.md   learning curve: $OUT/learning_curve.png"
