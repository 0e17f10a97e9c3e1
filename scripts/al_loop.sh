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
  --pool_data NAMES       more datasets to query, '-'-separated, whole and never trained on
                          (e.g. an unlabelled LMDB; then --annotator human) ("")
  --label_ratio R         labelled fraction (--total_data_usage_ratio) (0.1)
  --query NAME            query strategy of data_sampling.py         (random)
  --base_calibrator NAME  calibrator of round 0                      (CE)
  --al_calibrator NAME    calibrator of later rounds                 (boost_soft)
  --rounds N              rounds after the base round                (3)
  --query_ratio R         share of the pool queried per round        (0.01)
  --num_query N           or a fixed number per round (overrides --query_ratio)
  --pool_subsample N      score a random N of each round's pool      (the whole pool)
                          (data_sampling.py --pool_subsample; the query must fit in N)
  --noise_ratio R         simulated annotator noise on queried labels (0)
  --noise_model NAME      the simulated annotator's errors: substitute, confusable, edit,
                          mixed (train.py --noise_model)             (substitute)
  --noise_scope SCOPE     queried: the noise touches the queried labels; all: the
                          labelled seed too (train.py, data_sampling.py) (queried)
  --annotator KIND        simulated: the pool's labels answer the queries; human: each
                          round exports an annotation package and the loop stops until
                          its answers are imported                   (simulated)
  --relabel_ratio F       share of each round's budget spent re-annotating the labelled
                          samples of lowest label quality (data_sampling.py) (0)
  --relabel_policy P      how training combines a re-annotation with the earlier label:
                          replace, or agree (keep equal answers, drop a sample whose two
                          answers differ) (data_sampling.py --relabel_policy) (replace)
  --base_model CKPT       checkpoint round 0 starts from instead of random weights; its
                          architecture and character set come from the opt.yaml beside it,
                          else --model_preset, else --arch                 ("")
  --model_preset P        architecture and character set of a --base_model without an
                          opt.yaml: a name under configs/models/ or a YAML file ("")
  --base_iters N          iterations of round 0; with --base_model, 0 takes the checkpoint
                          as it is as round 0's model                (2000)
  --iters N               iterations of each later round             (1000)
  --val_interval N        validation interval                        (500)
  --arch "FLAGS"          architecture and optimiser flags for train.py
                          ("--Transformation TPS --FeatureExtraction ResNet --SequenceModeling BiLSTM --Prediction Attn";
                          with a --base_model that describes itself: "", and no structure flags)
  --train_args "FLAGS"    extra flags for every train.py call        ("")
  --batch_size N          batch size                                 (192)
  --workers N             data-loading workers                       (min(4, usable cores))
  --seed N                --manualSeed, in -2**63 .. 2**64-1         (1111)
  --out DIR               output root; this run goes to DIR/<query>  (runs/al)

Round 0 trains on the labelled part. Round k >= 1 runs data_sampling.py with round k-1's
best_accuracy.pth (its pool: the unlabelled rest of --select_data plus all of --pool_data),
then train.py --mode al from that model on the base datasets plus every query set so far. The batch shares follow the original's rule: the base shares are halved and
the other half is split equally among the query sets (e.g. 0.5-0.5 -> 0.25-0.25-0.5 in round 1,
0.25-0.25-0.25-0.25 in round 2). With --relabel_ratio, round k also writes the relabel set
<query>_iter_<k>_relabel: later rounds select it with the share 0 (it gives samples trained on
already new labels and adds none), and data_sampling.py gets the noise flags to judge the labels
training saw. The query sets of this run live in DIR/<query>/train_data,
beside links to the base datasets, so runs of different strategies never see each other's picks.
Results: DIR/<query>/rounds.csv, rounds.md; DIR/learning_curve.png covers every run under DIR.

A query set in which every answer was unreadable counts as queried but is never trained on.
With --annotator human, round k >= 1 runs data_sampling.py --export_annotation into
DIR/<query>/train_data/<query>_iter_<k>_annotation and stops (exit 0), printing the
import_annotations.py command that turns the transcribers' answers into the query set and the
command that continues the loop (this one again); run again before the import, it prints the same
and stops. With --relabel_ratio the package also asks for a second look at the labelled samples
of lowest label quality, and the import writes their answers into the relabel set.

