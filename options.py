"""Command-line options shared by train.py, data_sampling.py, test.py and demo.py.

Option names and defaults follow the original scripts so that existing command lines keep
working; `resolve_options` turns the raw strings into the forms the modules read
(see docs/DESIGN.md)."""
import argparse
import math
import os
import string
import sys

import torch
import yaml

from safe_files import atomic_io
import utils
from utils import UserError

DEFAULT_CHARACTER = "0123456789abcdefghijklmnopqrstuvwxyz"
ARCHITECTURE_OPTIONS = ("Transformation", "FeatureExtraction", "SequenceModeling", "Prediction",
                        "num_fiducial", "input_channel", "output_channel", "hidden_size",
                        "imgH", "imgW", "rgb", "PAD", "character", "sensitive", "character_file",
                        "batch_max_length")
INT_OPTIONS = ("num_fiducial", "input_channel", "output_channel", "hidden_size", "imgH", "imgW", "batch_max_length")
STAGE_CHOICES = {
    "Transformation": ("None", "TPS"),
    "FeatureExtraction": ("VGG", "RCNN", "ResNet"),
    "SequenceModeling": ("None", "BiLSTM"),
    "Prediction": ("CTC", "Attn"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one worth showing (not None, '' or False)."""

    def _get_help_string(self, action):
        if action.default in (None, "", False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def make_parser(description):
    """The scripts' ArgumentParser: `description` and defaults shown where they say something."""
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)


def add_common_args(parser, saved_model_help=None, model_required=False):
    """The data, model and runtime groups. With `saved_model_help`, the model group starts with
    --saved_model, whose opt.yaml supplies the architecture flags not given (`fill_from_saved`)."""
    add_data_args(parser)
    add_model_args(parser, required=model_required, saved_model_help=saved_model_help)
    add_runtime_args(parser)


def add_data_args(parser):
    group = parser.add_argument_group("data")
    group.add_argument("--train_data", help="root folder of the training LMDBs (and of the query sets)")
    group.add_argument("--valid_data", help="root folder of the validation LMDBs")
    group.add_argument("--select_data", default="MJ-ST",
                       help="'-'-separated names of datasets under --train_data; a name selects every LMDB "
                            "whose relative path has a component equal to it")
    group.add_argument("--batch_ratio", default="0.5-0.5",
                       help="'-'-separated share of each --select_data name in a batch (0 for a name that "
                            "selects relabel sets only: they relabel samples and take no share)")
    group.add_argument("--total_data_usage_ratio", default="1.0",
                       help="labelled fraction of each selected dataset (the first part); the rest is the "
                            "unlabelled pool that data_sampling.py queries")
    group.add_argument("--batch_max_length", type=int, default=25, help="maximum label length")
    group.add_argument("--imgH", type=int, default=32, help="height of the input image")
    group.add_argument("--imgW", type=int, default=100, help="width of the input image")
    group.add_argument("--rgb", action="store_true", help="use RGB input")
    group.add_argument("--character", default=DEFAULT_CHARACTER, help="character label set")
    group.add_argument("--character_file", default="",
                       help="read the character set from this UTF-8 file (overrides --character)")
    group.add_argument("--sensitive", action="store_true",
                       help="case-sensitive mode: the 94 printable ASCII characters")
    group.add_argument("--PAD", action="store_true", help="keep the aspect ratio and pad when resizing")
    group.add_argument("--data_filtering_off", action="store_true",
                       help="keep labels that are too long or hold characters outside the charset")
    group.add_argument("--workers", type=int, default=default_workers(),
                       help="number of data loading workers; unless given, the smaller of 4 and the cores this "
                            "process may use")
    group.add_argument("--batch_size", type=int, default=192, help="input batch size")
    group.add_argument("--manualSeed", type=int, default=1111,
                       help=f"random seed, a whole number in {utils.SEED_RANGE_TEXT} (the range torch accepts; "
                            f"NumPy is seeded with it modulo 2**32)")
    return group


def add_model_args(parser, required=True, saved_model_help=None, preset=None):
    """The model group. `preset` (default: with `saved_model_help`) adds --model_preset."""
    group = parser.add_argument_group("model")
    if saved_model_help:
        group.add_argument("--saved_model", default="", help=f"{saved_model_help}; architecture flags not given "
                                                              "are read from the opt.yaml beside it, else from "
                                                              "--model_preset")
    if saved_model_help if preset is None else preset:
        group.add_argument("--model_preset", default="",
                           help="architecture and character set of a known model for a --saved_model without an "
                                "opt.yaml beside it: a name under configs/models/ (e.g. easyocr_english_g2) or a "
                                "YAML file; flags given win")
    for name, choices in STAGE_CHOICES.items():
        group.add_argument(f"--{name}", required=required, default=None,
                           help=f"stage: {' | '.join(choices)}")
    group.add_argument("--num_fiducial", type=int, default=None, help="number of TPS fiducial points (20)")
    group.add_argument("--input_channel", type=int, default=None, help="input channels of the feature extractor (1)")
    group.add_argument("--output_channel", type=int, default=None, help="output channels of the feature extractor (512)")
    group.add_argument("--hidden_size", type=int, default=None, help="LSTM hidden size (256)")
    return group


MODEL_DEFAULTS = {"num_fiducial": 20, "input_channel": 1, "output_channel": 512, "hidden_size": 256}


def add_runtime_args(parser):
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    group.add_argument("--amp", action="store_true",
                       help="mixed precision: bf16 autocast on CPU, fp16 autocast with gradient scaling on CUDA")
    group.add_argument("--bins", type=int, default=15, help="number of bins of the calibration metrics")
    group.add_argument("--no_progress", action="store_true", help="no progress bar")
    group.add_argument("--threads", type=int, default=0,
                       help="CPU threads of torch's operators. 0: the cores this process may use divided by the "
                            "processes of this run on this machine (LOCAL_WORLD_SIZE under torchrun), capped by "
                            "OMP_NUM_THREADS when set. On a machine other jobs share, give fewer (e.g. 1): "
                            "threads competing for cores spin and can slow a run tenfold")
    return group


OPT_YAML_FIX = "fix or delete it, or give the architecture flags (--Transformation ... --Prediction) yourself"


def opt_yaml_path(model_path):
    return os.path.join(os.path.dirname(os.path.abspath(model_path)), "opt.yaml")


def load_opt_yaml(model_path):
    """Options saved beside a checkpoint by train.py, or {} when there are none. A file that is not
    UTF-8, not YAML or not a mapping is a UserError naming it."""
    if not model_path:
        return {}
    path = opt_yaml_path(model_path)
    if not os.path.isfile(path):
        return {}
    with open(path, "rb") as f:
        raw = f.read()
    try:
        saved = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise UserError(f"{path}: not UTF-8 text (line {line}); {OPT_YAML_FIX}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise UserError(f"{path}: not valid YAML ({problem}{where}); {OPT_YAML_FIX}") from None
    if saved is None:
        return {}
    if not isinstance(saved, dict):
        raise UserError(f"{path}: holds a {type(saved).__name__}, not option: value lines; {OPT_YAML_FIX}")
    return saved


def _saved_type_ok(name, value):
    if name in ("rgb", "PAD", "sensitive"):
        return isinstance(value, bool)
    if name in INT_OPTIONS:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, str)


def read_model_preset(opt, saved=None):
    """The architecture options of --model_preset ({} when not given); a UserError when they
    disagree with `saved` (the opt.yaml beside the checkpoint, which describes it)."""
    preset = getattr(opt, "model_preset", "") or ""
    if not preset:
        return {}
    import pretrained  # it builds on this module

    values = pretrained.read_preset(preset)
    differ = [name for name, value in values.items() if (saved or {}).get(name) not in (None, value)]
    if differ:
        raise UserError(f"--model_preset {preset}: disagrees with {opt_yaml_path(opt.saved_model)} on "
                        f"{', '.join(differ)}; leave --model_preset out (the opt.yaml describes the checkpoint)")
    return values


def fill_from_preset(opt, argv_given):
    """Take architecture options the user did not give from --model_preset (train.py, where no
    opt.yaml is read)."""
    for name, value in read_model_preset(opt).items():
        if name not in argv_given:
            setattr(opt, name, value)


def fill_from_saved(opt, argv_given):
    """Take architecture options the user did not give from the opt.yaml beside --saved_model,
    else from --model_preset. A value of the wrong type there is a UserError naming the file (null
    counts as absent)."""
    saved = load_opt_yaml(getattr(opt, "saved_model", ""))
    preset = read_model_preset(opt, saved)
    for name in ARCHITECTURE_OPTIONS:
        if name in argv_given:
            continue
        if saved.get(name) is None:
            if name in preset:
                setattr(opt, name, preset[name])
            continue
        value = saved[name]
        if not _saved_type_ok(name, value):
            wanted = ("true or false" if name in ("rgb", "PAD", "sensitive")
                      else "a whole number" if name in INT_OPTIONS else "text")
            raise UserError(f"{opt_yaml_path(opt.saved_model)}: {name} is {value!r}, not {wanted}; fix the file "
                            f"or give --{name}")
        setattr(opt, name, value)
    return saved


def given_options(parser, argv):
    """Destinations of the options that appear on the command line (abbreviations included)."""
    given = set()
    for token in argv:
        if not token.startswith("--"):
            continue
        flag = token.split("=", 1)[0]
        matches = [a for a in parser._actions if any(s == flag for s in a.option_strings)]
        if not matches:
            matches = [a for a in parser._actions if any(s.startswith(flag) for s in a.option_strings)]
        if len(matches) == 1:
            given.add(matches[0].dest)
    return given


def parse_with_given(parser, argv=None):
    """Parse `argv` (default: the command line). The Namespace also carries `given_options`, the
    sorted destinations of the options typed there, so that opt.yaml fills only the others."""
    argv = sys.argv[1:] if argv is None else list(argv)
    opt = parser.parse_args(argv)
    opt.given_options = sorted(given_options(parser, argv))
    return opt


def given_option_names(opt, parser):
    """The options of `opt` that count as given: its `given_options` when `parse_with_given` made
    it; for a Namespace a caller built itself, those whose value differs from `parser`'s default."""
    if getattr(opt, "given_options", None) is not None:
        return set(opt.given_options)
    defaults = vars(parser.parse_args([]))
    return {name for name, value in vars(opt).items() if defaults.get(name, value) != value}


def _require_path(value, flag, hint, if_absent, exists, what):
    if not value:
        raise UserError(f"{flag} is required: {hint}")
    if not exists(value):
        raise UserError(f"{flag} {value}: no such {what}" + (f"; {if_absent}" if if_absent else ""))


def require_file(value, flag, hint, if_absent=""):
    """UserError `<flag> is required: <hint>` when `value` is empty, `<flag> <value>: no such file`
    (`; <if_absent>` when given) when it names no file."""
    _require_path(value, flag, hint, if_absent, os.path.isfile, "file")


def require_dir(value, flag, hint, if_absent=""):
    """As `require_file`, for a folder."""
    _require_path(value, flag, hint, if_absent, os.path.isdir, "folder")


def _blocking_file(path):
    """The nearest existing ancestor of `path` when it is not a folder (no folder can be made
    below it), else None."""
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    return None if os.path.isdir(ancestor) else ancestor


def check_output_file(value, flag, example="results.json"):
    """Before any work: UserError when `value` (a file to write; empty = not asked for) names a
    folder, ends in a separator, or lies below an existing file."""
    if not value:
        return
    if value.endswith(("/", os.sep)) or os.path.isdir(value):
        raise UserError(f"{flag} {value}: a folder; give the path of the file to write, e.g. "
                        f"{os.path.join(value, example)}")
    blocking = _blocking_file(value)
    if blocking:
        raise UserError(f"{flag} {value}: {blocking} is a file, not a folder; choose another path")


def check_output_dir(value, flag):
    """Before any work: UserError when `value` (a folder to write into, made when missing; empty =
    not asked for) names an existing file or lies below one."""
    if not value:
        return
    if os.path.exists(value) and not os.path.isdir(value):
        raise UserError(f"{flag} {value}: a file, not a folder; give a folder (it is made when missing)")
    blocking = _blocking_file(value)
    if blocking:
        raise UserError(f"{flag} {value}: {blocking} is a file, not a folder; choose another path")


def add_overwrite_arg(group, replaces):
    """`--overwrite` of a script that writes into a data folder; `replaces` says exactly what it may replace."""
    group.add_argument("--overwrite", action="store_true", help=replaces)


def add_lock_timeout_arg(group, holder="another writer"):
    """`--lock_timeout` of a script that takes the lock on --train_data (safe_files.locking)."""
    group.add_argument("--lock_timeout", type=float, default=0.0,
                       help=f"{holder} holding the lock on --train_data: wait this many seconds for it "
                            "(0: fail at once, -1: wait without limit)")


def add_temperature_arg(group, allow_auto=True, default="none", note="", allow_both=False):
    """--temperature, read by `parse_temperature` with the same `allow_auto`, and with it
    --calibration (how auto fits it; read by `parse_calibration` with the same `allow_both`)."""
    choices = "none | auto (fitted on --valid_data by NLL) | a number > 0" if allow_auto else "none | a number > 0"
    group.add_argument("--temperature", default=default,
                       help="temperature scaling (a number divides the logits" + ("; auto: see --calibration"
                                                                                  if allow_auto else "")
                            + f"): {choices}" + (f"; {note}" if note else ""))
    if allow_auto:
        group.add_argument("--calibration", default=None,
                           help="how --temperature auto is fitted and applied: token (default): T divides the "
                                "logits, fitted by the NLL of the label tokens; word: the word confidence c "
                                "becomes c**(1/T) (order kept), fitted by the NLL of each reading being right"
                                + ("; both: report the metrics unscaled, token- and word-scaled side by side "
                                   "(the token temperature scales the main table)" if allow_both else ""))


def parse_temperature(value, default=None, allow_auto=True, hint="", flag="--temperature"):
    """--temperature: 'none' -> None, 'auto' -> 'auto' (when `allow_auto`), else a positive finite
    float; None or blank -> `default`. `hint` ends the message of a value that is none of these."""
    text = "" if value is None else str(value).strip().lower()
    if not text:
        return default
    if text == "none":
        return None
    if text == "auto" and allow_auto:
        return "auto"
    try:
        temperature = float(text)
    except ValueError:
        choices = "none, auto or a positive number" if allow_auto else "none or a positive number"
        raise UserError(f"{flag} {value}: give {choices} such as 1.5" + (f" ({hint})" if hint else "")) from None
    if not math.isfinite(temperature) or temperature <= 0:
        raise UserError(f"{flag} {value}: the temperature must be a positive finite number")
    return temperature


def parse_calibration(value, temperature, allow_both=False, flag="--calibration"):
    """--calibration with the parsed --temperature: the fitting method in force ('token', 'word'
    or, when `allow_both`, 'both'), or None when no temperature is fitted. Not given -> 'token' for
    auto; given without auto -> UserError (it would change nothing)."""
    methods = ("token", "word", "both") if allow_both else ("token", "word")
    text = "" if value is None else str(value).strip().lower()
    if text and text not in methods:
        raise UserError(f"{flag} {value}: give " + ", ".join(methods[:-1]) + f" or {methods[-1]}")
    if temperature != "auto":
        if text:
            raise UserError(f"{flag} {value}: it chooses how --temperature auto is fitted; give --temperature "
                            f"auto (or leave {flag} out)")
        return None
    return text or "token"


def resolve_charset(opt):
    if getattr(opt, "character_file", ""):
        path = opt.character_file
        if not os.path.isfile(path):
            raise UserError(f"--character_file {path}: no such file")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as err:
            raise UserError(f"--character_file {path}: not UTF-8 text ({err.reason} at byte {err.start}); save it "
                            f"as UTF-8") from None
        chars = []
        for ch in text:
            if ch not in "\r\n" and ch not in chars:
                chars.append(ch)
        if not chars:
            raise UserError(f"--character_file {path}: the file holds no characters")
        return "".join(chars)
    if getattr(opt, "sensitive", False):
        return string.printable[:-6]
    if len(set(opt.character)) != len(opt.character):
        raise UserError("--character: the charset repeats a character; list each character once")
    return opt.character


def parse_ratio(value, flag):
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{flag} {value!r}: not a number; give a fraction such as 0.1") from None
    if not 0.0 <= ratio <= 1.0:
        raise UserError(f"{flag} {value}: must lie between 0 and 1")
    return ratio


def resolve_options(opt):
    """Normalise the raw option strings in place (see docs/DESIGN.md), check the ranges of the
    shared options (`check_ranges`), apply --threads, and return opt."""
    if isinstance(opt.select_data, str):
        opt.select_data = [name for name in opt.select_data.split("-") if name]
    if not opt.select_data:
        raise UserError("--select_data is empty; name at least one dataset, e.g. --select_data MJ-ST")
    given_ratio = opt.batch_ratio if isinstance(opt.batch_ratio, str) else "-".join(map(str, opt.batch_ratio))
    if isinstance(opt.batch_ratio, str):
        parts = opt.batch_ratio.split("-")
        try:
            opt.batch_ratio = [float(p) for p in parts]
        except ValueError:
            raise UserError(f"--batch_ratio {'-'.join(parts)}: not '-'-separated numbers, e.g. 0.5-0.5") from None
    if len(opt.batch_ratio) != len(opt.select_data):
        raise UserError(f"--select_data names {len(opt.select_data)} datasets but --batch_ratio gives "
                        f"{len(opt.batch_ratio)} shares; give one share per dataset")
    # float() reads "nan" and "inf", which would turn every batch size into nonsense
    # 0 is the share of a relabel set (new labels for samples trained on already, no batch share)
    if not all(math.isfinite(r) and r >= 0 for r in opt.batch_ratio) or not any(r > 0 for r in opt.batch_ratio):
        raise UserError(f"--batch_ratio {given_ratio}: every share must be a positive finite number (0 only for a "
                        f"relabel set), e.g. 0.5-0.5")
    opt.total_data_usage_ratio = parse_ratio(opt.total_data_usage_ratio, "--total_data_usage_ratio")
    for name, choices in STAGE_CHOICES.items():
        value = getattr(opt, name, None)
        if value is None:
            raise UserError(f"--{name} is required (no opt.yaml beside --saved_model or --model_preset gives it); "
                            f"choose one of {', '.join(choices)}")
        if value not in choices:
            raise UserError(f"--{name} {value}: unknown; choose one of {', '.join(choices)}")
    for name, default in MODEL_DEFAULTS.items():
        if getattr(opt, name, None) is None:
            setattr(opt, name, default)
    opt.character = resolve_charset(opt)
    if opt.rgb:
        opt.input_channel = 3
    check_ranges(opt)
    set_threads(opt)
    return opt


# The smallest image each stage takes (found by running them): every extractor halves the height
# 4 times and ends in a 2x2 convolution; VGG quarters the width and its 2x2 convolution takes one
# more column (W/4 - 1 >= 1), RCNN and ResNet quarter it and pad (W/4 + 1); the TPS localization
# network halves the width 3 times.
MIN_IMG_H = 32
MIN_IMG_W = {"VGG": 8, "RCNN": 4, "ResNet": 4}
MIN_IMG_W_TPS = 8

# Whole-number options every script shares: (name, least value, the hint ending the message).
# Options a script does not have are skipped.
LEAST_VALUES = (
    ("batch_size", 1, "default 192"),
    ("batch_max_length", 1, "the longest label; default 25"),
    ("workers", 0, "0 loads the data in the main process"),
    ("threads", 0, "0 chooses from the cores"),
    ("bins", 1, "default 15"),
    ("input_channel", 1, "default 1"),
    ("output_channel", 16, "the feature extractors divide it by 16; default 512"),
    ("hidden_size", 1, "default 256"),
    ("imgH", MIN_IMG_H, "the feature extractors halve the height 4 times and end in a 2x2 convolution; default 32"),
)


def check_ranges(opt):
    """UserError naming the flag for a shared whole-number option out of its range (see
    LEAST_VALUES), an --imgW too narrow for the chosen stages, or a TPS --num_fiducial that is odd
    or below 4."""
    for name, least, hint in LEAST_VALUES:
        value = _whole_number(opt, name)
        if value is not None and value < least:
            raise UserError(f"--{name} {value}: must be at least {least} ({hint})")
    seed = _whole_number(opt, "manualSeed")
    if seed is not None and not utils.SEED_RANGE[0] <= seed <= utils.SEED_RANGE[1]:
        raise UserError(f"--manualSeed {seed}: out of range; give a whole number in {utils.SEED_RANGE_TEXT} "
                        f"(the range torch accepts)")
    need = {f"--FeatureExtraction {opt.FeatureExtraction}": MIN_IMG_W[opt.FeatureExtraction]}
    if opt.Transformation == "TPS":
        need["--Transformation TPS"] = MIN_IMG_W_TPS
    least = max(need.values())
    width = _whole_number(opt, "imgW")
    if width is not None and width < least:
        stages = " and ".join(stage for stage, w in need.items() if w == least)
        raise UserError(f"--imgW {width}: too narrow for {stages}, which needs at least {least} pixels "
                        f"(the network downsamples the width); give --imgW {least} or more (default 100)")
    if opt.Transformation == "TPS":
        fiducial = _whole_number(opt, "num_fiducial")
        if fiducial < 4 or fiducial % 2:
            raise UserError(f"--num_fiducial {fiducial}: TPS needs an even number of at least 4 "
                            f"(half on each edge; default 20)")


def _whole_number(opt, name):
    value = getattr(opt, name, None)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise UserError(f"--{name} {value!r}: not a whole number")
    return value


def usable_cores():
    """The cores this process may run on (its CPU affinity, e.g. under taskset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


MAX_DEFAULT_WORKERS = 4


def default_workers():
    """--workers when not given: 4 loader processes, but no more than the cores this process may
    use (more only compete with the model for the cores, and PyTorch warns about them)."""
    return min(MAX_DEFAULT_WORKERS, usable_cores())


def thread_count(opt):
    """torch's thread count for --threads: the value given, or for 0 the cores this process may use
    divided by the processes of this run on this machine (LOCAL_WORLD_SIZE, set by torchrun), at
    least 1 and at most torch's current count (which follows OMP_NUM_THREADS)."""
    threads = int(getattr(opt, "threads", 0) or 0)
    if threads > 0:
        return threads
    cores = usable_cores()
    try:
        local_processes = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    except ValueError:
        local_processes = 1
    # torch starts with OMP_NUM_THREADS threads when it is set: a lower count chosen by the user
    # (or by torchrun) stands
    return max(1, min(cores // local_processes, torch.get_num_threads()))


def set_threads(opt):
    """Apply `thread_count(opt)` to torch (once the options are resolved, before any work)."""
    count = thread_count(opt)
    if count != torch.get_num_threads():
        torch.set_num_threads(count)
    return count


def save_opt_yaml(opt, path):
    atomic_io.atomic_write_text(path, yaml.safe_dump(dict(sorted(vars(opt).items())), sort_keys=False, allow_unicode=True))
