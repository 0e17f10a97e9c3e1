"""A pretrained recognizer as the start of an active-learning loop: where its architecture and
character set come from (the opt.yaml train.py saved beside it, or a model preset for a checkpoint
that has none), its identity (the SHA-256 of the file) and how well its character set covers the
labels of the target data.

A model preset is a YAML file under configs/models/ (one per known model, named after the file)
holding the architecture options of `options.ARCHITECTURE_OPTIONS` (`character` spelled out, no
`character_file`) and an optional `description`."""
import argparse
import collections
import hashlib
import os

import yaml

import options
from utils import UserError

REPO = os.path.dirname(os.path.abspath(__file__))
PRESET_DIR = os.path.join(REPO, "configs", "models")
PRESET_OPTIONS = tuple(name for name in options.ARCHITECTURE_OPTIONS if name != "character_file")
PRESET_INFO = ("description", "source")
# Options that decide the tensors' shapes and meaning: a run that starts from a checkpoint cannot
# change them (the character set can change, with --FT; the image geometry can, since every stage
# here takes any width and averages over the height).
STRUCTURE_OPTIONS = ("Transformation", "FeatureExtraction", "SequenceModeling", "Prediction", "num_fiducial",
                     "input_channel", "output_channel", "hidden_size", "rgb")
BOOL_OPTIONS = ("rgb", "PAD", "sensitive")
MAX_SHOWN = 20  # characters named in a coverage line


def preset_names():
    """The known presets (configs/models/<name>.yaml), sorted."""
    if not os.path.isdir(PRESET_DIR):
        return []
    return sorted(name[:-5] for name in os.listdir(PRESET_DIR) if name.endswith(".yaml"))


def preset_path(value, flag="--model_preset"):
    """The file of a preset given by name or path; UserError listing the known names otherwise."""
    if value.endswith((".yaml", ".yml")) or os.sep in value:
        if not os.path.isfile(value):
            raise UserError(f"{flag} {value}: no such file; give a preset name ({', '.join(preset_names()) or 'none'}) "
                            f"or a YAML file")
        return value
    if value not in preset_names():
        raise UserError(f"{flag} {value}: unknown model preset; known: {', '.join(preset_names()) or 'none'} "
                        f"(configs/models/), or give a YAML file")
    return os.path.join(PRESET_DIR, value + ".yaml")


def _check_value(name, value, where):
    if name in BOOL_OPTIONS:
        ok = isinstance(value, bool)
    elif name in options.INT_OPTIONS:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str) and value != ""
    if not ok:
        wanted = ("true or false" if name in BOOL_OPTIONS else "a whole number" if name in options.INT_OPTIONS
                  else "text")
        raise UserError(f"{where}: {name} is {value!r}, not {wanted}")


def read_preset(value, flag="--model_preset"):
    """The architecture options of a preset (name or file), checked: a dict."""
    path = preset_path(value, flag)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UserError(f"{flag} {path}: not readable as YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{flag} {path}: give a mapping of architecture options (e.g. 'Prediction: CTC')")
    values = {}
    for name, item in data.items():
        if name in PRESET_INFO:
            continue
        if name not in PRESET_OPTIONS:
            raise UserError(f"{flag} {path}: unknown option '{name}'; known: {', '.join(PRESET_OPTIONS + PRESET_INFO)}")
        _check_value(name, item, f"{flag} {path}")
        values[name] = item
    missing = [name for name in options.STAGE_CHOICES if name not in values]
    if missing:
        raise UserError(f"{flag} {path}: names no {', '.join(missing)}; a preset gives the four stages")
    return values


def saved_architecture(model_path):
    """The architecture options of the opt.yaml beside `model_path` ({} when there is none)."""
    saved = options.load_opt_yaml(model_path)
    values = {}
    for name in PRESET_OPTIONS:
        if saved.get(name) is None:
            continue
        _check_value(name, saved[name], options.opt_yaml_path(model_path))
        values[name] = saved[name]
    return values


