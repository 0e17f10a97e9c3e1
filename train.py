"""Train a scene-text recognizer: the base round (`--mode base`) or an active-learning round
(`--mode al`) on the labelled data plus every queried set, with a training-time calibrator and
calibration measured at every validation.

    python train.py --train_data data/train_data_lmdb --valid_data data/test_data_lmdb \
        --select_data CVPR2016-NIPS2014 --batch_ratio 0.5-0.5 --Transformation TPS \
        --FeatureExtraction ResNet --SequenceModeling BiLSTM --Prediction Attn ...

Runs as `python train.py` on one device, or `torchrun --nproc_per_node N train.py` with
DistributedDataParallel (rank 0 logs, validates and saves).

`--resume` continues bit for bit: last.pth holds the weights, the optimizer, the loss average, the
random generators and every data stream's position, all taken between two steps (Ctrl-C only asks
the loop to stop there)."""
import csv
import io
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.utils.data
from tqdm import tqdm

from annotators import annotator_noise
from safe_files import atomic_io
from measurement import calibration
import calibrators
import options
import pretrained
import utils
from dataset import NOISE_SCOPES, REPLAY_STREAM, Batch_Balanced_Dataset, hierarchical_dataset
from data_layer.batch_sampling import first_readable
from measurement.evaluation import eval_loader, evaluate
from model import (Model, carry_classes, freeze_stages, hold_frozen_in_eval, initialize_weights, load_trusted,
                   load_weights, parse_stages, save_weights, state_dict_for_saving)

# Options a resumed run may change: where, and on what, it runs, not what it computes (with another
# --device or --threads the floating-point results may differ in the last bits). The weights come
# from last.pth, so --saved_model, --FT and --model_preset are not read. Every other option must match.
RESUME_MAY_CHANGE = ("num_iter", "workers", "device", "threads", "no_progress", "resume", "output_dir", "exp_name",
                     "dry_run", "saved_model", "FT", "model_preset")
PATH_OPTIONS = ("train_data", "valid_data", "character_file", "replay_data")
# Options added after checkpoints were written without them: the value such a checkpoint's run used.
RESUME_DEFAULTS = {"noise_model": annotator_noise.DEFAULT_MODEL, "freeze": "", "replay_data": "", "replay_ratio": 0.0}
# What a run leaves in its folder that a new run there must not be mixed with: the earlier run's
# records (metrics.jsonl, train_summary.json) and its best-calibrated model, which a new run only
# replaces once it reads some words.
STALE_OUTPUTS = ("metrics.jsonl", "train_summary.json", "best_calibration.pth", "noise_log.csv")
NOISE_LOG_COLUMNS = ("relpath", "index", "origin_relpath", "origin_index", "clean_label", "noisy_label", "kind")


