"""Compare query strategies and calibrators over several seeds: a grid of active-learning loops
with a shared round-0 model per seed, resumable at round granularity, with tables and plots.

    python tools/experiment.py --out runs/compare --queries random,uncali,cali \\
        --calibrators CE,boost_soft --noise 0,0.3 [--noise_models substitute,mixed] \
        [--relabel_ratios 0,0.25] [--acquisitions topk,softrank] [--sampling_args "--acquisition_beta 2"] \
        --seeds 1111,2222,3333 [loop settings]
    python tools/experiment.py --grid configs/compare.yaml --out runs/compare
    python tools/experiment.py --combine runs/compare,runs/power,runs/coreset --out runs/all

A cell is (query strategy, calibrator of the active-learning rounds, annotator noise ratio,
annotator noise model, re-annotation share of the budget, batch acquisition, seed); each is one loop
as scripts/al_loop.sh runs it. The random strategy gets the default acquisition (topk) only, the
baseline of every acquisition; a strategy without a score (cali) skips power and softmax. At noise ratio 0 the
noise model changes nothing, so that ratio gets one cell (under the first model given). Round 0 is
trained once per (seed, base calibrator), on clean labels, and every cell of that seed starts from
it, so the comparison is paired. The loop settings are those of scripts/al_loop.sh; a --grid YAML
file holds the same keys (the flags' names without the dashes; a list may be a YAML list or a
comma-separated string); flags given on the command line override it, relative paths are relative
to the current folder.

--base_model CKPT starts round 0 of every seed from a checkpoint instead of random weights (its
architecture and character set from the opt.yaml beside it, else --model_preset NAME|FILE, else
--arch): --base_iters 0 takes it as it is (validated and tested: round 0 is the checkpoint, which
every strategy continues from), --base_iters N fine-tunes it on the labelled seed set first (with
train.py --FT when --arch/--train_args give another character set: the characters both sets hold
keep their outputs, and its log names what was re-initialised). Before round 0 the tool prints, and writes to <out>/charset_coverage.txt, how many
labels of the base datasets, the validation and the test data hold characters outside round 0's
character set, and which. The checkpoint's path, architecture and SHA-256 are recorded: a changed
checkpoint is refused on resume, and --base_from and --combine compare them.

Work order: every base model first, then round 1 of every cell, round 2 of every cell, and so on;
the tables and plots in --out are rewritten after every finished round. --jobs N runs N rounds at
once in that order, each as soon as what it starts from is done (a cell's round 1 waits for its
seed's base model, round k for its round k-1): N = the cores, with one thread per child (the
children get OMP_NUM_THREADS=1 unless it is set), fills a CPU; every job uses the same GPUs. Running the same command
again skips finished rounds and continues a killed one (a training from its last.pth). Settings
are recorded in <out>/experiment.json (one written before --noise_models, --relabel_ratios,
--acquisitions or --sampling_args existed means substitute, 0, topk and none); only --rounds (to grow), --workers and the grid's lists (to gain values) may change for
an existing --out, and --test_data until a round has been evaluated with it. Exit status: 0 when every cell finished, 1 when a
cell failed (the others still ran), 2 for bad settings (nothing is run), 130 when interrupted.

--combine DIR,DIR,... runs nothing: it writes the tables and plots of several finished (or
partly finished) experiment folders together into --out, so that strategies run in follow-up
folders (another --sampling_args, a grid linked with --base_from) are compared with one random
baseline: labels saved and paired intervals. The folders must agree on every setting that changes
what a round means (round 0's, --iters, --num_query/--query_ratio) and hold the same round-0 model
per seed (linked with --base_from, or identical files); each strategy is named with its folder's
--sampling_args, and a cell found in several folders (a copied one) is taken from the folder where it
finished the most rounds. --out gets comparison.csv/.md, summary.csv/.md, the plots and
combined.json (the folders and which cells came from where).

Layout of --out:
  experiment.json                        the settings (and the grid, as it grew)
  base/seed<S>-<base calibrator>/        train_data/ (links to the base datasets), models/round0/,
                                         eval/round0/results.json, logs/, round_times.json
  cells/<query>-<calibrator>-noise<r>[-<noise model>][-relabel<f>][-<acquisition>]-seed<S>/
                                         (each named only when not the default: substitute, 0, topk)
                                         train_data/ (links and this cell's <query>_iter_<k> query
                                         sets and <query>_iter_<k>_relabel relabel sets), models/round<k>/, eval/round<k>/, logs/round<k>-
                                         {query,train,test}.log, round_times.json
  comparison.csv/.md, summary.csv/.md, learning_curves.png, noise.png (more than one noise ratio)
  pairs.csv/.md                          paired differences (accuracy, ECE; 95% t-intervals over
                                         seeds) of every two strategies that differ in one setting
  comparison_valid.csv/.md, summary_valid.csv/.md, pairs_valid.csv/.md   the same tables on the validation data (the
                                         accuracy and ECE train.py kept its checkpoint by): choose
                                         settings on these, the test tables only report
"""
import argparse
import datetime
import fcntl
import glob
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import dataset  # noqa: E402
from measurement import comparison  # noqa: E402
import options  # noqa: E402
import pretrained  # noqa: E402
from utils import UserError  # noqa: E402

# name: (default, help); the loop settings carry scripts/al_loop.sh's defaults.
SETTINGS = {
    "queries": ("random,uncali", "query strategies, comma-separated (data_sampling.py --query)"),
    "calibrators": ("boost_soft", "calibrators of the active-learning rounds, comma-separated"),
    "noise": ("0", "annotator noise ratios of the active-learning rounds (train.py --noise_ratio), comma-separated"),
    "noise_models": ("substitute", "annotator noise models of the active-learning rounds (train.py --noise_model), "
                                   "comma-separated"),
    "relabel_ratios": ("0", "shares of each round's budget spent re-annotating the labelled samples of lowest label "
                            "quality (data_sampling.py --relabel_ratio), comma-separated"),
    "acquisitions": ("topk", "batch acquisitions (data_sampling.py --acquisition), comma-separated"),
    "seeds": ("1111", "seeds (--manualSeed, each in -2**63 .. 2**64-1), comma-separated; one round-0 model per "
                      "seed"),
    "base_calibrator": ("CE", "calibrator of round 0 (trained once per seed, clean labels)"),
    "base_model": ("", "checkpoint round 0 starts from instead of random weights; its architecture and character "
                       "set come from the opt.yaml beside it, else --model_preset, else --arch (which then keeps only "
                       "optimiser flags and, to fine-tune onto another character set, character flags)"),
    "model_preset": ("", "architecture and character set of a --base_model without an opt.yaml beside it: a name "
                         "under configs/models/ (e.g. easyocr_english_g2) or a YAML file"),
    "train_data": ("data/train_data_lmdb", "training LMDB root"),
    "valid_data": ("data/test_data_lmdb", "validation LMDB root used during training"),
    "test_data": ("", "LMDB root evaluated by test.py after each round (default: --valid_data)"),
    "select_data": ("CVPR2016-NIPS2014", "base datasets, '-'-separated"),
    "batch_ratio": ("0.5-0.5", "their batch shares"),
    "label_ratio": ("0.1", "labelled fraction of each base dataset (--total_data_usage_ratio)"),
    "rounds": ("3", "active-learning rounds after round 0"),
    "query_ratio": ("0.01", "share of the pool queried per round"),
    "num_query": ("", "or a fixed number queried per round (overrides --query_ratio)"),
    "base_iters": ("2000", "iterations of round 0; with --base_model, 0 takes the checkpoint as it is as round "
                           "0's model (validated and tested, not trained) and N fine-tunes it on the labelled seed "
                           "set (--FT when the character set differs from the checkpoint's)"),
    "iters": ("1000", "iterations of each later round"),
    "noise_scope": ("queried", "which labels the simulated annotator of the active-learning rounds gets wrong: "
                               "queried (the queried words) or all (the labelled seed too); train.py and "
                               "data_sampling.py --noise_scope. Round 0 trains on clean labels either way"),
    "al_start": ("warm", "what each later round trains from: warm (the previous round's model, as the original "
                         "does) or fresh (random weights, or --base_model when given, on every label so far; give --iters about "
                         "--base_iters)"),
    "val_interval": ("500", "validation interval"),
    "batch_size": ("192", "batch size"),
    "workers": (str(options.default_workers()), "data-loading workers; default: the smaller of 4 and the cores "
                                                "this process may use"),
    "arch": ("--Transformation TPS --FeatureExtraction ResNet --SequenceModeling BiLSTM --Prediction Attn",
             "architecture and optimiser flags for train.py (with a --base_model that describes itself: empty "
             "unless given, and no structure flags)"),
    "train_args": ("", "extra flags for every train.py call"),
    "sampling_args": ("", "extra flags for every data_sampling.py call, e.g. '--acquisition_beta 2'"),
}
GRID = ("queries", "calibrators", "noise", "noise_models", "relabel_ratios", "acquisitions", "seeds")
# The defaults of the grid axes added later: a cell of them keeps the name it had before the axis
DEFAULT_NOISE_MODEL = "substitute"  # train.py's default
DEFAULT_RELABEL_RATIO = 0.0  # data_sampling.py's defaults
DEFAULT_ACQUISITION = "topk"
AL_STARTS = ("warm", "fresh")
# recorded beside the settings, derived from --base_model and --model_preset: the checkpoint's
# architecture flags and its content hash (a resumed experiment refuses another checkpoint)
DERIVED = ("base_arch", "base_model_sha256")
# data_sampling.py flags the grid sets per cell, which --sampling_args may not give
CELL_SAMPLING_FLAGS = ("--relabel_ratio", "--acquisition", "--query", "--noise_ratio", "--noise_model",
                       "--noise_scope", "--out_name", "--train_data", "--saved_model", "--select_data",
                       "--batch_ratio", "--manualSeed")