With --base_model, round 0 starts from the checkpoint: --base_iters 0 keeps it as it is
(validated and tested), N fine-tunes it on the labelled part (with train.py --FT when --arch or
--train_args give another character set; train.py names the re-initialised layers). Before round
0 the loop prints, and writes to DIR/<query>/charset_coverage.txt, how many labels of the base
datasets, the validation and the test data hold characters outside round 0's character set, and
which (tools/base_model.py). The checkpoint's SHA-256 is recorded with the settings: a changed
checkpoint is refused when the run is continued. --train_args "--freeze FeatureExtraction" keeps
a stage as the checkpoint has it (train.py --freeze).

Every setting is checked (train.py and data_sampling.py --dry_run included) before the first
command. Running the same command again continues the run: finished steps (a round's query set,
training, evaluation) are skipped and a killed training resumes from its last.pth. Other settings
for an existing run folder are refused; only --rounds (to add rounds) and --workers may change,
and --test_data until the first round is evaluated with it.
EOF
}

TRAIN_DATA=${TRAIN_DATA:-data/train_data_lmdb}
VALID_DATA=${VALID_DATA:-data/test_data_lmdb}
TEST_DATA=${TEST_DATA:-}
SELECT_DATA=${SELECT_DATA:-CVPR2016-NIPS2014}
POOL_DATA=${POOL_DATA:-}
BATCH_RATIO=${BATCH_RATIO:-0.5-0.5}
LABEL_RATIO=${LABEL_RATIO:-0.1}
QUERY=${QUERY:-random}
BASE_CALIBRATOR=${BASE_CALIBRATOR:-CE}
AL_CALIBRATOR=${AL_CALIBRATOR:-boost_soft}
ROUNDS=${ROUNDS:-3}
QUERY_RATIO=${QUERY_RATIO:-0.01}
NUM_QUERY=${NUM_QUERY:-}
POOL_SUBSAMPLE=${POOL_SUBSAMPLE:-}
NOISE_RATIO=${NOISE_RATIO:-0}
NOISE_MODEL=${NOISE_MODEL:-substitute}
NOISE_SCOPE=${NOISE_SCOPE:-queried}
ANNOTATOR=${ANNOTATOR:-simulated}
RELABEL_RATIO=${RELABEL_RATIO:-0}
RELABEL_POLICY=${RELABEL_POLICY:-replace}
BASE_MODEL=${BASE_MODEL:-}
MODEL_PRESET=${MODEL_PRESET:-}
BASE_ITERS=${BASE_ITERS:-2000}
ITERS=${ITERS:-1000}
VAL_INTERVAL=${VAL_INTERVAL:-500}
ARCH_GIVEN=${ARCH+given}  # a --base_model that describes itself replaces the default architecture
ARCH=${ARCH:---Transformation TPS --FeatureExtraction ResNet --SequenceModeling BiLSTM --Prediction Attn}
TRAIN_ARGS=${TRAIN_ARGS:-}
BATCH_SIZE=${BATCH_SIZE:-192}
WORKERS=${WORKERS:-}
SEED=${SEED:-1111}
OUT=${OUT:-runs/al}
PYTHON=${PYTHON:-python}
INVOCATION=("$0" "$@")  # printed back as the command that continues a run waiting for its annotators

while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --*)
      [ $# -ge 2 ] || { echo "error: $1 needs a value" >&2; exit 2; }
      var=$(printf '%s' "${1#--}" | tr '[:lower:]' '[:upper:]')
      case "$var" in
        TRAIN_DATA|VALID_DATA|TEST_DATA|SELECT_DATA|POOL_DATA|BATCH_RATIO|LABEL_RATIO|QUERY|BASE_CALIBRATOR|\
        AL_CALIBRATOR|ROUNDS|QUERY_RATIO|NUM_QUERY|POOL_SUBSAMPLE|NOISE_RATIO|NOISE_MODEL|NOISE_SCOPE|ANNOTATOR|\
        RELABEL_RATIO|\
        RELABEL_POLICY|BASE_ITERS|ITERS|VAL_INTERVAL|ARCH|BASE_MODEL|MODEL_PRESET|\
        TRAIN_ARGS|BATCH_SIZE|WORKERS|SEED|OUT|PYTHON) printf -v "$var" '%s' "$2"
          [ "$var" != ARCH ] || ARCH_GIVEN=given ;;
        *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
      esac
      shift 2 ;;
    *) echo "error: unexpected argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