def get_args_parser():
    parser = options.make_parser("Train a recognizer for one round of active learning (base or al).")
    options.add_data_args(parser)
    # not required here: --model_preset may give the stages
    options.add_model_args(parser, required=False, preset=True)
    options.add_runtime_args(parser)
    group = parser.add_argument_group("training")
    group.add_argument("--exp_name", default="", help="output folder name under --output_dir (default: from "
                       "architecture, seed, query_iter, mode, calibrator and alpha)")
    group.add_argument("--output_dir", default="saved_models", help="root of the experiment folders")
    group.add_argument("--num_iter", type=int, default=300000, help="number of iterations to train for (0: none; "
                       "--saved_model, validated, becomes this run's best_accuracy.pth in this project's layout)")
    group.add_argument("--valInterval", type=int, default=2000, help="validate every this many iterations")
    group.add_argument("--saved_model", default="", help="checkpoint to start from (the last round's model); "
                       "architecture flags not given are read from the opt.yaml beside it, else from --model_preset; "
                       "a character set given that differs from the one it records needs --FT")
    group.add_argument("--FT", action="store_true", help="fine-tune: load what fits from --saved_model, skip the rest")
    group.add_argument("--resume", nargs="?", const="auto", default="",
                       help="continue exactly from a last.pth (default: the one in this experiment's folder); every "
                            "option must be as in that run except --num_iter (not below the checkpoint's iteration), "
                            "--workers, --device, --threads, --no_progress")
    group.add_argument("--dry_run", action="store_true",
                       help="check the options, the data, --saved_model and --resume, print what would be trained "
                            "(datasets, labelled counts, batch sizes) and exit without writing anything")
    group.add_argument("--adam", action="store_true", help="Adam instead of Adadelta")
    group.add_argument("--lr", type=float, default=1.0, help="learning rate (Adadelta's default 1)")
    group.add_argument("--beta1", type=float, default=0.9, help="beta1 of Adam")
    group.add_argument("--rho", type=float, default=0.95, help="decay rate rho of Adadelta")
    group.add_argument("--eps", type=float, default=1e-8, help="eps of Adadelta")
    group.add_argument("--grad_clip", type=float, default=5.0, help="gradient norm clipping")
    group.add_argument("--lr_schedule", choices=("constant", "cosine"), default="constant",
                       help="learning-rate schedule after warm-up")
    group.add_argument("--warmup_iters", type=int, default=0, help="linear learning-rate warm-up iterations")
    group.add_argument("--calibrator", default="CE",
                       help="training loss: " + ", ".join(calibrators.CALIBRATORS))
    group.add_argument("--alpha", type=float, default=0.0,
                       help="smoothing mass for LS/boost_*/robust, focal gamma for FL")
    group.add_argument("--beta", type=float, default=0.95, help="weight of the given label in boost_soft/boost_hard")
    group.add_argument("--smooth_tail", type=float, default=0.0, help="see the calibrator table in docs/calibration.md")
    group.add_argument("--B", type=float, default=16.0, help="exponential base of robust's global trust")
    group.add_argument("--t", type=float, default=0.5, help="transition point (fraction of training) of robust")
    group.add_argument("--patience", type=int, default=1000000,
                       help="stop after this many validations without a lower ECE (counted once the model reads some words)")
    group.add_argument("--mode", choices=("base", "al"), default="base",
                       help="base: the labelled part of the base datasets only (query sets a --select_data name "
                            "selects are left out; a name selecting only query sets is an error); al: plus the "
                            "query sets in --select_data")
    group.add_argument("--query_iter", default="", help="name of this round, part of the default --exp_name")
    group.add_argument("--noise_ratio", type=float, default=0.0,
                       help="exact share of labels the simulated annotator gets wrong (--noise_model: how)")
    group.add_argument("--noise_model", choices=tuple(annotator_noise.NOISE_MODELS),
                       default=annotator_noise.DEFAULT_MODEL,
                       help="the simulated annotator's errors: substitute (one character, the original's), "
                            "confusable (look-alike glyphs), edit (one insertion, deletion or substitution), "
                            "mixed (docs/noisy-labels.md)")
    group.add_argument("--noise_scope", choices=NOISE_SCOPES, default="queried",
                       help="which labels the simulated annotator noise touches")
    group.add_argument("--freeze", default="",
                       help="stages to keep as --saved_model has them while fine-tuning, comma-separated (e.g. "
                            "FeatureExtraction or Transformation,FeatureExtraction): their parameters get no "
                            "gradient and their BatchNorm layers stay in eval mode (running statistics unchanged)")
    group.add_argument("--replay_data", default="",
                       help="rehearsal: a folder of labelled LMDBs (e.g. the data the --saved_model was trained on) "
                            "whose samples fill --replay_ratio of every batch, all of them labelled, never pool, never "
                            "noisy; keeps a pretrained start from forgetting while it fine-tunes on a few target words")
    group.add_argument("--replay_ratio", type=float, default=0.0,
                       help="share of every batch drawn from --replay_data, in [0, 1); --batch_ratio shares the rest")
    group.add_argument("--channels_last", action="store_true",
                       help="channels-last memory format for the convolutional stages (always on with --amp)")
    return parser


def default_exp_name(opt):
    parts = [opt.Transformation, opt.FeatureExtraction, opt.SequenceModeling, opt.Prediction,
             f"Seed{opt.manualSeed}"]
    if opt.query_iter:
        parts.append(opt.query_iter)
    parts += [opt.mode, opt.calibrator, f"alpha{opt.alpha:g}"]
    return "-".join(parts)


def make_optimizer(model, opt):
    params = [p for p in model.parameters() if p.requires_grad]
    if opt.adam:
        return torch.optim.Adam(params, lr=opt.lr, betas=(opt.beta1, 0.999))
    return torch.optim.Adadelta(params, lr=opt.lr, rho=opt.rho, eps=opt.eps)