MAY_CHANGE = ("rounds", "workers")
FIXED = tuple(name for name in SETTINGS if name not in GRID + MAY_CHANGE) + DERIVED
EXPERIMENT_FILE = "experiment.json"
LOCK_FILE = ".experiment.lock"
TAIL_LINES = 20


class ConfigError(Exception):
    """A setting the user can fix: one `error:` line, exit status 2."""


class StepFailed(Exception):
    def __init__(self, step, log):
        super().__init__(step)
        self.step, self.log = step, log


# ---------------------------------------------------------------------------------------------
# settings


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    parser.add_argument("--out", help="output folder of the experiment (required, here or in --grid)")
    parser.add_argument("--grid", help="YAML file with any of the settings below (flags override it)")
    parser.add_argument("--base_from", metavar="DIR",
                        help="take the finished round-0 models of another experiment folder whose round-0 "
                             "settings are the same (linked, not copied) instead of training them again")
    parser.add_argument("--jobs", metavar="N", default="1",
                        help="rounds run at once, each in its own child processes (default: 1); results "
                             "do not depend on it")
    parser.add_argument("--combine", metavar="DIR,DIR,...",
                        help="run nothing: write the tables and plots of these experiment folders together into "
                             "--out (same round settings and round-0 models; see below)")
    for name, (default, text) in SETTINGS.items():
        shown = f" (default: {default})" if default else ""
        parser.add_argument(f"--{name}", default=None, metavar=name.upper(), help=text + shown)
    return parser


