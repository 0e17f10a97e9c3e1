"""The commands that continue the loop after an annotation package's import (import_annotations.py
prints them): the `train.py --mode al` of the round the import completes, and the `data_sampling.py
--export_annotation` of the round after it.

Both come from the package's own records: the manifest (the root, the model that sampled, the
strategy and its query settings) and the opt.yaml that train.py saved beside that model, whose
settings the next training repeats (architecture, charset, optimiser, schedule, calibrator, seed,
batch size, iterations). The paths in opt.yaml are as training was given them: relative ones are
read from the folder training ran in (recovered from where the model lies under --output_dir), and
every path printed is absolute, so the commands run as printed from any folder."""
import os
import shlex
import sys

import options
from active_learning.query_sets import ROUND_PATTERN

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_FILE = "best_accuracy.pth"
# train.py's settings that the next round repeats: (flag, kind); "flag" ones are store_true
TRAIN_SETTINGS = (
    ("valid_data", "path"), ("total_data_usage_ratio", "value"), ("batch_max_length", "value"), ("imgH", "value"),
    ("imgW", "value"), ("rgb", "flag"), ("sensitive", "flag"), ("character", "charset"), ("PAD", "flag"),
    ("data_filtering_off", "flag"), ("workers", "value"), ("batch_size", "value"), ("manualSeed", "value"),
    ("Transformation", "value"), ("FeatureExtraction", "value"), ("SequenceModeling", "value"),
    ("Prediction", "value"), ("num_fiducial", "value"), ("input_channel", "value"), ("output_channel", "value"),
    ("hidden_size", "value"), ("device", "value"), ("amp", "flag"), ("bins", "value"), ("no_progress", "flag"),
    ("threads", "value"), ("num_iter", "value"), ("valInterval", "value"), ("adam", "flag"), ("lr", "value"),
    ("beta1", "value"), ("rho", "value"), ("eps", "value"), ("grad_clip", "value"), ("lr_schedule", "value"),
    ("warmup_iters", "value"), ("calibrator", "value"), ("alpha", "value"), ("beta", "value"),
    ("smooth_tail", "value"), ("B", "value"), ("t", "value"), ("patience", "value"), ("noise_ratio", "value"),
    ("noise_model", "value"), ("noise_scope", "value"), ("channels_last", "flag"),
)
# data_sampling.py's settings of the round after, from the sampling round's opt.yaml
SAMPLING_SETTINGS = ("valid_data", "total_data_usage_ratio", "workers", "batch_size", "manualSeed", "device",
                     "no_progress", "threads", "noise_ratio", "noise_model", "noise_scope")


def command(script, words, python=None):
    """A command line that runs as printed from any folder: this Python (or `python`), the script's
    absolute path, then `words`, quoted for a POSIX shell."""
    return " ".join(shlex.quote(str(w)) for w in [python or sys.executable, os.path.join(REPO, script), *words])


def training_folder(model, saved):
    """The folder train.py ran in, when the model lies at <it>/<output_dir>/<exp_name>/; else None."""
    output_dir, exp_name = saved.get("output_dir"), saved.get("exp_name")
    if not isinstance(output_dir, str) or not isinstance(exp_name, str) or not exp_name:
        return None
    if os.path.isabs(output_dir):
        return None
    folder = os.path.dirname(os.path.abspath(model))
    tail = os.path.normpath(os.path.join(output_dir, exp_name))
    return folder[:-len(tail)].rstrip(os.sep) or os.sep if folder.endswith(os.sep + tail) else None


def absolute(path, base):
    if os.path.isabs(path):
        return path
    if base and os.path.exists(os.path.join(base, path)):
        return os.path.normpath(os.path.join(base, path))
    return os.path.abspath(path)


def next_name(name):
    """`<query>_iter_<k+1>` for `<query>_iter_<k>`, else None."""
    match = ROUND_PATTERN.search(name)
    return f"{name[:match.start()]}_iter_{int(match.group(1)) + 1}" if match and match.start() else None


def setting_words(saved, names, base):
    kinds = dict(TRAIN_SETTINGS)
    words = []
    for name in names:
        value = saved.get(name)
        kind = kinds.get(name, "flag" if isinstance(value, bool) else "value")
        if value is None or value == "":
            continue
        if kind == "flag":
            words += [f"--{name}"] if value is True else []
        elif kind == "charset":
            words += [] if saved.get("sensitive") else ["--character", value]
        elif kind == "path":
            words += [f"--{name}", absolute(str(value), base)]
        else:
            words += [f"--{name}", value]
    return words


def commands(manifest, name, select_data, batch_ratio):
    """{"train": ..., "sampling": ..., "model": the model the training writes}: the next round's
    commands after the query set `name` was imported with the next selection given; {} when
    the model that sampled has no opt.yaml beside it (its settings are unknown)."""
    model = manifest.get("model")
    saved = options.load_opt_yaml(model) if model else {}
    if not saved or not select_data:
        return {}
    base = training_folder(model, saved)
    root = manifest["train_data"]
    output_dir = os.path.dirname(os.path.dirname(os.path.abspath(model)))
    train = ["--train_data", root, "--select_data", select_data, "--batch_ratio", batch_ratio, "--mode", "al",
             "--saved_model", model, "--output_dir", output_dir, "--exp_name", name, "--query_iter", name]
    meta = manifest.get("query_meta") or {}
    # the labelled share decides which samples are the pool: sampling's, recorded in the manifest
    saved = dict(saved, total_data_usage_ratio=meta.get("total_data_usage_ratio", saved.get("total_data_usage_ratio")))
    train += setting_words(saved, [n for n, _ in TRAIN_SETTINGS], base)
    new_model = os.path.join(output_dir, name, MODEL_FILE)
    selection = manifest.get("selection") or {}
    base_select = "-".join(selection.get("select_data") or []) or select_data
    base_ratio = "-".join(f"{r:g}" for r in selection.get("batch_ratio") or []) or batch_ratio
    sampling = ["--train_data", root, "--select_data", base_select, "--batch_ratio", base_ratio,
                "--saved_model", new_model, "--query", meta.get("strategy") or manifest.get("strategy")]
    sampling += ["--num_query", meta["num_query"]] if meta.get("num_query") else []
    sampling += ["--ratio", meta["ratio"]] if meta.get("ratio") and not meta.get("num_query") else []
    for key in ("acquisition", "acquisition_beta", "candidates", "pool_subsample"):
        sampling += [f"--{key}", meta[key]] if meta.get(key) is not None else []
    pool = selection.get("pool_data") or []
    sampling += ["--pool_data", "-".join(pool)] if pool else []
    relabel = manifest.get("relabel")
    if relabel and relabel.get("meta", {}).get("relabel_ratio") is not None:
        sampling += ["--relabel_ratio", relabel["meta"]["relabel_ratio"], "--relabel_policy", relabel["policy"]]
    sampling += setting_words(dict(saved, manualSeed=meta.get("seed", saved.get("manualSeed"))), SAMPLING_SETTINGS,
                              base)
    following = next_name(name)
    package = os.path.join(root, f"{following or name + '_next'}_annotation")
    sampling += (["--out_name", following] if following else []) + ["--export_annotation", package]
    return {"train": command("train.py", train), "sampling": command("data_sampling.py", sampling),
            "model": new_model}