TEST_DATA=${TEST_DATA:-$VALID_DATA}

fail() { echo "error: $*" >&2; exit 2; }
is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }
is_ratio() {  # a number in (0, 1], or [0, 1] with a third argument
  "$PYTHON" -c 'import math, sys
v = float(sys.argv[1])
ok = math.isfinite(v) and (0 <= v if len(sys.argv) > 2 else 0 < v) and v <= 1
sys.exit(0 if ok else 1)' "$@" 2>/dev/null
}

if [ -z "$WORKERS" ]; then
  # options.default_workers() without importing torch: the smaller of 4 and the cores this process may use
  WORKERS=$("$PYTHON" -c 'import os
try:
    cores = len(os.sched_getaffinity(0))
except (AttributeError, OSError):
    cores = os.cpu_count() or 1
print(max(1, min(4, cores)))') || fail "cannot run $PYTHON to count the cores; give --workers"
fi

# Every setting is checked before the first command: a typo must not surface after hours of
# base-round training.
is_int "$ROUNDS" || fail "--rounds $ROUNDS: give a whole number of rounds after the base round (0 or more)"
if [ -n "$BASE_MODEL" ] && [ "$BASE_ITERS" = 0 ]; then
  :  # round 0 is the checkpoint as it is
else
  { is_int "$BASE_ITERS" && [ "$BASE_ITERS" -ge 1 ]; } || \
    fail "--base_iters $BASE_ITERS: give a whole number of at least 1 (0 only with --base_model: round 0 is then the checkpoint)"
fi
for pair in "ITERS iters" "VAL_INTERVAL val_interval" "BATCH_SIZE batch_size"; do
  read -r var flag <<< "$pair"
  { is_int "${!var}" && [ "${!var}" -ge 1 ]; } || fail "--$flag ${!var}: give a whole number of at least 1"
done
is_int "$WORKERS" || fail "--workers $WORKERS: give a whole number (0: load in the main process)"
# train.py's --manualSeed range (utils.SEED_RANGE: torch's); bash's own numbers stop at 2**63-1
{ [[ "$SEED" =~ ^-?[0-9]+$ ]] && "$PYTHON" -c 'import sys; sys.exit(not -2**63 <= int(sys.argv[1]) < 2**64)' "$SEED"; } || \
  fail "--seed $SEED: give a whole number in -2**63 .. 2**64-1 (train.py --manualSeed, the range torch accepts)"
is_ratio "$LABEL_RATIO" || fail "--label_ratio $LABEL_RATIO: give a share in (0, 1]"
is_ratio "$NOISE_RATIO" closed || fail "--noise_ratio $NOISE_RATIO: give a share in [0, 1]"
is_ratio "$RELABEL_RATIO" closed || fail "--relabel_ratio $RELABEL_RATIO: give a share of the budget in [0, 1]"
known=$("$PYTHON" -c 'from annotators import annotator_noise; print(", ".join(annotator_noise.NOISE_MODELS))') || \
  fail "cannot read the noise models of annotators/annotator_noise.py; run this script from the repository root"
[[ ", $known, " == *", $NOISE_MODEL, "* ]] || fail "--noise_model $NOISE_MODEL: unknown; choose one of $known"
case "$NOISE_SCOPE" in queried|all) ;; *) fail "--noise_scope $NOISE_SCOPE: choose queried or all" ;; esac
known=$("$PYTHON" -c 'from active_learning import relabel_policies; print(relabel_policies.known())') || \
  fail "cannot read the relabel policies of active_learning/relabel_policies.py; run this script from the repository root"
[[ ", $known, " == *", $RELABEL_POLICY, "* ]] || fail "--relabel_policy $RELABEL_POLICY: unknown; choose one of $known"
case "$ANNOTATOR" in
  simulated) ;;
  human) "$PYTHON" -c 'import sys; sys.exit(float(sys.argv[1]) != 0)' "$NOISE_RATIO" || \
           fail "--noise_ratio $NOISE_RATIO: simulated annotator noise has no place with --annotator human; drop it" ;;
  *) fail "--annotator $ANNOTATOR: unknown; choose simulated or human" ;;