def read_grid_file(path):
    """The settings in a --grid YAML file, as strings (lists joined by commas)."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"--grid {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except UnicodeDecodeError as err:
        raise ConfigError(f"--grid {path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") \
            from None
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"--grid {path}: not readable as YAML ({str(err).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--grid {path}: give a mapping of settings (e.g. 'queries: [random, uncali]')")
    known = ("out",) + tuple(SETTINGS)
    values = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"--grid {path}: unknown setting '{key}'; known: {', '.join(known)}")
        if value is None:
            continue
        if isinstance(value, bool) or isinstance(value, dict):
            raise ConfigError(f"--grid {path}: '{key}: {value}' is not a value of --{key}")
        if isinstance(value, list):
            if any(isinstance(v, (bool, list, dict)) or v is None for v in value):
                raise ConfigError(f"--grid {path}: '{key}' must list plain values")
            value = ",".join(str(v) for v in value)
        values[key] = str(value)
    return values


def _list(name, text):
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise ConfigError(f"--{name} '{text}': give one or more comma-separated values, none empty")
    seen = set()
    for item in items:
        if item in seen:
            raise ConfigError(f"--{name} {text}: '{item}' appears twice")
        seen.add(item)
    return items


def _int(name, text, minimum, what, maximum=None):
    if not re.fullmatch(r"-?[0-9]+", text.strip()):
        raise ConfigError(f"--{name} {text}: give {what}")
    value = int(text)
    if value < minimum or (maximum is not None and value > maximum):
        raise ConfigError(f"--{name} {text}: give {what}")
    return value


def _ratio(name, text, closed=False):
    what = "a share in [0, 1]" if closed else "a share in (0, 1]"
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--{name} {text}: give {what}") from None
    if not (math.isfinite(value) and (0.0 <= value if closed else 0.0 < value) and value <= 1.0):
        raise ConfigError(f"--{name} {text}: give {what}")
    return value


def _split_flags(name, text):
    try:
        return shlex.split(text)
    except ValueError as err:
        raise ConfigError(f"--{name} {text!r}: {err}") from None


def _flag_value(flags, flag):
    for i, item in enumerate(flags):
        if item == flag and i + 1 < len(flags):
            return flags[i + 1]
        if item.startswith(flag + "="):
            return item.split("=", 1)[1]
    return None


def resolve_base_model(raw, arch_given):
    """The --base_model settings: (base_model, model_preset, base_arch, sha256, arch text). With a
    checkpoint that describes itself (opt.yaml or preset), --arch not given is empty (the
    checkpoint's architecture replaces the default one) and one that changes its structure is
    refused."""
    base_model, preset = raw["base_model"].strip(), raw["model_preset"].strip()
    arch_text = raw["arch"].strip()
    if not base_model:
        if preset:
            raise ConfigError(f"--model_preset {preset}: describes the checkpoint of --base_model; give --base_model "
                              f"too, or leave it out")
        return "", "", "", "", arch_text
    try:
        values, _ = pretrained.checkpoint_architecture(base_model, preset)
    except UserError as err:
        raise ConfigError(str(err)) from None
    if values and not arch_given:
        arch_text = ""
    try:
        pretrained.check_start(base_model, values, _split_flags("arch", arch_text) + _split_flags(
            "train_args", raw["train_args"]), _int("base_iters", raw["base_iters"], 0, "0 or more iterations"),
            f"--arch {arch_text!r} / --train_args {raw['train_args'].strip()!r}")
    except UserError as err:
        raise ConfigError(str(err)) from None
    if preset and (preset.endswith((".yaml", ".yml")) or os.sep in preset):
        preset = os.path.abspath(preset)
    return (os.path.abspath(base_model), preset, shlex.join(pretrained.architecture_flags(values)),
            pretrained.file_sha256(base_model), arch_text)


def model_args(s):
    """The architecture and optimiser flags of every train.py call: the checkpoint's (--base_model),
    then --arch's (later flags win)."""
    return shlex.split(s.get("base_arch") or "") + shlex.split(s["arch"])


def base_charsets(s):
    """(the checkpoint's character set, round 0's) with --base_model described by an opt.yaml or a
    preset; (None, None) otherwise."""
    if not s.get("base_arch"):
        return None, None
    try:
        own, _ = pretrained.parse_architecture(shlex.split(s["base_arch"]))
        run, _ = pretrained.parse_architecture(model_args(s) + shlex.split(s["train_args"]))
    except UserError as err:
        raise ConfigError(f"--arch {s['arch']!r}: {err}") from None
    return own["character"], run["character"]


def base_start_args(s):
    """train.py flags of round 0 with --base_model: start from it, with --FT when round 0 has
    another character set than the checkpoint (its prediction layer is then re-initialised)."""
    if not s.get("base_model"):
        return []
    own, run = base_charsets(s)
    return ["--saved_model", s["base_model"]] + (["--FT"] if own is not None and own != run else [])


def resolve_settings(raw, arch_given=True):
    """Check every raw (string) setting and return the normalized settings (what experiment.json
    holds): lists for the grid, numbers, absolute data paths. ConfigError on the first bad one.
    `arch_given`: whether --arch was given (else, with a self-describing --base_model, it is
    empty rather than the default architecture)."""
    import calibrators
    from active_learning import query_strategies

    s = {}
    queries = _list("queries", raw["queries"])
    for query in queries:
        if query not in query_strategies.STRATEGIES:
            raise ConfigError(f"--queries {query}: unknown strategy; choose from {', '.join(query_strategies.STRATEGIES)}")
    s["queries"] = queries
    _split_flags("arch", raw["arch"])
    (s["base_model"], s["model_preset"], s["base_arch"], s["base_model_sha256"],
     arch_text) = resolve_base_model(raw, arch_given)
    raw = {**raw, "arch": arch_text}
    arch = shlex.split(s["base_arch"]) + _split_flags("arch", raw["arch"])
    _split_flags("train_args", raw["train_args"])
    prediction = _flag_value(arch, "--Prediction")
    known = calibrators.names_for(prediction) if prediction in ("CTC", "Attn") else list(calibrators.CALIBRATORS)
    for flag, names in (("calibrators", _list("calibrators", raw["calibrators"])),
                        ("base_calibrator", [raw["base_calibrator"].strip()])):
        for name in names:
            if name not in calibrators.CALIBRATORS:
                raise ConfigError(f"--{flag} {name}: unknown calibrator; choose from {', '.join(known)}")
            if name not in known:
                raise ConfigError(f"--{flag} {name}: has no form for --Prediction {prediction}; "
                                  f"choose from {', '.join(known)}")
    s["calibrators"] = _list("calibrators", raw["calibrators"])
    s["base_calibrator"] = raw["base_calibrator"].strip()
    noise = [_ratio("noise", item, closed=True) for item in _list("noise", raw["noise"])]
    if len(set(noise)) != len(noise):
        raise ConfigError(f"--noise {raw['noise']}: a ratio appears twice")
    s["noise"] = noise
    from annotators import annotator_noise

    s["noise_models"] = _list("noise_models", raw["noise_models"])
    for model in s["noise_models"]:
        if model not in annotator_noise.NOISE_MODELS:
            raise ConfigError(f"--noise_models {model}: unknown noise model; choose from "
                              f"{', '.join(annotator_noise.NOISE_MODELS)}")
    s["relabel_ratios"] = [_ratio("relabel_ratios", item, closed=True)
                           for item in _list("relabel_ratios", raw["relabel_ratios"])]
    if len(set(s["relabel_ratios"])) != len(s["relabel_ratios"]):
        raise ConfigError(f"--relabel_ratios {raw['relabel_ratios']}: a ratio appears twice")
    from active_learning import acquisition

    s["acquisitions"] = _list("acquisitions", raw["acquisitions"])
    for name in s["acquisitions"]:
        if name not in acquisition.ACQUISITIONS:
            raise ConfigError(f"--acquisitions {name}: unknown acquisition; choose from "
                              f"{', '.join(acquisition.ACQUISITIONS)}")
    s["seeds"] = [_int("seeds", item, -2 ** 63, "whole numbers in -2**63 .. 2**64-1 (the range torch accepts)",
                       maximum=2 ** 64 - 1) for item in _list("seeds", raw["seeds"])]
    if len(set(s["seeds"])) != len(s["seeds"]):
        raise ConfigError(f"--seeds {raw['seeds']}: a seed appears twice")
    s["rounds"] = _int("rounds", raw["rounds"], 0, "a whole number of rounds after the base round (0 or more)")
    for name in ("iters", "val_interval", "batch_size"):
        s[name] = _int(name, raw[name], 1, "a whole number of at least 1")
    if s["base_model"]:
        s["base_iters"] = _int("base_iters", raw["base_iters"], 0, "0 (round 0 = --base_model as it is) or more "
                                                                   "iterations of fine-tuning")
    else:
        s["base_iters"] = _int("base_iters", raw["base_iters"], 1, "a whole number of at least 1 (0 only with "
                                                                   "--base_model: round 0 is then the checkpoint)")
    s["workers"] = _int("workers", raw["workers"], 0, "a whole number (0: load in the main process)")
    s["al_start"] = raw["al_start"].strip()
    s["noise_scope"] = raw["noise_scope"].strip()
    if s["noise_scope"] not in dataset.NOISE_SCOPES:
        raise ConfigError(f"--noise_scope {raw['noise_scope']}: choose from {', '.join(dataset.NOISE_SCOPES)}")
    if s["al_start"] not in AL_STARTS:
        raise ConfigError(f"--al_start {raw['al_start']}: choose from {', '.join(AL_STARTS)}")
    s["label_ratio"] = _ratio("label_ratio", raw["label_ratio"])
    if raw["num_query"].strip():
        s["num_query"] = _int("num_query", raw["num_query"], 1, "a whole number of at least 1")
        s["query_ratio"] = None
    else:
        s["num_query"] = None
        s["query_ratio"] = _ratio("query_ratio", raw["query_ratio"])
    for name in ("train_data", "valid_data", "test_data"):
        path = raw[name].strip() or (raw["valid_data"].strip() if name == "test_data" else "")
        if not os.path.isdir(path):
            raise ConfigError(f"--{name} {path}: no such folder (run `make data` or set --{name})")
        s[name] = os.path.abspath(path)
    for name in ("valid_data", "test_data"):  # the dry runs never read --test_data: test.py does, after round 0
        check_scored_data(name, s[name])
    names = raw["select_data"].strip().split("-")
    if not raw["select_data"].strip() or any(not n for n in names):
        raise ConfigError(f"--select_data {raw['select_data']}: give '-'-separated dataset names")
    for name in names:
        if "/" in name or name.startswith("."):  # each becomes a link's name in a cell's train_data
            raise ConfigError(f"--select_data {name}: give a plain name (no '/', not starting with '.')")
        if not os.path.exists(os.path.join(s["train_data"], name)):
            raise ConfigError(f"--select_data {name}: {os.path.join(s['train_data'], name)} does not exist")
    s["select_data"] = raw["select_data"].strip()
    shares = raw["batch_ratio"].strip().split("-")
    try:
        ok = len(shares) == len(names) and all(math.isfinite(float(v)) and float(v) > 0 for v in shares)
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"--batch_ratio {raw['batch_ratio']}: give one positive share per --select_data "
                          f"name ({len(names)}), '-'-separated")
    s["batch_ratio"] = raw["batch_ratio"].strip()
    s["arch"] = raw["arch"].strip()
    s["train_args"] = raw["train_args"].strip()
    sampling = _split_flags("sampling_args", raw["sampling_args"])
    for item in sampling:
        if item.split("=", 1)[0] in CELL_SAMPLING_FLAGS:
            raise ConfigError(f"--sampling_args {raw['sampling_args']!r}: {item.split('=', 1)[0]} is set by the "
                              f"experiment itself (a grid axis or the loop); drop it")
    s["sampling_args"] = raw["sampling_args"].strip()
    return s