def checkpoint_architecture(model_path, preset="", flag="--base_model", preset_flag="--model_preset"):
    """`(values, source)`: the architecture options a checkpoint was trained with and where they
    were read: the opt.yaml beside it (this project's checkpoints), else the preset; ({}, '') when
    neither says (the run's own flags must then describe it). A preset that disagrees with the
    opt.yaml is a UserError."""
    if not os.path.isfile(model_path):
        raise UserError(f"{flag} {model_path}: no such file")
    saved = saved_architecture(model_path)
    from_preset = read_preset(preset, preset_flag) if preset else {}
    if saved and from_preset:
        differ = [name for name in from_preset if name in saved and saved[name] != from_preset[name]]
        if differ:
            raise UserError(f"{preset_flag} {preset}: disagrees with {options.opt_yaml_path(model_path)} on "
                            f"{', '.join(differ)}; leave {preset_flag} out (the opt.yaml describes the checkpoint)")
    if saved:
        return saved, options.opt_yaml_path(model_path)
    if from_preset:
        return from_preset, preset_path(preset, preset_flag)
    return {}, ""


def architecture_flags(values):
    """Command-line flags that rebuild `values` (as `--name=value`, so that a character set starting
    with '-' stays one value); a resolved `character` makes --sensitive needless."""
    flags = []
    for name in PRESET_OPTIONS:
        if name not in values:
            continue
        value = values[name]
        if name in BOOL_OPTIONS:
            if value and not (name == "sensitive" and "character" in values):
                flags.append(f"--{name}")
        else:
            flags.append(f"--{name}={value}")
    return flags


def _options_parser():
    parser = argparse.ArgumentParser(add_help=False)
    options.add_data_args(parser)
    options.add_model_args(parser, required=False)
    return parser


def checkpoint_charset(model_path, preset=""):
    """The character set a checkpoint was trained with (its opt.yaml, else the preset), or None."""
    values = saved_architecture(model_path) or (read_preset(preset) if preset else {})
    return run_charset(values, []) if values else None


def parse_architecture(flags):
    """`(values, given)`: the architecture options the flags set (later flags win, as in argparse)
    with the character set resolved, and the names the flags named. Other flags are ignored."""
    parser = _options_parser()
    opt, _ = parser.parse_known_args(flags)
    given = options.given_options(parser, flags)
    opt.character = options.resolve_charset(opt)
    return {name: getattr(opt, name) for name in PRESET_OPTIONS}, given


def structure_conflicts(checkpoint, flags):
    """The structural options the flags give another value than the checkpoint has (names)."""
    values, given = parse_architecture(flags)
    return [name for name in STRUCTURE_OPTIONS
            if name in given and name in checkpoint and values[name] != checkpoint[name]]


def run_charset(checkpoint, flags):
    """The character set of a run whose flags are architecture_flags(checkpoint) + `flags`."""
    values, _ = parse_architecture(architecture_flags(checkpoint) + list(flags))
    return values["character"]


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


Coverage = collections.namedtuple("Coverage", "name labels outside characters")


def label_coverage(name, labels, charset, lower):
    """How many of `labels` hold a character outside `charset` (after lower-casing when `lower`,
    as training does), and those characters with their counts (most frequent first)."""
    allowed = frozenset(charset)
    outside, characters = 0, collections.Counter()
    total = 0
    for label in labels:
        total += 1
        label = label.lower() if lower else label
        missing = [ch for ch in label if ch not in allowed]
        if missing:
            outside += 1
            characters.update(missing)
    return Coverage(name, total, outside, characters)


def coverage_line(coverage):
    if not coverage.outside:
        return f"{coverage.name}: all {coverage.labels} labels within the character set"
    shown = ", ".join(f"{ch!r} x{n}" for ch, n in coverage.characters.most_common(MAX_SHOWN))
    more = len(coverage.characters) - MAX_SHOWN
    return (f"{coverage.name}: {coverage.outside} of {coverage.labels} labels hold characters outside the character "
            f"set (filtered out of training and evaluation): {shown}" + (f" and {more} more" if more > 0 else ""))