def learning_rate_factor(iteration, opt):
    if opt.warmup_iters and iteration < opt.warmup_iters:
        return (iteration + 1) / opt.warmup_iters
    if opt.lr_schedule == "cosine":
        span = max(opt.num_iter - opt.warmup_iters, 1)
        progress = min(max(iteration - opt.warmup_iters, 0) / span, 1.0)
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train_step(model, batch, converter, criterion, optimizer, scaler, opt, device, iteration):
    images, labels, _ = batch
    images = images.to(device, non_blocking=True)
    if opt.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    text, length = converter.encode(labels, batch_max_length=opt.batch_max_length)
    text, length = text.to(device), length.to(device)
    progress = (iteration, opt.num_iter)
    with utils.autocast_context(device, opt.amp):
        if opt.Prediction == "CTC":
            logits = model(images, text)
            target = text
        else:
            logits = model(images, text[:, :-1])
            target = text[:, 1:]
    loss = criterion(logits.float(), target, length, progress)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def validation_block(iteration, opt, train_loss, result, best, elapsed):
    lines = [f"[{iteration}/{opt.num_iter}] train loss {train_loss:.4f}  valid loss {result['valid_loss']:.4f}  "
             f"elapsed {elapsed:.1f}s",
             f"  accuracy {result['accuracy']:.2f}%  norm_ED {result['norm_ED']:.4f}  ECE {result['ece']:.4f}  "
             f"ACE {result['ace']:.4f}  MCE {result['mce']:.4f}  Brier {result['brier']:.4f}",
             f"  best accuracy {best['accuracy']:.2f}%  best ECE {best['ece']:.4f}",
             f"  {'ground truth':25s} | {'prediction':25s} | confidence"]
    for gt, pred, conf in result["examples"]:
        mark = "ok " if gt == pred else "err"
        lines.append(f"  {gt:25s} | {pred:25s} | {conf:.4f} {mark}")
    return "\n".join(lines)