def check_scored_data(name, path):
    """--valid_data and --test_data must hold labelled LMDBs; ConfigError naming the first problem."""
    from data_layer import leaf_selection
    from data_layer import lmdb_format
    import utils

    try:
        leaves = lmdb_format.find_lmdbs(path)
        if not leaves:
            raise ConfigError(f"--{name} {path}: holds no LMDB (no data.mdb below it); give the folder of labelled "
                              f"LMDBs")
        leaf_selection.refuse_unlabelled(path, leaves, f"--{name}")
    except utils.UserError as err:
        raise ConfigError(str(err)) from None


def parse(argv):
    """`(out, settings)` from the command line and --grid; ConfigError when something is wrong."""
    args = get_args_parser().parse_args(argv)
    raw = {name: default for name, (default, _) in SETTINGS.items()}
    out = None
    given = set()
    if args.grid:
        values = read_grid_file(args.grid)
        out = values.pop("out", None)
        raw.update(values)
        given.update(values)
    for name in SETTINGS:
        if getattr(args, name) is not None:
            raw[name] = getattr(args, name)
            given.add(name)
    out = args.out if args.out is not None else out
    if not out or not out.strip():
        raise ConfigError("--out: give the experiment's output folder (on the command line or in --grid)")
    return os.path.abspath(out), resolve_settings(raw, arch_given="arch" in given)


def _comparable(name, value):
    return _split_flags(name, value) if name in ("arch", "train_args", "sampling_args", "base_arch") else value


def upgrade_recorded(recorded):
    """experiment.json's settings as this version reads them: one written before --noise_models,
    --relabel_ratios, --acquisitions, --sampling_args, --al_start or --noise_scope existed ran every
    cell with the defaults."""
    return {"base_model": "", "model_preset": "", **{name: "" for name in DERIVED}, **recorded,
            "noise_models": recorded.get("noise_models") or [DEFAULT_NOISE_MODEL],
            "relabel_ratios": recorded.get("relabel_ratios") or [DEFAULT_RELABEL_RATIO],
            "acquisitions": recorded.get("acquisitions") or [DEFAULT_ACQUISITION],
            "sampling_args": recorded.get("sampling_args") or "", "al_start": recorded.get("al_start") or "warm",
            "noise_scope": recorded.get("noise_scope") or "queried"}


def setting_label(name):
    """How a message names a setting: its flag, or what a derived one stands for."""
    return {"base_arch": "--base_model's architecture (its opt.yaml or --model_preset)",
            "base_model_sha256": "--base_model's content"}.get(name, f"--{name}")


# Fixed settings whose outputs may not exist yet, with the test of whether one does: a setting
# that has produced nothing is corrected on a rerun rather than refused (docs/DESIGN.md).
CORRECTABLE = {"test_data": lambda out: bool(glob.glob(os.path.join(glob.escape(out), "*", "*", "eval", "round*",
                                                                      "results.json")))}


def corrections(out, recorded, settings):
    """The names of the fixed settings that differ from `recorded` but have produced nothing in
    `out` yet (CORRECTABLE), so that the new value replaces the recorded one."""
    recorded = upgrade_recorded(recorded)
    return {name for name, produced in CORRECTABLE.items()
            if _comparable(name, recorded.get(name)) != _comparable(name, settings[name]) and not produced(out)}


def merge_with_recorded(out, recorded, settings, corrected=()):
    """The settings to continue an experiment with: `recorded` (experiment.json's) with the grid's
    new values appended, --rounds/--workers and the `corrected` settings (`corrections`) taken from
    `settings`. ConfigError naming every setting that may not change like this."""
    recorded = {**upgrade_recorded(recorded), **{name: settings[name] for name in corrected}}
    if (recorded["base_model"] and recorded["base_model"] == settings["base_model"]
            and recorded["base_model_sha256"] != settings["base_model_sha256"]):
        raise ConfigError(f"--base_model {settings['base_model']}: not the checkpoint {out} started from (sha256 "
                          f"{settings['base_model_sha256'][:12]}..., recorded {recorded['base_model_sha256'][:12]}...); "
                          f"put the original back, or start another --out")
    changed = []
    for name in FIXED:
        if _comparable(name, recorded.get(name)) != _comparable(name, settings[name]):
            changed.append(setting_label(name))
    if settings["rounds"] < recorded["rounds"]:
        changed.append(f"--rounds (fewer than {recorded['rounds']})")
    merged = dict(recorded)
    for name in GRID:
        dropped = [v for v in recorded[name] if v not in settings[name]]
        if dropped:
            changed.append(f"--{name} (without {','.join(comparison.format_value(v) for v in dropped)})")
        merged[name] = list(recorded[name]) + [v for v in settings[name] if v not in recorded[name]]
    if changed:
        raise ConfigError(f"{out} holds an experiment made with other settings ({', '.join(changed)}); use the "
                          f"same ones to continue it (only --rounds may grow, --workers may change and "
                          f"--queries/--calibrators/--noise/--noise_models/--relabel_ratios/--acquisitions/--seeds "
                          f"may gain values), or another "
                          f"--out")
    merged["rounds"], merged["workers"] = settings["rounds"], settings["workers"]
    return merged


# ---------------------------------------------------------------------------------------------
# child processes


def _libc():
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


LIBC = _libc() if sys.platform.startswith("linux") else None
PR_SET_PDEATHSIG = 1


def _die_with_parent(parent):
    """preexec_fn: the child gets SIGKILL when this process dies (however it dies), so a killed
    experiment never leaves a training running beside the next one."""

    def setup():
        if LIBC is not None:
            LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return setup


def child_env():
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def stop_child(process, grace=5):
    """Stop the child: a Ctrl-C in the terminal reached it too, so first give it `grace` seconds to
    finish on its own (train.py saves last.pth); then interrupt it (SIGINT, as Ctrl-C would), and
    kill it when it has not stopped a minute later."""
    for signal_to_send, timeout in ((None, grace), (signal.SIGINT, 60), (signal.SIGKILL, None)):
        if process.poll() is not None:
            return
        if signal_to_send is not None:
            process.send_signal(signal_to_send)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            continue


class Children:
    """The children the rounds in flight run, so that an interrupt of the main thread can stop them
    all at once; once stopping, no new child starts."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running = set()
        self.stopping = False

    def start(self, command, f):
        with self.lock:
            if self.stopping:
                raise KeyboardInterrupt
            process = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=f, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent(os.getpid()))
            self.running.add(process)
            return process

    def reset(self):
        with self.lock:
            self.stopping = False

    def finished(self, process):
        with self.lock:
            self.running.discard(process)
            return self.stopping

    def stop_all(self):
        """Stop every running child, all within the same grace period (stop_child's)."""
        with self.lock:
            self.stopping = True
            processes = list(self.running)
        stoppers = [threading.Thread(target=stop_child, args=(process,)) for process in processes]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join()


CHILDREN = Children()


def run_logged(command, log):
    """Run `command` (cwd = the repository) with stdout and stderr appended to `log`; True when it
    exits 0. Ctrl-C stops the child and propagates; so does CHILDREN.stop_all() from another thread."""
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"=== {datetime.datetime.now().isoformat(timespec='seconds')} $ {shlex.join(command)}\n")
        f.flush()
        process = CHILDREN.start(command, f)
        try:
            code = process.wait()
        except BaseException:
            stop_child(process)
            CHILDREN.finished(process)
            f.write(f"=== interrupted (exit status {process.returncode})\n")
            raise
        if CHILDREN.finished(process):
            f.write(f"=== interrupted (exit status {code})\n")
            raise KeyboardInterrupt
        f.write(f"=== exit status {code}\n")
    return code == 0