def lmdb_coverage(root, select_data, charset, lower, flag):
    """One Coverage per dataset name of `select_data` ('/' for every LMDB below `root`): the labels
    of its labelled LMDBs (unlabelled pool LMDBs have none to check)."""
    from data_layer import leaf_selection
    from data_layer import lmdb_format
    from data_layer import set_records

    names = [select_data] if isinstance(select_data, str) else list(select_data)
    leaves = leaf_selection.check_root(root, flag)
    found = []
    for name in names:
        chosen = [leaf for leaf in leaves if leaf_selection.selects(leaf, name, root)]
        labels = []
        for leaf in chosen:
            path = os.path.normpath(os.path.join(root, leaf))
            if set_records.is_unlabelled(path):
                continue
            with lmdb_format.shared_env(path).begin(write=False) as txn:
                count = lmdb_format.read_num_samples(txn, path)
                labels.extend(label for _, label in lmdb_format.iter_labels(txn, count))
        where = root if name == "/" else os.path.join(root, name)
        found.append(label_coverage(where, labels, charset, lower))
    return found


def check_start(base_model, values, flags, base_iters, flags_name="--arch"):
    """`(the checkpoint's character set, the run's)` for a run that starts from `base_model`
    (architecture `values`, as checkpoint_architecture reads them; (None, None) when it has none)
    with the extra `flags` (named `flags_name` in messages) and `base_iters` iterations of round 0.
    UserError when the flags change the checkpoint's structure, or when round 0 takes it as it is
    (`base_iters` 0) with another character set, whose prediction layer would be untrained."""
    if not values:
        return None, None
    conflicts = structure_conflicts(values, flags)
    if conflicts:
        raise UserError(f"{flags_name}: --base_model {base_model} has "
                        + ", ".join(f"{name} {values[name]}" for name in conflicts)
                        + "; a checkpoint's structure cannot change, so leave those flags out")
    own, run = run_charset(values, []), run_charset(values, flags)
    new = [ch for ch in run if ch not in own]
    if base_iters == 0 and new:
        raise UserError(f"--base_iters 0: takes --base_model as it is, but round 0's character set (from "
                        f"{flags_name}) holds characters the checkpoint has no output for "
                        f"({''.join(new[:MAX_SHOWN])!r}); fine-tune it onto the new set with --base_iters N, or leave "
                        f"them out")
    return own, run


def start_report(base_model, sha256, base_iters, source, own, run, coverages):
    """The lines that say where round 0 starts from and how its character set covers the data."""
    start = "as it is" if base_iters == 0 else f"fine-tuned for {base_iters} iterations"
    lines = [f"round 0: --base_model {base_model} (sha256 {sha256[:12]}...) {start}; "
             f"architecture and character set from {source or 'the flags given'}"]
    if run is None:
        return lines
    new = [ch for ch in run if ch not in own]
    if run == own:
        lines.append(f"character set: the checkpoint's ({len(run)} characters)")
    else:
        lines.append(f"character set: {len(run)} characters from the flags given, the checkpoint's has {len(own)}; "
                     f"round 0 loads it with --FT, keeping the outputs of the {len(run) - len(new)} characters both "
                     f"have" + (f", new: {''.join(new[:MAX_SHOWN])!r}" if new else ""))
    return lines + ["  " + coverage_line(c) for c in coverages]


def data_coverage(charset, train_data, select_data, valid_data, test_data):
    """Coverage of `charset` over the base datasets (one per name), the validation data and the
    test data (when another folder), lower-casing labels when training would."""
    import dataset

    lower = dataset.lowercases_labels(argparse.Namespace(sensitive=False, character=charset))
    found = lmdb_coverage(train_data, select_data, charset, lower, "--train_data")
    found += lmdb_coverage(valid_data, "/", charset, lower, "--valid_data")
    if os.path.realpath(test_data) != os.path.realpath(valid_data):
        found += lmdb_coverage(test_data, "/", charset, lower, "--test_data")
    return found