def json_safe(value):
    """`value` with every NaN or infinite float replaced by None: JSON has no such numbers, and strict
    readers reject the `NaN` / `Infinity` that Python's json writes by default."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def dump_json(value, **kwargs):
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def check_data_paths(opt):
    for flag in ("train_data", "valid_data"):
        options.require_dir(getattr(opt, flag), f"--{flag}", "give the root folder of the LMDB datasets",
                            if_absent="run `make data` or point it at your LMDBs")
    if getattr(opt, "replay_data", ""):
        options.require_dir(opt.replay_data, "--replay_data", "give the root folder of the labelled LMDBs to replay",
                            if_absent="point it at the LMDBs the start was trained on")


def check_train_options(opt):
    """One UserError naming the flag for a value of train.py's own options that no run can use
    (float() reads 'nan' and 'inf', which would silently poison the weights)."""
    def require(ok, name, requirement):
        if not ok:
            raise utils.UserError(f"--{name} {getattr(opt, name)}: {requirement}")

    def finite(name):
        return math.isfinite(getattr(opt, name))

    require(opt.num_iter >= 0, "num_iter", "must be 0 (keep --saved_model as it is, validated) or more")
    require(opt.num_iter >= 1 or (opt.saved_model and not opt.resume), "num_iter",
            "trains nothing: 0 keeps --saved_model as the round's model (validated and saved), so give --saved_model")
    require(opt.valInterval >= 1, "valInterval", "must be at least 1")
    require(opt.warmup_iters >= 0, "warmup_iters", "must be 0 (no warm-up) or more")
    require(opt.patience >= 1, "patience", "must be at least 1")
    require(finite("lr") and opt.lr > 0, "lr",
            "give a positive finite learning rate, e.g. 1 (Adadelta) or 0.001 (--adam)")
    require(finite("grad_clip") and opt.grad_clip > 0, "grad_clip",
            "give a positive finite gradient-norm limit, e.g. 5")
    require(finite("eps") and opt.eps > 0, "eps", "give a small positive number, e.g. 1e-8")
    require(0.0 <= opt.rho <= 1.0, "rho", "must lie between 0 and 1")
    require(0.0 <= opt.beta1 < 1.0, "beta1", "must lie in [0, 1)")
    require(0.0 <= opt.beta <= 1.0, "beta", "must lie between 0 and 1")
    require(0.0 <= opt.noise_ratio <= 1.0, "noise_ratio", "must lie between 0 and 1")
    for name in ("alpha", "smooth_tail", "B", "t"):
        require(finite(name), name, "give a finite number")
    opt.freeze = ",".join(parse_stages(opt.freeze))  # recorded in opt.yaml in the model's order
    require(finite("replay_ratio") and 0.0 <= opt.replay_ratio < 1.0, "replay_ratio",
            "must lie in [0, 1): the share of every batch drawn from --replay_data")
    require(opt.replay_ratio == 0.0 or opt.replay_data, "replay_ratio",
            "needs --replay_data, the folder of labelled LMDBs to draw that share from")
    if opt.replay_data and opt.replay_ratio == 0.0:
        raise utils.UserError(f"--replay_data {opt.replay_data}: give --replay_ratio, the share of every batch drawn "
                              "from it (e.g. 0.5)")


def check_saved_model_charset(opt):
    """The opt.yaml that train.py saves beside a model records its character set; the same number
    of classes in another order (or other characters) would load without a shape error and read
    every character as another one."""
    saved = options.load_opt_yaml(opt.saved_model).get("character")
    if saved is None or saved == opt.character:
        return
    message = (f"--saved_model {opt.saved_model} was trained with --character {saved!r} (its opt.yaml) but this "
               f"run uses {opt.character!r}")
    if not opt.FT:
        raise utils.UserError(f"{message}; give the same --character / --sensitive / --character_file, or add --FT "
                              "to fine-tune onto the new character set")
    print(f"warning: {message}; --FT loads the layers that fit", file=sys.stderr)


def read_last_checkpoint(path):
    """The dict in a last.pth, opened without running code from the file; a UserError naming `path`
    for anything else (a text file, a plain state_dict, an arbitrary pickle)."""
    hint = ("give the last.pth of an experiment folder; a best_*.pth holds weights only: start from it with "
            "--saved_model")
    try:
        state = load_trusted(path)
    except Exception as err:  # a foreign file makes the unpickler raise almost anything
        raise utils.UserError(f"--resume {path}: not a checkpoint train.py can resume from "
                              f"({type(err).__name__}); {hint}") from None
    required = {"model": dict, "optimizer": dict, "iteration": int, "opt": dict, "rng": dict}
    missing = [key for key, kind in required.items()
               if not isinstance(state, dict) or not isinstance(state.get(key), kind)]
    if missing:
        raise utils.UserError(f"--resume {path}: not a last.pth written by train.py (no {', '.join(missing)}); {hint}")
    return state


def show_value(name, value):
    if name in ("select_data", "batch_ratio") and isinstance(value, (list, tuple)):
        return "-".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    if name == "adam":
        return "Adam" if value else "Adadelta"
    return repr(value) if isinstance(value, str) else str(value)


def check_resume_options(opt, saved, path, names):
    """UserError listing every option (among `names`) whose value differs from the run that wrote
    the checkpoint, except those in RESUME_MAY_CHANGE."""
    changed = []
    saved = {**RESUME_DEFAULTS, **saved}
    for name in names:
        if name in RESUME_MAY_CHANGE or name not in saved or not hasattr(opt, name):
            continue
        before, now = saved[name], getattr(opt, name)
        if name in PATH_OPTIONS and before and now:
            before, now = os.path.realpath(before), os.path.realpath(now)
        if isinstance(before, tuple):
            before = list(before)
        if before != now:
            flag = "optimizer (--adam)" if name == "adam" else f"--{name}"
            changed.append(f"{flag} {show_value(name, saved[name])} -> {show_value(name, getattr(opt, name))}")
    if changed:
        raise utils.UserError(f"--resume {path}: the options differ from the run that wrote it: {'; '.join(changed)}. "
                              "A resumed run may change only --num_iter (and --workers, --device, --threads, "
                              "--no_progress); give the other options as they were, or start a new --exp_name")


def averager_state(averager):
    total = averager.total.detach().cpu() if torch.is_tensor(averager.total) else averager.total
    return {"total": total, "count": averager.count}


def load_averager_state(averager, state, device):
    total = state["total"]
    averager.total = total.to(device) if torch.is_tensor(total) else total
    averager.count = state["count"]


def truncate_metrics(path, iteration):
    """Drop the records of metrics.jsonl after `iteration` (a run killed between writing a record and
    saving last.pth leaves some) and a line torn by the kill; returns how many were dropped."""
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("iteration", 0) <= iteration:
            kept.append(line)
    if len(kept) != len(lines):
        atomic_io.atomic_write_text(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


def clear_earlier_run(save_dir):
    """A run started without --resume in a folder holding an earlier one: say so and remove what
    would otherwise mix with this run's outputs (the other files are rewritten at its first
    validation)."""
    earlier = [name for name in ("last.pth",) + STALE_OUTPUTS if os.path.exists(os.path.join(save_dir, name))]
    if not earlier:
        return
    stale = [name for name in STALE_OUTPUTS if name in earlier]
    for name in stale:
        os.remove(os.path.join(save_dir, name))
    print(f"warning: {save_dir} holds an earlier run ({', '.join(earlier)}); this run starts afresh there"
          + (f" ({', '.join(stale)} removed)" if stale else "") + "; add --resume to continue the earlier run instead",
          file=sys.stderr)


class StopOnSignal:
    """Ctrl-C (SIGINT) and SIGTERM (what `kill`, SLURM and other schedulers send ahead of a job's
    time limit) only ask the training loop to stop: the loop finishes the current step and saves
    last.pth between two steps. Stopping inside a step would save half of it (BatchNorm statistics
    updated by a forward pass whose optimizer step never ran). A second signal raises
    KeyboardInterrupt, which stops at once without saving."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = None  # the name of the first signal received
        self.previous = {}

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self):
        for signum in self.SIGNALS:
            try:
                self.previous[signum] = signal.signal(signum, self.handle)
            except ValueError:  # not the main thread: signals cannot be caught there
                break
        return self

    def __exit__(self, *exc):
        for signum, previous in self.previous.items():
            fallback = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
            signal.signal(signum, previous if previous is not None else fallback)
        return False