def run_checks(commands, parallel=2, follow=None):
    """Run `(name, command)` pairs, `parallel` at a time, output captured; `follow(name, status,
    output)` may return more pairs to run once one finishes. Returns {name: (status, output)}."""
    results, pending, running = {}, list(commands), []
    try:
        while pending or running:
            while pending and len(running) < parallel:
                name, command = pending.pop(0)
                output = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
                process = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=output,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           preexec_fn=_die_with_parent(os.getpid()))
                running.append((name, process, output))
            time.sleep(0.05)
            for entry in [e for e in running if e[1].poll() is not None]:
                running.remove(entry)
                name, process, output = entry
                output.seek(0)
                results[name] = (process.returncode, output.read())
                output.close()
                if follow is not None:
                    pending += follow(name, process.returncode, results[name][1])
    except BaseException:
        for _, process, output in running:
            stop_child(process)
            output.close()
        raise
    return results


def script(name):
    return [sys.executable, os.path.join(REPO, name)]


def common_args(s, seed):
    return ["--valid_data", s["valid_data"], "--manualSeed", str(seed), "--batch_size", str(s["batch_size"]),
            "--workers", str(s["workers"]), "--total_data_usage_ratio", repr(s["label_ratio"]), "--no_progress"]


def query_size_args(s):
    return ["--num_query", str(s["num_query"])] if s["num_query"] is not None else ["--ratio", repr(s["query_ratio"])]


def link_base_datasets(s, root):
    os.makedirs(root, exist_ok=True)
    for name in s["select_data"].split("-"):
        link = os.path.join(root, name)
        if not os.path.lexists(link):
            os.symlink(os.path.join(s["train_data"], name), link)


def first_error_line(output, command):
    for line in output.splitlines():
        if "error:" in line:
            return line[line.index("error:"):]
    last = next((line for line in reversed(output.splitlines()) if line.strip()), "no output")
    return f"error: {shlex.join(command)} failed: {last}"


def sampling_cell_args(s, acquisition, relabel_ratio, noise, noise_model):
    """The data_sampling.py flags of a cell: the grid's and --sampling_args (training's noise
    flags, so that a re-annotation judges and redraws the labels training saw)."""
    return ["--acquisition", acquisition, "--relabel_ratio", repr(float(relabel_ratio)), "--noise_ratio",
            repr(float(noise)), "--noise_model", noise_model, "--noise_scope", s.get("noise_scope") or "queried",
            *shlex.split(s.get("sampling_args") or "")]


def preflight(s, base, calibrators, queries):
    """The scripts' own checks without training or scoring, in a scratch root that links the base
    datasets: data_sampling.py --dry_run per query strategy and acquisition and, when train.py has
    --dry_run, the
    base round and an active-learning round per calibrator. ConfigError with the first error."""
    scratch = tempfile.mkdtemp(prefix="experiment-check-")
    try:
        link_base_datasets(s, scratch)
        arch, extra = model_args(s), shlex.split(s["train_args"])
        seed = s["seeds"][0]
        selection = ["--select_data", s["select_data"], "--batch_ratio", s["batch_ratio"]]
        checks = [("help", script("train.py") + ["--help"])]
        for query in queries:
            for acquisition in acquisitions_for(s, query):
                checks.append((f"query {query} {acquisition}", script("data_sampling.py") + [
                    "--dry_run", "--train_data", scratch, *common_args(s, seed), *arch, *selection,
                    "--saved_model", os.path.join(scratch, "none.pth"), "--query", query, *query_size_args(s),
                    "--out_name", f"{query}_iter_1",
                    *sampling_cell_args(s, acquisition, max(s.get("relabel_ratios") or [DEFAULT_RELABEL_RATIO]),
                                        max(s["noise"]), s["noise_models"][-1])]))
        train_checks = []

        def follow(name, code, output):
            if name != "help" or code != 0 or "--dry_run" not in output:
                return []
            train = script("train.py") + ["--dry_run", "--train_data", scratch, *common_args(s, seed), *arch, *extra,
                                          *selection, "--output_dir", os.path.join(scratch, "models")]
            if base:
                train_checks.append(("base", train + ["--calibrator", s["base_calibrator"], "--mode", "base",
                                                      "--num_iter", str(s["base_iters"]),
                                                      "--valInterval", str(s["val_interval"]),
                                                      *base_start_args(s)]))
            for calibrator in calibrators:
                train_checks.append((f"calibrator {calibrator}", train + [
                    "--calibrator", calibrator, "--mode", "al", "--noise_ratio", repr(max(s["noise"])),
                    "--noise_model", s["noise_models"][-1], "--noise_scope", s["noise_scope"],
                    "--num_iter", str(s["iters"]), "--valInterval", str(s["val_interval"])]))
            return train_checks

        results = run_checks(checks, follow=follow)
        for name, command in checks[1:] + train_checks:
            code, output = results[name]
            if code != 0:
                raise ConfigError(first_error_line(output, command)[len("error: "):])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# the grid


def noise_text(noise):
    return comparison.format_value(float(noise))


class Unit:
    """A base model (round 0 of one seed) or a cell (rounds 1.. of one loop)."""

    def __init__(self, out, seed, base_calibrator, query=None, calibrator=None, noise=None, base=None,
                 noise_model=DEFAULT_NOISE_MODEL, relabel_ratio=DEFAULT_RELABEL_RATIO, acquisition=DEFAULT_ACQUISITION):
        self.seed, self.query, self.calibrator, self.noise, self.base = seed, query, calibrator, noise, base
        self.noise_model, self.relabel_ratio, self.acquisition = noise_model, float(relabel_ratio), acquisition
        if query is None:
            self.name = f"seed{seed}-{base_calibrator}"
            self.folder = os.path.join(out, "base", self.name)
            self.label = f"base {self.name}"
        else:
            # the default model is not named, so that a grid made before noise models (or growing
            # a second model later) keeps its cell folders
            model = "" if noise_model == DEFAULT_NOISE_MODEL else f"-{noise_model}"
            relabel = "" if self.relabel_ratio == DEFAULT_RELABEL_RATIO else f"-relabel{noise_text(relabel_ratio)}"
            batch = "" if acquisition == DEFAULT_ACQUISITION else f"-{acquisition}"
            self.name = f"{query}-{calibrator}-noise{noise_text(noise)}{model}{relabel}{batch}-seed{seed}"
            self.folder = os.path.join(out, "cells", self.name)
            self.label = f"cell {self.name}"
        self.root = os.path.join(self.folder, "train_data")

    def path(self, *parts):
        return os.path.join(self.folder, *parts)

    def model_dir(self, k):
        if k == 0 and self.base is not None:
            return self.base.model_dir(0)
        return self.path("models", f"round{k}")

    def model(self, k):
        return os.path.join(self.model_dir(k), "best_accuracy.pth")

    def results(self, k):
        if k == 0 and self.base is not None:
            return self.base.results(0)
        return self.path("eval", f"round{k}", "results.json")

    def query_set(self, k):
        return os.path.join(self.root, f"{self.query}_iter_{k}")

    def log(self, k, step):
        return self.path("logs", f"round{k}-{step}.log")

    def trained(self, k):
        return os.path.isfile(os.path.join(self.model_dir(k), "train_summary.json"))

    def evaluated(self, k):
        results, model = self.results(k), self.model(k)
        return (os.path.isfile(results) and os.path.isfile(model)
                and os.stat(results).st_mtime_ns >= os.stat(model).st_mtime_ns)

    def finished(self, k):
        return self.trained(k) and self.evaluated(k)

    def record_time(self, k, seconds):
        path = self.path("round_times.json")
        times = read_json(path) if os.path.isfile(path) else {}
        times[str(k)] = round(seconds, 1)
        comparison.atomic_write(path, json.dumps(times, indent=1, sort_keys=True) + "\n")

    def times(self):
        path = self.path("round_times.json")
        return {int(k): v for k, v in read_json(path).items()} if os.path.isfile(path) else {}


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def noise_cells(s):
    """(noise ratio, noise model) pairs of the grid: at ratio 0 no label is corrupted, whatever the
    model, so it gets one pair, with the first model (the grid's lists only grow at their end, so
    that cell stays the same one when models are added)."""
    models = s.get("noise_models") or [DEFAULT_NOISE_MODEL]
    return [(noise, model) for noise in s["noise"] for model in models if noise > 0 or model == models[0]]