esac
if [ -n "$NUM_QUERY" ]; then
  { is_int "$NUM_QUERY" && [ "$NUM_QUERY" -ge 1 ]; } || fail "--num_query $NUM_QUERY: give a whole number of at least 1"
else
  is_ratio "$QUERY_RATIO" || fail "--query_ratio $QUERY_RATIO: give a share in (0, 1]"
fi
if [ -n "$POOL_SUBSAMPLE" ]; then
  { is_int "$POOL_SUBSAMPLE" && [ "$POOL_SUBSAMPLE" -ge 1 ]; } || \
    fail "--pool_subsample $POOL_SUBSAMPLE: give a whole number of at least 1 (pool samples scored per round)"
fi
for dir in "$TRAIN_DATA" "$VALID_DATA" "$TEST_DATA"; do
  [ -d "$dir" ] || fail "$dir: no such folder (run \`make data\` or set --train_data/--valid_data)"
done
# test.py first reads --test_data after the base round: an LMDB-less folder must fail here, not
# hours later (lmdb alone: importing dataset, i.e. torch, takes seconds)
problem=$("$PYTHON" -c 'import os, sys, lmdb
for flag, folder in zip(sys.argv[1::2], sys.argv[2::2]):
    leaves = []
    for top, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        leaves += [top] if "data.mdb" in files else []
    if not leaves:
        sys.exit(f"--{flag} {folder}: holds no LMDB (no data.mdb below it); give the folder of labelled LMDBs")
    for leaf in leaves:
        try:
            env = lmdb.open(leaf, readonly=True, lock=False)
            with env.begin() as txn:
                unlabelled = txn.get(b"unlabelled") is not None
            env.close()
        except lmdb.Error as err:
            sys.exit(f"--{flag} {folder}: cannot read the LMDB {leaf} ({err}); rebuild it with create_lmdb_dataset.py")
        if unlabelled:
            sys.exit(f"--{flag} {folder}: {leaf} is an unlabelled LMDB, which cannot be scored; give labelled LMDBs")' \
  valid_data "$VALID_DATA" test_data "$TEST_DATA" 2>&1) || fail "$(tail -n1 <<< "${problem:-cannot read --valid_data and --test_data}")"
# names become path components of links and of the run folder: a '/' or '..' would write outside --out
plain_name() { [[ -n "$2" && "$2" != */* && "$2" != .* ]] || fail "$1 $2: give a plain name (no '/', not starting with '.')"; }
plain_name --query "$QUERY"
IFS='-' read -r -a BASE_NAMES <<< "$SELECT_DATA"
for name in "${BASE_NAMES[@]}"; do
  plain_name --select_data "$name"
  [ -e "$TRAIN_DATA/$name" ] || fail "--select_data $name: $TRAIN_DATA/$name does not exist"
done
POOL_NAMES=()
[ -z "$POOL_DATA" ] || IFS='-' read -r -a POOL_NAMES <<< "$POOL_DATA"
for name in "${POOL_NAMES[@]}"; do
  [ -n "$name" ] || fail "--pool_data $POOL_DATA: an empty name; separate the names by single '-'"
  plain_name --pool_data "$name"
  [ -e "$TRAIN_DATA/$name" ] || fail "--pool_data $name: $TRAIN_DATA/$name does not exist"
  [[ " ${BASE_NAMES[*]} " != *" $name "* ]] || \
    fail "--pool_data $name: named by --select_data too; a pool dataset is never trained on, name it in one of the two"
done
if [ "$ANNOTATOR" = simulated ] && [ ${#POOL_NAMES[@]} -gt 0 ]; then
  # a simulated annotator answers with the pool's labels, which an unlabelled LMDB does not have
  # the key lmdb_format.UNLABELLED_KEY, read with lmdb alone: importing dataset (torch) takes seconds
  unlabelled=$("$PYTHON" -c 'import os, sys, lmdb
def unlabelled(folder):
    for top, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if "data.mdb" in files:
            env = lmdb.open(top, readonly=True, lock=False)
            with env.begin() as txn:
                found = txn.get(b"unlabelled") is not None
            env.close()
            if found:
                return True
    return False
print(" ".join(n for n in sys.argv[2:] if unlabelled(os.path.join(sys.argv[1], n))))' \
    "$TRAIN_DATA" "${POOL_NAMES[@]}" 2>/dev/null) || fail "--pool_data $POOL_DATA: cannot read these datasets under $TRAIN_DATA"
  [ -z "$unlabelled" ] || fail "--pool_data $POOL_DATA: ${unlabelled// /, } holds no labels for a simulated annotator to answer with; pass --annotator human"
fi

# round 0 from a checkpoint: its architecture flags (before --arch's), its hash, --FT when round 0
# has another character set (tools/base_model.py checks the combination)
BASE_ARCH_ARGS=()
BASE_START=()
BASE_SHA256=""
if [ -n "$BASE_MODEL" ]; then
  [ -f "$BASE_MODEL" ] || fail "--base_model $BASE_MODEL: no such file"
  BASE_MODEL=$(cd "$(dirname "$BASE_MODEL")" && pwd)/$(basename "$BASE_MODEL")
  [ -n "$ARCH_GIVEN" ] || [ -f "$(dirname "$BASE_MODEL")/opt.yaml" ] || [ -n "$MODEL_PRESET" ] || ARCH_GIVEN=given
  [ -n "$ARCH_GIVEN" ] || ARCH=""
  base_info=$(mktemp)
  if ! "$PYTHON" tools/base_model.py --base_model "$BASE_MODEL" --model_preset "$MODEL_PRESET" --arch "$ARCH" \
       --train_args "$TRAIN_ARGS" --base_iters "$BASE_ITERS" --print0 > "$base_info"; then
    rm -f "$base_info"
    exit 2
  fi
  mapfile -d '' -t fields < "$base_info"
  rm -f "$base_info"
  BASE_SHA256=${fields[0]}
  BASE_START=(--saved_model "$BASE_MODEL")
  [ -z "${fields[1]}" ] || BASE_START+=("${fields[1]}")
  BASE_ARCH_ARGS=("${fields[@]:3}")
elif [ -n "$MODEL_PRESET" ]; then
  fail "--model_preset $MODEL_PRESET: describes the checkpoint of --base_model; give --base_model too, or leave it out"
fi

RUN="$OUT/$QUERY"
RUN_TRAIN="$RUN/train_data"
SETTINGS_FILE="$RUN/loop_settings.txt"
# What fixes the experiment; --rounds may grow and --workers may change when a run is continued.
settings() {
  local var
  for var in TRAIN_DATA VALID_DATA TEST_DATA SELECT_DATA BATCH_RATIO LABEL_RATIO QUERY BASE_CALIBRATOR \
             AL_CALIBRATOR QUERY_RATIO NUM_QUERY NOISE_RATIO BASE_ITERS ITERS VAL_INTERVAL ARCH TRAIN_ARGS \
             BATCH_SIZE SEED; do
    printf '%s=%s\n' "$var" "${!var}"
  done
  # recorded only when not the default, so that a run made before the option still matches
  [ "$NOISE_MODEL" = substitute ] || printf 'NOISE_MODEL=%s\n' "$NOISE_MODEL"
  [ "$NOISE_SCOPE" = queried ] || printf 'NOISE_SCOPE=%s\n' "$NOISE_SCOPE"
  [ "$ANNOTATOR" = simulated ] || printf 'ANNOTATOR=%s\n' "$ANNOTATOR"
  [ "$RELABEL_RATIO" = 0 ] || printf 'RELABEL_RATIO=%s\n' "$RELABEL_RATIO"
  [ "$RELABEL_POLICY" = replace ] || printf 'RELABEL_POLICY=%s\n' "$RELABEL_POLICY"
  [ -z "$POOL_SUBSAMPLE" ] || printf 'POOL_SUBSAMPLE=%s\n' "$POOL_SUBSAMPLE"
  [ -z "$POOL_DATA" ] || printf 'POOL_DATA=%s\n' "$POOL_DATA"
  if [ -n "$BASE_MODEL" ]; then
    printf 'BASE_MODEL=%s\n' "$BASE_MODEL"
    [ -z "$MODEL_PRESET" ] || printf 'MODEL_PRESET=%s\n' "$MODEL_PRESET"
    printf 'BASE_ARCH=%s\n' "${BASE_ARCH_ARGS[*]@Q}"
    printf 'BASE_MODEL_SHA256=%s\n' "$BASE_SHA256"
  fi
}

# shellcheck disable=SC2206
ARCH_ARGS=("${BASE_ARCH_ARGS[@]}" $ARCH)
# shellcheck disable=SC2206
EXTRA_ARGS=($TRAIN_ARGS)
COMMON=(--valid_data "$VALID_DATA" --manualSeed "$SEED" --batch_size "$BATCH_SIZE" --workers "$WORKERS"
        --total_data_usage_ratio "$LABEL_RATIO" --no_progress)
query_size=(--ratio "$QUERY_RATIO")
pool_args=()
[ -z "$POOL_DATA" ] || pool_args=(--pool_data "$POOL_DATA")
export_args=()
[ "$ANNOTATOR" = human ] && export_args=(--export_annotation "$RUN_TRAIN/${QUERY}_iter_1_annotation")
[ -n "$NUM_QUERY" ] && query_size=(--num_query "$NUM_QUERY")
# the labels a round judges are those training saw: data_sampling.py gets training's noise flags
relabel_args=(--relabel_ratio "$RELABEL_RATIO" --relabel_policy "$RELABEL_POLICY" --noise_ratio "$NOISE_RATIO"
              --noise_model "$NOISE_MODEL" --noise_scope "$NOISE_SCOPE")
[ -n "$POOL_SUBSAMPLE" ] && query_size+=(--pool_subsample "$POOL_SUBSAMPLE")

if [ -f "$SETTINGS_FILE" ]; then
  recorded_sha=$(sed -n 's/^BASE_MODEL_SHA256=//p' "$SETTINGS_FILE")
  if [ -n "$BASE_MODEL" ] && [ -n "$recorded_sha" ] && [ "$recorded_sha" != "$BASE_SHA256" ] && \
     grep -qxF "BASE_MODEL=$BASE_MODEL" "$SETTINGS_FILE"; then
    fail "--base_model $BASE_MODEL: not the checkpoint $RUN started from (sha256 ${BASE_SHA256:0:12}..., recorded ${recorded_sha:0:12}...); put the original back, or use another --out"
  fi
  # a setting recorded on one side only (NOISE_MODEL, when not the default) counts as changed too
  changed=$(diff <(settings) "$SETTINGS_FILE" | sed -n 's/^[<>] \([A-Z_]*\)=.*/\1/p' | awk '!seen[$0]++' | \
            tr '[:upper:]' '[:lower:]' | sed 's/^/--/' | paste -sd' ' -) || true
  # A setting that has produced nothing yet is a correction, not another experiment: --test_data
  # until a round's evaluation exists (docs/DESIGN.md, "Correcting a setting on rerun").
  refused=() corrected=()
  for flag in $changed; do
    if [ "$flag" = --test_data ] && ! compgen -G "$RUN/eval/round*/results.json" > /dev/null; then
      corrected+=("$flag")
    else
      refused+=("$flag")
    fi
  done
  [ ${#refused[@]} -eq 0 ] || fail "$RUN holds a run made with other settings (${refused[*]}); use the same ones to continue it, or another --out"
  if [ ${#corrected[@]} -gt 0 ]; then
    settings > "$SETTINGS_FILE.tmp" && mv "$SETTINGS_FILE.tmp" "$SETTINGS_FILE"
    echo "${corrected[*]} corrected: no round was evaluated with the earlier value"
  fi
  echo "continuing the run in $RUN (finished steps are skipped)"
elif [ -e "$RUN/models/round0" ]; then
  fail "$RUN holds a run without $SETTINGS_FILE (made by an older version); continue it by hand or choose another --out"
else
  # the run folder is named after the strategy, whether or not a round queries (--rounds 0); a run
  # continued later holds the name checked here (it is one of its recorded settings)
  known=$("$PYTHON" -c 'from active_learning import query_strategies; print(", ".join(query_strategies.STRATEGIES))') || \
    fail "cannot read the query strategies of active_learning/query_strategies.py; run this script from the repository root"
  [[ ", $known, " == *", $QUERY, "* ]] || fail "--query $QUERY: unknown strategy; choose one of $known"
  # The scripts' own checks, without training or scoring, in a scratch root that links the base
  # datasets (the run folder is made only once they pass).
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  for name in "${BASE_NAMES[@]}" "${POOL_NAMES[@]}"; do ln -s "$(cd "$TRAIN_DATA" && pwd)/$name" "$scratch/$name"; done
  check() {
    local out
    if ! out=$("$@" 2>&1 >/dev/null); then
      { grep -m1 'error:' <<< "$out" || echo "error: $* failed: $(tail -n1 <<< "$out")"; } >&2
      exit 2
    fi
  }
  check "$PYTHON" train.py --dry_run --train_data "$scratch" "${COMMON[@]}" "${ARCH_ARGS[@]}" "${EXTRA_ARGS[@]}" \
    --select_data "$SELECT_DATA" --batch_ratio "$BATCH_RATIO" --calibrator "$BASE_CALIBRATOR" --mode base \
    --num_iter "$BASE_ITERS" --valInterval "$VAL_INTERVAL" --output_dir "$scratch/models" "${BASE_START[@]}"
  if [ "$ROUNDS" -ge 1 ]; then
    check "$PYTHON" train.py --dry_run --train_data "$scratch" "${COMMON[@]}" "${ARCH_ARGS[@]}" "${EXTRA_ARGS[@]}" \
      --select_data "$SELECT_DATA" --batch_ratio "$BATCH_RATIO" --calibrator "$AL_CALIBRATOR" --mode al \
      --noise_ratio "$NOISE_RATIO" --noise_model "$NOISE_MODEL" --noise_scope "$NOISE_SCOPE" --num_iter "$ITERS" \
      --valInterval "$VAL_INTERVAL" \
      --output_dir "$scratch/models"
    check "$PYTHON" data_sampling.py --dry_run --train_data "$scratch" "${COMMON[@]}" "${ARCH_ARGS[@]}" \
      --select_data "$SELECT_DATA" --batch_ratio "$BATCH_RATIO" --saved_model "$scratch/none.pth" \
      --query "$QUERY" "${query_size[@]}" "${relabel_args[@]}" --out_name "${QUERY}_iter_1" "${pool_args[@]}" \
      "${export_args[@]}"
  fi
  rm -rf "$scratch"
  trap - EXIT
  mkdir -p "$RUN_TRAIN" "$RUN/models" "$RUN/eval"
  settings > "$SETTINGS_FILE.tmp" && mv "$SETTINGS_FILE.tmp" "$SETTINGS_FILE"
fi
mkdir -p "$RUN_TRAIN" "$RUN/models" "$RUN/eval"
# Links to the base and pool datasets keep this run's query sets apart from every other run's.
for name in "${BASE_NAMES[@]}" "${POOL_NAMES[@]}"; do
  src=$(cd "$TRAIN_DATA" && pwd)/$name
  [ -e "$RUN_TRAIN/$name" ] || ln -s "$src" "$RUN_TRAIN/$name"
done

run_step() {
  echo "+ $*"
  if ! "$@"; then
    echo "error: round $round failed in: $*" >&2
    exit 1
  fi
}

# A round's training is done when train_summary.json exists; a killed one continues from its
# last.pth; one killed before its first checkpoint starts again (train.py starts a fresh log).
train_round() {
  local folder="$RUN/models/round$round"
  if [ -f "$folder/train_summary.json" ]; then
    echo "round $round: trained already ($folder)"
    return
  fi
  local resume=()
  [ -f "$folder/last.pth" ] && resume=(--resume "$folder/last.pth")
  run_step "$PYTHON" train.py --train_data "$RUN_TRAIN" "${COMMON[@]}" "${ARCH_ARGS[@]}" "${EXTRA_ARGS[@]}" \
    --output_dir "$RUN/models" --exp_name "round$round" "${resume[@]}" "$@"
}

evaluate_round() {
  local model="$RUN/models/round$round/best_accuracy.pth" results="$RUN/eval/round$round/results.json"
  if [ -f "$results" ] && [ "$results" -nt "$model" ]; then
    echo "round $round: evaluated already ($results)"
    return
  fi
  run_step "$PYTHON" test.py --eval_data "$TEST_DATA" --saved_model "$model" \
    --batch_size "$BATCH_SIZE" --workers "$WORKERS" --output "$RUN/eval/round$round"
}

# The loop cannot go on without the answers: say what to do and stop (a pause, not a failure).
wait_for_annotators() {
  local package=$1
  echo
  echo "round $round waits for its annotators: the package is $package"
  echo "  1. correct $package/gt.txt (or label its tasks.json in Label Studio and export the project as JSON)"
  echo "  2. import the answers (add --answers FILE for a Label Studio JSON export or a file,label CSV):"
  printf '     %q import_annotations.py --package %q --train_data %q\n' "$PYTHON" "$package" "$RUN_TRAIN"
  echo "  3. continue the loop:"
  printf '     '; printf '%q ' "${INVOCATION[@]}"; echo
  exit 0
}

record_time() {  # one line per round: its number and the seconds of its last (or only) run
  local file="$RUN/round_times.txt"
  { [ -f "$file" ] && awk -v r="$round" '$1 != r' "$file"; echo "$round $1"; } > "$file.tmp"
  mv "$file.tmp" "$file"
}

for round in $(seq 0 "$ROUNDS"); do
  start=$(date +%s)
  if [ "$round" -eq 0 ]; then
    if [ -n "$BASE_MODEL" ] && [ ! -f "$RUN/charset_coverage.txt" ]; then
      "$PYTHON" tools/base_model.py --base_model "$BASE_MODEL" --model_preset "$MODEL_PRESET" --arch "$ARCH" \
        --train_args "$TRAIN_ARGS" --base_iters "$BASE_ITERS" --coverage --train_data "$TRAIN_DATA" \
        --select_data "$SELECT_DATA" --valid_data "$VALID_DATA" --test_data "$TEST_DATA" \
        > "$RUN/charset_coverage.txt.tmp" || exit 2
      mv "$RUN/charset_coverage.txt.tmp" "$RUN/charset_coverage.txt"
    fi
    [ -z "$BASE_MODEL" ] || cat "$RUN/charset_coverage.txt"
    train_round --select_data "$SELECT_DATA" --batch_ratio "$BATCH_RATIO" --calibrator "$BASE_CALIBRATOR" \
      --mode base --num_iter "$BASE_ITERS" --valInterval "$VAL_INTERVAL" --query_iter "${QUERY}_iter_0" \
      "${BASE_START[@]}"
  else
    previous="$RUN/models/round$((round - 1))/best_accuracy.pth"
    summary="$RUN_TRAIN/${QUERY}_iter_${round}/summary.json"
    if [ -f "$summary" ]; then
      echo "round $round: queried already ($RUN_TRAIN/${QUERY}_iter_${round})"
    elif [ "$ANNOTATOR" = human ]; then
      package="$RUN_TRAIN/${QUERY}_iter_${round}_annotation"
      if [ -f "$package/package.json" ]; then
        echo "round $round: exported already ($package); its answers are not imported yet"
      else
        run_step "$PYTHON" data_sampling.py --train_data "$RUN_TRAIN" "${COMMON[@]}" --select_data "$SELECT_DATA" \
          --batch_ratio "$BATCH_RATIO" --saved_model "$previous" --query "$QUERY" "${query_size[@]}" \
          "${relabel_args[@]}" --out_name "${QUERY}_iter_${round}" "${pool_args[@]}" --export_annotation "$package" \
          --mode al
      fi
      wait_for_annotators "$package"
    else
      run_step "$PYTHON" data_sampling.py --train_data "$RUN_TRAIN" "${COMMON[@]}" --select_data "$SELECT_DATA" \
        --batch_ratio "$BATCH_RATIO" --saved_model "$previous" --query "$QUERY" "${query_size[@]}" \
        "${relabel_args[@]}" --out_name "${QUERY}_iter_${round}" "${pool_args[@]}" --mode al
    fi
    select=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["next_select_data"])' "$summary")
    ratio=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["next_batch_ratio"])' "$summary")
    train_round --select_data "$select" --batch_ratio "$ratio" --calibrator "$AL_CALIBRATOR" --mode al \
      --saved_model "$previous" --num_iter "$ITERS" --valInterval "$VAL_INTERVAL" \
      --query_iter "${QUERY}_iter_${round}" --noise_ratio "$NOISE_RATIO" --noise_model "$NOISE_MODEL" \
      --noise_scope "$NOISE_SCOPE"
  fi
  evaluate_round
  record_time $(( $(date +%s) - start ))
  run_step "$PYTHON" tools/al_report.py --run "$RUN" --query "$QUERY"
done
cat "$RUN/rounds.md"
echo "rounds: $RUN/rounds.csv  $RUN/rounds.md   learning curve: $OUT/learning_curve.png"