def noise_log_text(records):
    """noise_log.csv: one row per corrupted training label (`NOISE_LOG_COLUMNS`; the origin columns
    empty outside query sets)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(NOISE_LOG_COLUMNS)
    for record in records:
        writer.writerow(["" if record[column] is None else record[column] for column in NOISE_LOG_COLUMNS])
    return buffer.getvalue()


def describe_plan(opt, save_dir, train_dataset, valid_set, start_iter, world_size, n_params):
    lines = [f"dry run: nothing written, nothing trained; {save_dir} "
             + ("exists" if os.path.isdir(save_dir) else "would be created"),
             f"iterations: {start_iter} -> {opt.num_iter}"
             + (f" (resuming {opt.resume})" if opt.resume else "")
             + (f", from {opt.saved_model}" if opt.saved_model and not opt.resume else ""),
             f"mode {opt.mode}, calibrator {opt.calibrator}, {n_params:,} trainable parameters"
             + (f", {world_size} processes" if world_size > 1 else ""),
             "training data (labelled samples, images per batch and process):"]
    for name in train_dataset.names:
        count = train_dataset.num_samples.get(name, train_dataset.replay_samples)
        lines.append(f"  {name}: {count} labelled{' (--replay_data)' if name == REPLAY_STREAM else ''}, "
                     f"{train_dataset.batch_sizes[name]} per batch")
    lines.append(f"  total: {sum(train_dataset.num_samples.values())} labelled"
                 + (" (--replay_data not counted)" if train_dataset.replay_samples else "")
                 + f", {sum(train_dataset.batch_sizes.values())} per batch")
    lines.append(f"validation: {len(valid_set)} samples in {opt.valid_data}")
    return "\n".join(lines)


class StoppedTogether(SystemExit):
    """An interrupt every rank acts on after the same step (rank 0's signal is broadcast), so the
    ranks can still wait for each other before leaving the process group."""


def main(opt):
    given = options.given_option_names(opt, get_args_parser())
    vars(opt).pop("given_options", None)  # not an option: kept out of opt.yaml and last.pth
    if opt.saved_model and not opt.resume and os.path.isfile(opt.saved_model):
        # the architecture travels with the checkpoint: its opt.yaml (else --model_preset) fills
        # what the flags do not give
        options.fill_from_saved(opt, given)
    else:
        options.fill_from_preset(opt, given)
    options.resolve_options(opt)
    check_train_options(opt)
    check_data_paths(opt)
    with utils.distributed_session(completes=StoppedTogether) as (rank, world_size, local_rank, distributed):
        return train(opt, rank, world_size, local_rank, distributed)


def train(opt, rank, world_size, local_rank, distributed):
    """Train on this process's share of the data; the save folder (None for --dry_run)."""
    is_main = rank == 0
    device = utils.select_device(opt.device, local_rank)
    opt.amp = utils.effective_amp(opt.amp, device)
    utils.set_seed(opt.manualSeed)
    converter = utils.make_converter(opt.Prediction, opt.character)
    opt.num_class = len(converter.character)
    criterion = calibrators.get_calibrator(opt.calibrator, opt)
    valid_criterion = calibrators.get_calibrator("CE", opt)
    if not opt.exp_name:
        opt.exp_name = default_exp_name(opt)
    save_dir = os.path.join(opt.output_dir, opt.exp_name)
    options.check_output_dir(opt.output_dir, "--output_dir")
    options.check_output_dir(save_dir, "--exp_name")
    if opt.resume == "auto":
        opt.resume = os.path.join(save_dir, "last.pth")
    checkpoint = None
    if opt.resume:
        if not os.path.isfile(opt.resume):
            raise utils.UserError(f"--resume {opt.resume}: no such checkpoint; train once without --resume first")
        checkpoint = read_last_checkpoint(opt.resume)
        check_resume_options(opt, checkpoint["opt"], opt.resume,
                             sorted({action.dest for action in get_args_parser()._actions} | {"num_class"}))
        if opt.num_iter < checkpoint["iteration"]:
            raise utils.UserError(f"--num_iter {opt.num_iter}: below the iteration of --resume {opt.resume} "
                                  f"({checkpoint['iteration']}); give --num_iter {checkpoint['iteration']} or more")
        saved_world = len(checkpoint["data"]) if checkpoint.get("data") is not None else world_size
        if saved_world != world_size:
            raise utils.UserError(f"--resume {opt.resume}: written by {saved_world} processes, this run has "
                                  f"{world_size}; resume with the same number of processes")
    elif opt.saved_model:
        options.require_file(opt.saved_model, "--saved_model", "give the checkpoint to start from")
        check_saved_model_charset(opt)
    if opt.mode == "al" and not opt.saved_model and not opt.resume and is_main:
        print("warning: --mode al without --saved_model starts from random weights", file=sys.stderr)

    train_dataset = Batch_Balanced_Dataset(opt, rank=rank, world_size=world_size, query_sets=opt.mode == "al")
    if is_main:
        for warning in train_dataset.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        valid_set, valid_log = hierarchical_dataset(opt.valid_data, opt, select_data="/", flag="--valid_data")
        print(valid_log)
        if len(valid_set) == 0:
            raise utils.UserError(f"--valid_data {opt.valid_data}: no sample passes the label filters "
                                  "(--batch_max_length, --character); point it at a validation set for this charset")
        if first_readable(valid_set) is None:
            raise utils.UserError(f"--valid_data {opt.valid_data}: none of its {len(valid_set)} images decodes; "
                                  "rebuild the LMDB with create_lmdb_dataset.py")
        valid_loader = eval_loader(valid_set, opt, device)

    model = Model(opt)
    initialize_weights(model)
    if opt.saved_model and checkpoint is None:
        weights, new_classes = opt.saved_model, []
        saved_charset = pretrained.checkpoint_charset(opt.saved_model, opt.model_preset) if opt.FT else None
        if saved_charset is not None and saved_charset != opt.character:
            # another character set: the outputs of the characters both sets hold keep their rows
            weights, carried, new_classes = carry_classes(
                opt.saved_model, model, opt.Prediction, utils.make_converter(opt.Prediction, saved_charset).character,
                converter.character)
            if is_main:
                print(f"classes: {len(carried)} of {opt.num_class} carried over from the checkpoint by character"
                      + (f"; new (initial values): {''.join(new_classes)!r}" if new_classes else ""))
        report = load_weights(model, weights, strict=not opt.FT)
        if opt.num_iter == 0 and (not report.complete or new_classes):
            problems = report.problems() or f"no output for {''.join(new_classes)!r}"
            raise utils.UserError(f"--num_iter 0 keeps --saved_model {opt.saved_model} as it is, but it does not fit "
                                  f"this model ({problems}); train the new parts (--num_iter 1 or more) or give the "
                                  f"checkpoint's own --character")
        if is_main:
            print(f"loaded {opt.saved_model}" + (f" ({report.fine_tune_summary()})" if opt.FT else ""))
    model.to(device)
    if opt.channels_last or opt.amp:
        # with autocast the convolutions run fastest on channels-last weights (tools/benchmark.py)
        model.to(memory_format=torch.channels_last)
    frozen_stages = parse_stages(opt.freeze)
    frozen = freeze_stages(model, frozen_stages)
    if frozen_stages and is_main:
        print(f"frozen: {', '.join(frozen_stages)} ({frozen:,} parameters)")
        if not opt.saved_model and checkpoint is None:
            print("warning: --freeze without --saved_model keeps those stages at their random initial values",
                  file=sys.stderr)
    model.train()
    hold_frozen_in_eval(model, frozen_stages)
    optimizer = make_optimizer(model, opt)
    # the schedule scales these; a resumed optimizer's lr is the scaled one of its last step
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    use_scaler = opt.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    loss_avg = utils.Averager()

    start_iter = 0
    best = {"accuracy": -1.0, "ece": float("inf"), "norm_ED": -1.0}
    stale_validations = 0
    elapsed_before = 0.0
    if checkpoint is not None:
        load_weights(model, checkpoint["model"], strict=True)
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            raise utils.UserError(f"--resume {opt.resume}: its optimizer state does not fit this model "
                                  f"({err})") from None
        if use_scaler and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        if checkpoint.get("data") is not None:
            try:
                train_dataset.load_state_dict(checkpoint["data"][rank])
            except utils.UserError as err:
                raise utils.UserError(f"--resume {opt.resume}: {err}") from None
        elif is_main:
            print("warning: this last.pth does not record the data loaders' positions (an older train.py wrote it): "
                  "they start afresh, so the run will differ from an uninterrupted one", file=sys.stderr)
        if checkpoint.get("loss_avg") is not None:
            load_averager_state(loss_avg, checkpoint["loss_avg"], device)
        start_iter = checkpoint["iteration"]
        best = dict(checkpoint["best"])
        stale_validations = checkpoint.get("stale_validations", 0)
        elapsed_before = checkpoint.get("elapsed", 0.0)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    if opt.dry_run:
        if is_main:
            print(describe_plan(opt, save_dir, train_dataset, valid_set, start_iter, world_size, n_params))
        return None

    train_model = model
    if distributed:
        ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
        train_model = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs)

    metrics_path = os.path.join(save_dir, "metrics.jsonl")
    if is_main:
        # the experiment folder appears only once the data, the options and the checkpoints are checked
        if checkpoint is None:
            clear_earlier_run(save_dir)
        dropped = truncate_metrics(metrics_path, start_iter) if checkpoint is not None else 0
        os.makedirs(save_dir, exist_ok=True)
        with open(os.path.join(save_dir, "log_dataset.txt"), "a", encoding="utf-8") as log_dataset:
            log_dataset.write(train_dataset.log_text + valid_log + "\n")
        options.save_opt_yaml(opt, os.path.join(save_dir, "opt.yaml"))
        log_train = utils.Logger(os.path.join(save_dir, "log_train.txt"))
        if checkpoint is not None:
            log_train.log(f"resumed from {opt.resume} at iteration {start_iter}"
                          + (f" ({dropped} metrics.jsonl records after it dropped)" if dropped else ""))
        log_train.log(f"{opt.exp_name}: {n_params:,} trainable parameters on {device}"
                      f"{f' x {world_size} processes' if distributed else ''}, amp={'on' if opt.amp else 'off'}")
        if train_dataset.num_corrupted:
            log_train.log(f"simulated annotator noise: {train_dataset.num_corrupted} labels corrupted "
                          f"(noise_ratio {opt.noise_ratio}, scope {opt.noise_scope}, model {opt.noise_model}; "
                          f"noise_log.csv)")
        if opt.noise_ratio > 0:
            # the truth behind every corrupted label, for any tool to score itself against
            atomic_io.atomic_write_text(os.path.join(save_dir, "noise_log.csv"),
                                        noise_log_text(train_dataset.noise_records()))

    start_time = time.time()

    def elapsed():
        return elapsed_before + time.time() - start_time

    def save_last(iteration):
        # every rank's streams, so that each can resume its own shard; all ranks call this together
        data_states = utils.all_gather_object(train_dataset.state_dict())
        if not is_main:
            return
        atomic_io.atomic_torch_save({
            "model": state_dict_for_saving(model), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if use_scaler else None, "iteration": iteration, "best": best,
            "stale_validations": stale_validations, "rng": rng_state(), "opt": vars(opt), "data": data_states,
            "loss_avg": averager_state(loss_avg), "elapsed": elapsed(),
        }, os.path.join(save_dir, "last.pth"))

    def validate(iteration):
        """Validate, record, save the best models; True when patience runs out."""
        nonlocal stale_validations
        # validation must not move the random generators, or a run's numbers would depend on how
        # often it validated and on where a resumed run picked up
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            result = evaluate(model, valid_loader, converter, opt, device, criterion=valid_criterion,
                              amp=opt.amp, max_samples_kept=5)
        # A model that reads nothing, at confidence ~0, is trivially calibrated: only a
        # model that reads some words can become the best-calibrated one.
        improved_ece = result["accuracy"] > 0 and result["ece"] < best["ece"]
        if result["accuracy"] > best["accuracy"]:
            best["accuracy"] = result["accuracy"]
            save_weights(model, os.path.join(save_dir, "best_accuracy.pth"))
            calibration.reliability_diagram(result["confidence"], result["correct"],
                                      os.path.join(save_dir, "reliability_best_accuracy.png"),
                                      bins=opt.bins, title=f"best accuracy, iteration {iteration}")
        if improved_ece:
            best["ece"] = result["ece"]
            save_weights(model, os.path.join(save_dir, "best_calibration.pth"))
            stale_validations = 0
        elif best["ece"] != float("inf"):
            stale_validations += 1
        best["norm_ED"] = max(best["norm_ED"], result["norm_ED"])
        calibration.reliability_diagram(result["confidence"], result["correct"],
                                  os.path.join(save_dir, "reliability_latest.png"),
                                  bins=opt.bins, title=f"iteration {iteration}")
        seconds = elapsed()
        record = {"iteration": iteration, "train_loss": loss_avg.val(), "lr": optimizer.param_groups[0]["lr"],
                  **{k: result[k] for k in ("valid_loss", "accuracy", "norm_ED", "ece", "ace", "mce", "brier")},
                  "elapsed": seconds}
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(dump_json(record) + "\n")
        block = validation_block(iteration, opt, loss_avg.val(), result, best, seconds)
        if train_dataset.skipped_images:
            block += "\n  " + train_dataset.skipped_report()
        progress_bar.clear()
        log_train.log(block)
        loss_avg.reset()
        stop = stale_validations >= opt.patience
        if stop:
            log_train.log(f"early stop: ECE did not improve for {opt.patience} validations")
        return stop

    iteration = start_iter
    show_progress = is_main and not opt.no_progress and sys.stdout.isatty()
    progress_bar = tqdm(total=opt.num_iter, initial=start_iter, disable=not show_progress, dynamic_ncols=True)
    if checkpoint is not None:
        # last: everything above (model construction, loader set-up) may draw random numbers
        set_rng_state(checkpoint["rng"])
    if opt.num_iter == 0 and is_main:
        # the starting model as the round's model: validated and saved like a trained one, so that
        # the next round and test.py find it (in this project's layout, with its opt.yaml)
        validate(0)
    try:
        with StopOnSignal() as interrupt:
            while iteration < opt.num_iter:
                factor = learning_rate_factor(iteration, opt)
                for group, base_lr in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base_lr * factor
                hold_frozen_in_eval(model, frozen_stages)  # validation ends with model.train()
                loss = train_step(train_model, train_dataset.get_batch(), converter, criterion, optimizer, scaler,
                                  opt, device, iteration)
                loss_avg.add(loss)
                iteration += 1
                progress_bar.update(1)
                saved = False
                if iteration == 1 or iteration % opt.valInterval == 0 or iteration == opt.num_iter:
                    stop = validate(iteration) if is_main else False
                    save_last(iteration)
                    saved = True
                    stop = utils.broadcast_flag(stop) if distributed else stop
                    if stop:
                        break
                # rank 0's signal decides, so that every process stops after the same step
                if utils.broadcast_flag(bool(interrupt.requested)) if distributed else interrupt.requested:
                    if not saved:
                        save_last(iteration)
                    progress_bar.close()
                    if is_main:
                        print(f"\ninterrupted ({interrupt.requested or 'by rank 0'}): stopped after iteration {iteration} with "
                              f"{os.path.join(save_dir, 'last.pth')} saved; continue with --resume", file=sys.stderr)
                    raise StoppedTogether(143 if interrupt.requested == "SIGTERM" else 130)  # 128 + the signal's number
    except KeyboardInterrupt:
        progress_bar.close()
        if is_main:
            print(f"\ninterrupted twice: stopped in iteration {iteration + 1} without saving it; "
                  f"{os.path.join(save_dir, 'last.pth')} holds the last saved iteration (continue with --resume)",
                  file=sys.stderr)
        sys.exit(130)
    progress_bar.close()
    if is_main:
        log_train.log(f"finished at iteration {iteration}: best accuracy {best['accuracy']:.2f}%, "
                      f"best ECE {best['ece']:.4f}; models in {save_dir}")
        atomic_io.atomic_write_text(os.path.join(save_dir, "train_summary.json"), dump_json({
            "iterations": iteration, "best": best, "seconds": elapsed(),
            "labelled_samples": dict(train_dataset.num_samples),
            "labelled_total": sum(train_dataset.num_samples.values()),
            "corrupted_labels": train_dataset.num_corrupted, "select_data": opt.select_data,
            "batch_ratio": opt.batch_ratio, "mode": opt.mode, "calibrator": opt.calibrator,
            "replay_samples": train_dataset.replay_samples, "replay_ratio": opt.replay_ratio}, indent=2))
    return save_dir


def run(argv=None):
    """The command line: parse, train, and report bad input as one line (exit 2). A Ctrl-C outside
    the training loop (which handles its own) ends quietly with the usual status 130."""
    utils.exit_on_user_error(main, interrupted="interrupted outside the training loop; last.pth, if there is one, "
                                               "holds the last saved iteration")(
        options.parse_with_given(get_args_parser(), argv))


if __name__ == "__main__":
    run()