def acquisitions_for(s, query):
    """The acquisitions of a query strategy's cells: the baseline (random) gets the default alone
    (a random ranking is drawn at random however the batch is taken, and the comparison takes it as
    every acquisition's baseline); another strategy every acquisition of the grid it can run (power
    and softmax weigh by a score, which e.g. cali has not)."""
    from active_learning import acquisition
    from active_learning import query_strategies
    from utils import UserError

    if query == comparison.BASELINE:
        return [DEFAULT_ACQUISITION]
    usable = []
    for name in s.get("acquisitions") or [DEFAULT_ACQUISITION]:
        try:
            acquisition.check(name, 1.0, query_strategies.STRATEGIES[query])
        except UserError:
            continue
        usable.append(name)
    return usable


def build_units(out, s):
    bases = {seed: Unit(out, seed, s["base_calibrator"]) for seed in s["seeds"]}
    cells = [Unit(out, seed, s["base_calibrator"], query, calibrator, noise, bases[seed], noise_model, relabel_ratio,
                  acquisition)
             for query in s["queries"] for calibrator in s["calibrators"] for noise, noise_model in noise_cells(s)
             for relabel_ratio in s.get("relabel_ratios") or [DEFAULT_RELABEL_RATIO]
             for acquisition in acquisitions_for(s, query) for seed in s["seeds"]]
    return bases, cells


def train_round(unit, k, s, arguments):
    """train.py for round k: skipped when finished, resumed from last.pth when killed after a
    checkpoint, started afresh when killed before one."""
    folder = unit.model_dir(k)
    if unit.trained(k):
        return
    resume = []
    if os.path.isfile(os.path.join(folder, "last.pth")):
        resume = ["--resume", os.path.join(folder, "last.pth")]
    elif os.path.exists(folder):
        shutil.rmtree(folder)
    command = script("train.py") + ["--train_data", unit.root, *common_args(s, unit.seed), *model_args(s),
                                    *shlex.split(s["train_args"]), "--output_dir", os.path.dirname(folder),
                                    "--exp_name", os.path.basename(folder), *resume, *arguments]
    if not run_logged(command, unit.log(k, "train")):
        raise StepFailed("train", unit.log(k, "train"))


def evaluate_round(unit, k, s):
    if unit.evaluated(k):
        return
    command = script("test.py") + ["--eval_data", s["test_data"], "--saved_model", unit.model(k),
                                   "--batch_size", str(s["batch_size"]), "--workers", str(s["workers"]),
                                   "--output", os.path.dirname(unit.results(k))]
    if not run_logged(command, unit.log(k, "test")):
        raise StepFailed("test", unit.log(k, "test"))


def run_round(unit, k, s):
    """Every step of round k of a unit that is not done yet."""
    link_base_datasets(s, unit.root)
    selection = ["--select_data", s["select_data"], "--batch_ratio", s["batch_ratio"]]
    if unit.base is None:
        train_round(unit, 0, s, [*selection, "--calibrator", s["base_calibrator"], "--mode", "base",
                                 "--num_iter", str(s["base_iters"]), "--valInterval", str(s["val_interval"]),
                                 *base_start_args(s)])
    else:
        previous = unit.model(k - 1)
        summary = os.path.join(unit.query_set(k), "summary.json")
        if not os.path.isfile(summary):
            command = script("data_sampling.py") + [
                "--train_data", unit.root, *common_args(s, unit.seed), *selection, "--saved_model", previous,
                "--query", unit.query, *query_size_args(s), "--out_name", os.path.basename(unit.query_set(k)),
                "--mode", "al", *sampling_cell_args(s, unit.acquisition, unit.relabel_ratio, unit.noise,
                                                     unit.noise_model)]
            if not run_logged(command, unit.log(k, "query")):
                raise StepFailed("query", unit.log(k, "query"))
        picked = read_json(summary)
        # fresh: from where round 0 started (random weights, or --base_model), on every label so far
        warm_start = ["--saved_model", previous] if s["al_start"] == "warm" else base_start_args(s)
        train_round(unit, k, s, ["--select_data", picked["next_select_data"], "--batch_ratio",
                                 picked["next_batch_ratio"], *warm_start, "--calibrator", unit.calibrator,
                                 "--mode", "al", "--num_iter", str(s["iters"]),
                                 "--valInterval", str(s["val_interval"]), "--query_iter",
                                 os.path.basename(unit.query_set(k)), "--noise_ratio", repr(unit.noise),
                                 "--noise_model", unit.noise_model, "--noise_scope", s["noise_scope"]])
    evaluate_round(unit, k, s)


def round_record(unit, k):
    trained = read_json(os.path.join(unit.model_dir(k), "train_summary.json"))
    total = read_json(unit.results(k))["total"]

    def number(value):
        return float("nan") if value is None else float(value)

    best = trained.get("best") or {}  # the validation figures of the checkpoint kept
    return {"query": unit.query, "calibrator": unit.calibrator, "noise": unit.noise,
            "noise_model": unit.noise_model, "relabel_ratio": unit.relabel_ratio, "acquisition": unit.acquisition,
            "seed": unit.seed,
            "round": k, "labelled": trained["labelled_total"], "accuracy": number(total.get("accuracy")),
            "ece": number(total.get("ece")), "valid_accuracy": number(best.get("accuracy")),
            "valid_ece": number(best.get("ece"))}


def cell_records(cell, bases, s):
    """The records of a cell's finished rounds, from 0 up to its first unfinished one (round 0
    from its seed's base model), each with the experiment's --sampling_args."""
    records = []
    if not bases[cell.seed].finished(0):
        return records
    for k in range(s["rounds"] + 1):
        if not cell.finished(k):
            break
        records.append({**round_record(cell, k), "sampling_args": s.get("sampling_args") or ""})
    return records


def collect_records(bases, cells, s):
    """One record per finished round of every cell (`cell_records`)."""
    return [record for cell in cells for record in cell_records(cell, bases, s)]


def write_tables_and_plots(out, records):
    """The test-set tables and plots, and the same tables on the validation data (`*_valid`: the
    figures to choose settings by; the test sets only report). Returns the test summary rows."""
    comparison_rows, summary_rows = comparison.write_tables(out, records)
    valid = [{**r, "accuracy": r["valid_accuracy"], "ece": r["valid_ece"]} for r in records]
    comparison.write_tables(out, valid, suffix="_valid")
    comparison.plot_learning_curves(comparison_rows, os.path.join(out, "learning_curves.png"))
    comparison.plot_noise(summary_rows, os.path.join(out, "noise.png"))
    return summary_rows


def write_reports(out, bases, cells, s):
    return write_tables_and_plots(out, collect_records(bases, cells, s))


def duration(seconds):
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Counts finished rounds and estimates the time left: the mean recorded seconds of a base
    round times the base rounds left, plus the mean of an active-learning round (of every round
    while none has been timed) times the active-learning rounds left, divided by the jobs."""

    def __init__(self, bases, cells, s, jobs=1):
        self.start, self.jobs = time.time(), jobs
        self.total = len(bases) + len(cells) * s["rounds"]
        self.base_times = [t for unit in bases.values() for t in unit.times().values()]
        self.al_times = [t for unit in cells for t in unit.times().values()]
        self.done = sum(unit.finished(0) for unit in bases.values()) + sum(
            cell.finished(k) for cell in cells for k in range(1, s["rounds"] + 1))

    def estimate(self, base_left, al_left):
        timed = self.base_times + self.al_times
        if not timed:
            return None
        per_al = self.al_times or timed
        per_base = self.base_times or timed
        serial = base_left * sum(per_base) / len(per_base) + al_left * sum(per_al) / len(per_al)
        return serial / min(self.jobs, max(base_left + al_left, 1))

    def finished(self, unit, k, seconds, base_left, al_left):
        (self.base_times if unit.base is None else self.al_times).append(seconds)
        self.done += 1
        total = read_json(unit.results(k))["total"]
        accuracy = "n/a" if total.get("accuracy") is None else f"{total['accuracy']:.2f}%"
        ece = "" if total.get("ece") is None else f" (ECE {total['ece']:.4f})"
        left = self.estimate(base_left, al_left)
        left = "done" if base_left + al_left == 0 else ("?" if left is None else f"about {duration(left)} left")
        print(f"[{self.done}/{self.total}] {unit.label} round {k}: test accuracy {accuracy}{ece} in "
              f"{duration(seconds)}; elapsed {duration(time.time() - self.start)}, {left}", flush=True)


def report_failure(unit, k, step_failed):
    lines = []
    if os.path.isfile(step_failed.log):
        with open(step_failed.log, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()[-TAIL_LINES:]
    print(f"{unit.label} failed in round {k}: see {step_failed.log}", file=sys.stderr)
    for line in lines:
        print(f"  | {line}", file=sys.stderr)
    sys.stderr.flush()


def run_grid(out, s, jobs=1):
    """Every base model, then the cells round by round, `jobs` rounds at once: each starts as soon
    as the round it continues is done. Returns the names of the failed cells, the summary rows and
    the cells."""
    bases, cells = build_units(out, s)
    CHILDREN.reset()
    progress = Progress(bases, cells, s, jobs)
    failed = {}  # unit name -> (round, log of the failed step)
    reporting = threading.Lock()  # the progress lines, the tables and `failed` are shared by the jobs
    if progress.done:
        print(f"continuing {out}: {progress.done} of {progress.total} rounds finished already", flush=True)

    order = [(base, 0) for base in bases.values()] + [(cell, k) for k in range(1, s["rounds"] + 1) for cell in cells]
    # counted when reported, not when its files appear: a job may finish while another reports
    reported = {(unit.name, k) for unit, k in order if unit.finished(k)}

    def rounds_left():
        left = [k for unit, k in order if (unit.name, k) not in reported and unit.name not in failed]
        return left.count(0), len(left) - left.count(0)

    def attempt(unit, k):
        start = time.time()
        try:
            run_round(unit, k, s)
        except StepFailed as err:
            with reporting:
                failed[unit.name] = (k, err.log)
                report_failure(unit, k, err)
            return
        seconds = time.time() - start
        with reporting:
            unit.record_time(k, seconds)
            reported.add((unit.name, k))
            progress.finished(unit, k, seconds, *rounds_left())
            write_reports(out, bases, cells, s)

    def continues(unit, k):
        """The unit and round that round k of `unit` starts from (None for a base model)."""
        return None if k == 0 else (unit.base, 0) if k == 1 else (unit, k - 1)

    def can_start(unit, k):
        before = continues(unit, k)
        return before is None or before[0].finished(before[1])

    pending = [(unit, k) for unit, k in order if (unit.name, k) not in reported]
    running = {}
    with futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        try:
            while pending or running:
                with reporting:
                    for unit, k in list(pending):
                        before = continues(unit, k)
                        if unit.name in failed or (before is not None and before[0].name in failed):
                            pending.remove((unit, k))
                            if unit.name not in failed:  # its base model failed
                                failed[unit.name] = failed[before[0].name]
                                print(f"cell {unit.name} failed in round 0: see {failed[unit.name][1]}",
                                      file=sys.stderr, flush=True)
                while len(running) < jobs:
                    ready = next((task for task in pending if can_start(*task)), None)
                    if ready is None:
                        break
                    pending.remove(ready)
                    running[pool.submit(attempt, *ready)] = ready
                if not running:
                    break  # what is left waits for a round that did not finish
                done, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
                for future in done:
                    del running[future]
                    future.result()
        except BaseException:
            CHILDREN.stop_all()  # the jobs' steps then stop too, and the pool is waited for
            raise
    summary = write_reports(out, bases, cells, s)
    return [cell.name for cell in cells if cell.name in failed], summary, cells


_held_locks = []


def lock_output(out):
    """One run per output folder: an exclusive flock on <out>/.experiment.lock, held until this
    process ends (the kernel drops it however the process ends); children do not inherit it."""
    handle = open(os.path.join(out, LOCK_FILE), "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise ConfigError(f"--out {out}: another tools/experiment.py (pid {holder}) is running in it; wait for it "
                          f"or stop it first") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _held_locks.append(handle)


def prepare(out, settings):
    """Check the output folder against experiment.json (refusing other settings), run the scripts'
    dry-run checks for what is new, then record the settings. Returns the settings to run with."""
    path = os.path.join(out, EXPERIMENT_FILE)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if os.path.isfile(path):
        lock_output(out)
        recorded = read_json(path)
        corrected = corrections(out, recorded["settings"], settings)
        merged = merge_with_recorded(out, recorded["settings"], settings, corrected)
        for name in sorted(corrected):
            print(f"--{name} corrected: no round was evaluated with the earlier value", flush=True)
        old = upgrade_recorded(recorded["settings"])
        new_calibrators = [c for c in merged["calibrators"] if c not in old["calibrators"] or old["rounds"] == 0]
        new_queries = [q for q in merged["queries"] if q not in old["queries"] or old["rounds"] == 0]
        if any(v not in old[name] for name in ("acquisitions", "relabel_ratios") for v in merged[name]):
            new_queries = merged["queries"]  # every query strategy meets the new sampling settings
        if merged["rounds"] >= 1 and (new_calibrators or new_queries):
            preflight(merged, False, new_calibrators, new_queries)
        if merged != recorded["settings"]:
            recorded["settings"] = merged
            comparison.atomic_write(path, json.dumps(recorded, indent=2) + "\n")
        return merged
    if os.path.isdir(out) and set(os.listdir(out)) - {LOCK_FILE}:
        raise ConfigError(f"--out {out}: holds files but no {EXPERIMENT_FILE}; choose a new or empty folder")
    if settings["rounds"] >= 1:
        preflight(settings, True, settings["calibrators"], settings["queries"])
    else:
        preflight(settings, True, [], [])
    os.makedirs(out, exist_ok=True)
    lock_output(out)
    record = {"created": datetime.datetime.now().isoformat(timespec="seconds"), "settings": settings}
    comparison.atomic_write(path, json.dumps(record, indent=2) + "\n")
    return settings


# what round 0 depends on: an experiment whose values differ cannot lend its base models
BASE_SETTINGS = ("base_calibrator", "train_data", "valid_data", "test_data", "select_data", "batch_ratio",
                 "label_ratio", "base_iters", "val_interval", "batch_size", "arch", "train_args", "base_model",
                 "model_preset") + DERIVED


def check_base_from(source, s):
    """--base_from's folder (absolute); ConfigError when it holds no experiment or one whose round-0
    settings differ from `s`."""
    source = os.path.abspath(source)
    path = os.path.join(source, EXPERIMENT_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"--base_from {source}: no {EXPERIMENT_FILE} there; name a tools/experiment.py output folder")
    theirs = upgrade_recorded(read_json(path)["settings"])
    differ = [setting_label(name) for name in BASE_SETTINGS
              if _comparable(name, theirs.get(name)) != _comparable(name, s[name])]
    if differ:
        raise ConfigError(f"--base_from {source}: its round 0 ran with other settings ({', '.join(differ)}); "
                          f"give the same ones or train the base models here")
    return source


def link_bases(out, s, source):
    """Link the finished round-0 models of the experiment in `source` into `out` for every seed of
    the grid that has none yet; returns the linked seeds."""
    linked = []
    for seed in s["seeds"]:
        mine, lent = Unit(out, seed, s["base_calibrator"]), Unit(source, seed, s["base_calibrator"])
        if os.path.lexists(mine.path()) or not lent.finished(0):
            continue
        os.makedirs(os.path.dirname(mine.path()), exist_ok=True)
        os.symlink(os.path.realpath(lent.path()), mine.path())
        linked.append(seed)
    return linked


# what a round means: experiments that differ in one of these do not compare
ROUND_SETTINGS = BASE_SETTINGS + ("iters", "al_start", "num_query", "query_ratio", "noise_scope")


def combine(out, sources):
    """--combine: the records of the experiment folders `sources`, checked to compare (same
    ROUND_SETTINGS, same round-0 model per seed), written as one set of tables and plots in
    `out`. Returns the summary rows; ConfigError when the folders do not compare."""
    grids = []
    for source in sources:
        path = os.path.join(source, EXPERIMENT_FILE)
        if not os.path.isfile(path):
            raise ConfigError(f"--combine {source}: no {EXPERIMENT_FILE} there; name tools/experiment.py output folders")
        grids.append((source, upgrade_recorded(read_json(path)["settings"])))
    first, first_settings = grids[0]
    base_models = {}  # seed -> (folder, digest of its round-0 model)
    kept = {}  # (cell name, sampling args) -> (folder, records)
    for source, s in grids:
        differ = [setting_label(name) for name in ROUND_SETTINGS
                  if _comparable(name, s.get(name)) != _comparable(name, first_settings.get(name))]
        if differ:
            raise ConfigError(f"--combine {source}: ran with other settings than {first} ({', '.join(differ)}); "
                              f"only folders that differ in their grid and --sampling_args compare")
        bases, cells = build_units(source, s)
        for seed, base in bases.items():
            if not base.finished(0):
                continue
            digest = pretrained.file_sha256(base.model(0))
            if seed in base_models and base_models[seed][1] != digest:
                raise ConfigError(f"--combine {source}: its round-0 model of seed {seed} is not the one of "
                                  f"{base_models[seed][0]}, so its cells are not paired with theirs; run it with "
                                  f"--base_from {base_models[seed][0]}")
            base_models.setdefault(seed, (source, digest))
        for cell in cells:
            records = cell_records(cell, bases, s)
            key = (cell.name, records[0]["sampling_args"] if records else "")
            if records and len(records) > len(kept.get(key, (None, []))[1]):
                kept[key] = (source, records)
    if out in sources:
        raise ConfigError(f"--out {out}: is one of the --combine folders; write the combined tables elsewhere")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out}: exists and is not a folder")
    os.makedirs(out, exist_ok=True)
    summary_rows = write_tables_and_plots(out, [record for _, cell_rows in kept.values() for record in cell_rows])
    record = {"created": datetime.datetime.now().isoformat(timespec="seconds"), "combined": sources,
              "cells": {f"{name} {args}".strip(): source for (name, args), (source, _) in sorted(kept.items())}}
    comparison.atomic_write(os.path.join(out, "combined.json"), json.dumps(record, indent=2) + "\n")
    return summary_rows


def run_combine(args):
    if not args.out or not args.out.strip():
        raise ConfigError("--out: give the folder for the combined tables")
    given = [name for name in ("grid", "base_from", *SETTINGS) if getattr(args, name) is not None]
    if given:
        raise ConfigError(f"--combine: runs nothing, so it takes --out only (drop --{', --'.join(given)})")
    sources = [os.path.abspath(item) for item in _list("combine", args.combine)]
    out = os.path.abspath(args.out)
    summary = combine(out, sources)
    print(comparison.markdown_text(summary, comparison.SUMMARY_COLUMNS), end="")
    print(f"tables: {os.path.join(out, 'comparison.csv')} (.md), {os.path.join(out, 'summary.csv')} (.md); "
          f"plots: {os.path.join(out, 'learning_curves.png')}", flush=True)
    return 0


COVERAGE_FILE = "charset_coverage.txt"


def base_model_report(s):
    """Lines saying where round 0 starts from and how its character set covers the labels of the
    base datasets, the validation and the test data ([] without --base_model)."""
    if not s.get("base_model"):
        return []
    try:
        _, source = pretrained.checkpoint_architecture(s["base_model"], s.get("model_preset") or "")
        own, run = base_charsets(s)
        found = [] if run is None else pretrained.data_coverage(run, s["train_data"], s["select_data"].split("-"),
                                                                 s["valid_data"], s["test_data"])
    except UserError as err:
        raise ConfigError(str(err)) from None
    return pretrained.start_report(s["base_model"], s["base_model_sha256"], s["base_iters"], source, own, run, found)


def _terminate(signum, frame):
    raise KeyboardInterrupt


def release_locks():
    while _held_locks:
        _held_locks.pop().close()


def main(argv=None):
    """Run the experiment; returns the exit status (0, 1, 2 or 130, see the module docstring)."""
    try:
        return run(argv)
    finally:
        release_locks()


def run(argv):
    args = get_args_parser().parse_args(argv)
    if args.combine is not None:
        try:
            return run_combine(args)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    try:
        out, settings = parse(argv)
        jobs = _int("jobs", args.jobs, 1, "a whole number of rounds to run at once (1 or more)")
        base_from = args.base_from
        if base_from:
            base_from = check_base_from(base_from, settings)
        settings = prepare(out, settings)
        if base_from:
            linked = link_bases(out, settings, base_from)
            print(f"round 0 of seeds {', '.join(map(str, linked)) or 'none'} linked from {base_from}", flush=True)
        report = base_model_report(settings)
        if report:
            print("\n".join(report), flush=True)
            comparison.atomic_write(os.path.join(out, COVERAGE_FILE), "\n".join(report) + "\n")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before the first round; nothing was started", file=sys.stderr)
        return 130
    print(f"experiment {out}: {len(settings['queries'])} queries x {len(settings['calibrators'])} calibrators x "
          f"{len(settings['noise'])} noise ratios"
          + (f" x {len(settings['noise_models'])} noise models" if settings["noise_models"] != [DEFAULT_NOISE_MODEL]
             else "")
          + (f" x {len(settings['relabel_ratios'])} relabel ratios"
             if settings["relabel_ratios"] != [DEFAULT_RELABEL_RATIO] else "")
          + (f" x {len(settings['acquisitions'])} acquisitions"
             if settings["acquisitions"] != [DEFAULT_ACQUISITION] else "")
          + f" x {len(settings['seeds'])} seeds, {settings['rounds']} rounds "
          f"after round 0", flush=True)
    try:
        failed, summary, cells = run_grid(out, settings, jobs)
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to continue (finished rounds are kept, a killed "
              "training resumes from its last.pth)", file=sys.stderr)
        return 130
    print(comparison.markdown_text(summary, comparison.SUMMARY_COLUMNS), end="")
    print(f"tables: {os.path.join(out, 'comparison.csv')} (.md), {os.path.join(out, 'summary.csv')} (.md); "
          f"plots: {os.path.join(out, 'learning_curves.png')}"
          + (f", {os.path.join(out, 'noise.png')}" if len(settings["noise"]) > 1 else ""), flush=True)
    if failed:
        print(f"{len(failed)} of {len(cells)} cells failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)  # a plain kill stops the child like Ctrl-C does
    sys.exit(main())
