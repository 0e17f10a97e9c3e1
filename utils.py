"""Shared helpers: user errors, label converters, decoding, logging, devices and distributed runs
(atomic writes and temporaries live in safe_files/atomic_io.py; simulated annotators in annotators/annotator_noise.py;
temperature scaling and the calibration metrics in measurement/calibration.py)."""
import contextlib
import errno
import functools
import os
import random
import sys

import lmdb
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from safe_files import atomic_io


class UserError(Exception):
    """Bad input the user can fix; reported as one line and exit status 2."""


def os_error_message(err):
    """The one-line message for an OSError that bad surroundings cause (a read-only or full disk,
    missing permissions), naming the path; None for any other OSError."""
    where = f"{err.filename}: " if err.filename else ""
    if err.errno in atomic_io.DISK_FULL:
        return f"{where}{os.strerror(err.errno).lower()}; free some space or choose a folder on another disk"
    if err.errno == errno.EROFS:
        return f"{where}read-only file system; choose a folder on a writable disk"
    if err.errno in atomic_io.NOT_WRITABLE:
        return f"{where}permission denied; fix its permissions or choose a path you may write to"
    return None


def lmdb_error_message(err):
    return (f"LMDB error: {err}; if a disk is full, free some space; if an LMDB is damaged, rebuild it "
            f"with create_lmdb_dataset.py")


INTERRUPTED = "interrupted; no output is left half-written (each is written whole or not at all)"


def exit_on_user_error(main=None, *, interrupted=INTERRUPTED):
    """Wrap a script's `main` so that a UserError, an OSError from a read-only, full or forbidden
    place (`os_error_message`) or an LMDB error becomes one `error: ...` line on stderr and exit 2,
    and a Ctrl-C the one line `interrupted` and exit 130 (128 + SIGINT), as a shell reports it.
    Other exceptions keep their traceback: they are bugs. Usable as `@exit_on_user_error` and as
    `exit_on_user_error(main, interrupted=...)`."""
    if main is None:
        return functools.partial(exit_on_user_error, interrupted=interrupted)

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            # on a line of its own: the terminal's ^C (or a progress bar) ends mid-line
            print(f"\n{interrupted}", file=sys.stderr)
            sys.exit(130)
        except UserError as err:
            message = str(err)
        except OSError as err:
            message = os_error_message(err)
            if message is None:
                raise
        except lmdb.Error as err:
            message = lmdb_error_message(err)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)

    return wrapper


# ---------------------------------------------------------------------------------------------
# Label converters
# ---------------------------------------------------------------------------------------------

def _unknown_character_error(text, char):
    return UserError(f"label {text!r} holds {char!r}, which is not in the character set; add it with "
                     f"--character or --character_file (or use --sensitive for the 94 printable ASCII "
                     f"characters), or leave out --data_filtering_off so such labels are filtered")


class AttnLabelConverter:
    """Text <-> indices for the attention decoder: `[GO]` = 0, `[s]` = 1, characters from 2."""

    prediction = "Attn"
    GO, EOS = 0, 1

    def __init__(self, character):
        self.character = ["[GO]", "[s]"] + list(character)
        self.dict = {char: i for i, char in enumerate(self.character)}

    def encode(self, texts, batch_max_length=25, device=None):
        """`(text, lengths)`: `text` (B, L+2) long, [GO] in column 0, the characters, [s], then 0
        ([GO]) padding; `lengths` (B,) = characters + 1 for [s]. Texts longer than L are cut to L
        (the original cut the text but not its length)."""
        rows, lengths = [], []
        width = batch_max_length + 2
        for text in texts:
            kept = text[:batch_max_length]
            row = [self.GO] + [self._index(text, char) for char in kept] + [self.EOS]
            rows.append(row + [self.GO] * (width - len(row)))
            lengths.append(len(kept) + 1)
        return (torch.tensor(rows, dtype=torch.long, device=device).view(len(rows), width),
                torch.tensor(lengths, dtype=torch.long, device=device))

    def _index(self, text, char):
        index = self.dict.get(char)
        if index is None or index < 2:
            raise _unknown_character_error(text, char)
        return index

    def decode(self, index, lengths=None):
        """Rows of indices -> strings, every row in full as the original (`lengths` is accepted for
        the common signature and not used), so a string carries `[s]` and what follows; see
        `strip_eos`. Use `decode_predictions` for model outputs."""
        return ["".join(self.character[i] for i in row) for row in _as_index_rows(index)]

    @staticmethod
    def strip_eos(text):
        """The part of a decoded string before the first `[s]`."""
        return text.split("[s]", 1)[0]


class CTCLabelConverter:
    """Text <-> indices for CTC: the blank `[CTCblank]` = 0, characters from 1."""

    prediction = "CTC"
    BLANK = 0

    def __init__(self, character):
        self.character = ["[CTCblank]"] + list(character)
        self.dict = {char: i + 1 for i, char in enumerate(character)}

    def encode(self, texts, batch_max_length=25, device=None):
        """`(text, lengths)`: `text` (B, L) long padded with 0, `lengths` (B,) = characters (cut to L)."""
        rows, lengths = [], []
        for text in texts:
            kept = text[:batch_max_length]
            row = []
            for char in kept:
                index = self.dict.get(char)
                if index is None:
                    raise _unknown_character_error(text, char)
                row.append(index)
            rows.append(row + [self.BLANK] * (batch_max_length - len(row)))
            lengths.append(len(row))
        return (torch.tensor(rows, dtype=torch.long, device=device).view(len(rows), batch_max_length),
                torch.tensor(lengths, dtype=torch.long, device=device))

    def decode(self, index, lengths=None):
        """Greedy-path rows -> strings: within the first `lengths[i]` frames (all when None), drop
        repeats of the previous frame, then blanks."""
        index = _as_index(index)
        keep = ctc_keep_mask(index)
        if lengths is not None:
            lengths = torch.as_tensor(lengths).detach().cpu().long().view(-1, 1)
            keep &= torch.arange(index.size(1)).unsqueeze(0) < lengths
        return ["".join(self.character[i] for i in row) for row in _split_rows(index[keep], keep)]


CONVERTERS = {"Attn": AttnLabelConverter, "CTC": CTCLabelConverter}


def make_converter(prediction, character):
    """The converter for a prediction head by name (`Attn` or `CTC`)."""
    if prediction not in CONVERTERS:
        raise UserError(f"--Prediction {prediction}: unknown; choose one of {', '.join(CONVERTERS)}")
    return CONVERTERS[prediction](character)


def _as_index(index):
    """A (B, T) long CPU tensor from a tensor or nested lists (a single row becomes B = 1)."""
    index = torch.as_tensor(index).detach().cpu().long()
    return index.unsqueeze(0) if index.dim() == 1 else index


def _as_index_rows(index):
    return _as_index(index).tolist()


def _split_rows(values, mask):
    """The masked values of each row, as lists (values = tensor[mask], row-major)."""
    counts = mask.sum(1).tolist()
    return [part.tolist() for part in torch.split(values, counts)]


def ctc_keep_mask(index):
    """(B, T) bool: frames whose symbol starts a run and is not the blank (greedy CTC collapse)."""
    previous = torch.full_like(index[:, :1], -1)
    starts = index != torch.cat([previous, index[:, :-1]], dim=1)
    return starts & (index != CTCLabelConverter.BLANK)


# ---------------------------------------------------------------------------------------------
# Decoding, confidence and per-step uncertainty
# ---------------------------------------------------------------------------------------------

def _is_ctc(converter):
    return getattr(converter, "prediction", None) == "CTC"


def token_mask(logits, converter):
    """(B, T) bool: the steps that make up the prediction. Attn: up to and including the first
    `[s]` (every step when none is produced). CTC: every frame, since a frame that hesitates between
    a character and the blank is uncertainty about the text too."""
    index = logits.argmax(-1)
    if _is_ctc(converter):
        return torch.ones_like(index, dtype=torch.bool)
    return _attn_steps(index)[0]


def _attn_steps(index):
    """Mask of counted steps and the number of characters before [s], per row."""
    steps = index.size(1)
    eos = index == AttnLabelConverter.EOS
    has_eos = eos.any(1)
    first = torch.where(has_eos, eos.int().argmax(1), torch.full_like(has_eos, steps, dtype=torch.long))
    counted = torch.where(has_eos, first + 1, first)
    mask = torch.arange(steps, device=index.device).unsqueeze(0) < counted.unsqueeze(1)
    return mask, first


def decode_predictions(logits, converter):
    """Greedy decoding of (B, T, C) logits -> `(texts, word_conf, char_conf)`, in fp32 on the CPU.

    Attn: the text stops before the first `[s]` and leaves out `[GO]` steps; `word_conf` is the product of the per-step maximum
    probabilities up to and including `[s]` (all steps when no `[s]` is produced); `char_conf[i]`
    holds those factors (so its product is `word_conf[i]`).
    CTC: the text is the collapsed greedy path; `word_conf` is the probability of that text under
    the model, summed over all its alignments, exp(-CTC loss) (as the original's beam-1 prefix
    search scored it), so blank frames that nearly emitted a character lower it; `char_conf[i]`
    holds the maximum probability of the frame that emitted each character."""
    logits = logits.detach().float()
    probs = logits.softmax(-1)
    max_prob, index = probs.max(-1)
    if _is_ctc(converter):
        keep = ctc_keep_mask(index)
        word_conf = _ctc_text_probability(logits, index, keep)
        emitted = keep
    else:
        emitted, first = _attn_steps(index)
        word_conf = torch.where(emitted, max_prob, torch.ones_like(max_prob)).prod(1)
        # [GO] is never a character: one predicted mid-word adds nothing to the text (it still
        # counts in the confidence, as the step it is)
        keep = (torch.arange(index.size(1), device=index.device).unsqueeze(0) < first.unsqueeze(1)) & \
            (index != AttnLabelConverter.GO)
    keep, emitted, index, max_prob = keep.cpu(), emitted.cpu(), index.cpu(), max_prob.cpu()
    texts = ["".join(converter.character[i] for i in row) for row in _split_rows(index[keep], keep)]
    char_conf = list(torch.split(max_prob[emitted], emitted.sum(1).tolist()))
    return texts, word_conf.cpu(), char_conf


def _ctc_text_probability(logits, index, keep):
    """P(collapsed greedy text | x) per row = exp(-CTC loss of that text)."""
    batch, steps = index.shape
    if steps == 0 or batch == 0:
        return torch.ones(batch, device=logits.device)
    # Pack the kept symbols to the left of each row; dropped frames scatter into a spare column.
    position = torch.where(keep, keep.long().cumsum(1) - 1, torch.full_like(index, steps))
    targets = torch.zeros(batch, steps + 1, dtype=torch.long, device=index.device)
    targets.scatter_(1, position, torch.where(keep, index, torch.zeros_like(index)))
    log_probs = logits.log_softmax(-1).transpose(0, 1)
    input_lengths = torch.full((batch,), steps, dtype=torch.long, device=index.device)
    nll = F.ctc_loss(log_probs, targets[:, :steps], input_lengths, keep.sum(1), blank=0, reduction="none")
    return torch.exp(-nll)


def mean_margin(probs, mask):
    """Mean over the counted steps of top-1 minus top-2 probability, per row (0 for no steps)."""
    top = probs.float().topk(2, dim=-1).values
    return _masked_mean(top[..., 0] - top[..., 1], mask)


def mean_entropy(probs, mask):
    """Mean over the counted steps of the entropy (nats) of each step's distribution, per row."""
    probs = probs.float()
    entropy = -torch.special.xlogy(probs, probs).sum(-1)
    return _masked_mean(entropy, mask)


def _masked_mean(values, mask):
    mask = mask.to(values.device)
    total = torch.where(mask, values, torch.zeros_like(values)).sum(-1)
    return total / mask.sum(-1).clamp(min=1)


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------

class Averager:
    """Weighted running mean. `add(value, n=1)`: a float or a tensor (each element counts n times);
    tensors are summed on their device, so adding does not wait for the GPU."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.total = 0.0
        self.count = 0

    def add(self, value, n=1):
        if torch.is_tensor(value):
            value = value.detach()
            self.total = self.total + value.float().sum() * n
            self.count += value.numel() * n
        else:
            self.total = self.total + float(value) * n
            self.count += n

    def val(self):
        """The mean so far, or 0.0 before anything was added."""
        if self.count == 0:
            return 0.0
        return float(self.total) / self.count


class Logger:
    """Tee lines to stdout and to a UTF-8 log file (appended, flushed per line)."""

    def __init__(self, path=None, echo=True):
        self.echo = echo
        self.file = None
        self.path = path
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.file = open(path, "a", encoding="utf-8")

    def log(self, *lines):
        text = "\n".join(str(line) for line in lines)
        if self.echo:
            print(text, flush=True)
        if self.file is not None:
            try:
                self.file.write(text + "\n")
                self.file.flush()
            except OSError as err:
                raise atomic_io.blame_output(err, self.path)

    __call__ = log

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def format_metrics(metrics, digits=4):
    """`name=value` pairs on one line; floats with `digits` decimals, NaN as 'nan'."""
    parts = []
    for name, value in metrics.items():
        if torch.is_tensor(value) and value.numel() == 1:
            value = value.item()
        if isinstance(value, float):
            parts.append(f"{name}={value:.{digits}f}")
        else:
            parts.append(f"{name}={value}")
    return " ".join(parts)


def format_table(header, rows, align=None):
    """Rows of strings as aligned text under `header` and a rule; a None row is another rule.
    `align` holds '<' (left) or '>' (right) per column; default: the first left, the rest right."""
    align = align or "<" + ">" * (len(header) - 1)
    body = [row for row in rows if row is not None]
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]

    def line(row):
        cells = [cell.rjust(w) if a == ">" else cell.ljust(w) for cell, a, w in zip(row, align, widths)]
        return "  ".join(cells).rstrip()

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule] + [rule if row is None else line(row) for row in rows])


# ---------------------------------------------------------------------------------------------
# Devices, mixed precision, seeds and distributed runs
# ---------------------------------------------------------------------------------------------

def select_device(name="auto", local_rank=0):
    """torch.device for --device: auto (cuda:<local_rank> when CUDA is there, else cpu), cpu,
    cuda (cuda:<local_rank>) or cuda:N."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        index = local_rank if name == "cuda" else name[5:]
        if not str(index).isdigit():
            raise UserError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N")
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
        if int(index) >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s); "
                            f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
        return torch.device(f"cuda:{int(index)}")
    raise UserError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N")


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 (AVX-512 / AMX) and aarch64 names


def cpu_flags():
    """The CPU feature flags the kernel reports (Linux), or None where /proc/cpuinfo is missing."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


_READ_CPU_FLAGS = object()


def effective_amp(requested, device, flags=_READ_CPU_FLAGS):
    """Whether --amp really runs in mixed precision on `device`. On a CPU without native bf16
    instructions bf16 autocast is emulated: tools/benchmark.py measured 18 against 199 training
    images/s in fp32 on such a CPU (AMD EPYC, AVX2 only), so the run falls back to fp32 and says
    so once. CUDA, CPUs whose flags cannot be read, and runs with ROBUST_AL_CPU_AMP=1 in the
    environment (to measure or test the bf16 path anyway) keep what was asked."""
    if not requested or torch.device(device).type != "cpu" or os.environ.get("ROBUST_AL_CPU_AMP") == "1":
        return bool(requested)
    flags = cpu_flags() if flags is _READ_CPU_FLAGS else flags
    if flags is None or any(flag in flags for flag in BF16_CPU_FLAGS):
        return True
    if is_main_process():
        print("warning: --amp: this CPU has no native bf16 instructions (avx512_bf16, amx_bf16), where bf16 "
              "autocast is about 10x slower than fp32; running in fp32 (ROBUST_AL_CPU_AMP=1 keeps bf16)", file=sys.stderr)
    return False


def autocast_context(device, enabled):
    """Mixed precision for the forward pass: bf16 autocast on CPU, fp16 on CUDA; a no-op when off."""
    if not enabled:
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    dtype = torch.float16 if device_type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device_type, dtype=dtype)


# torch.manual_seed (and torch.Generator) accept these; NumPy gets the seed modulo 2**32 and
# Python's generator and the hash-based draws take any integer, so torch's range is the seed's range.
SEED_RANGE = (-2 ** 63, 2 ** 64 - 1)
SEED_RANGE_TEXT = "-2**63 .. 2**64-1"


def set_seed(seed):
    """Seed Python's, NumPy's and torch's (CPU and CUDA) generators; `seed` in SEED_RANGE."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def init_distributed():
    """Join the process group torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK (nccl on CUDA,
    else gloo). Returns `(rank, world_size, local_rank, distributed)`; (0, 1, 0, False) when the
    run is not launched with more than one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or "RANK" not in os.environ:
        return 0, 1, 0, False
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, init_method="env://")
    return rank, world_size, local_rank, True


def _distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process():
    return not _distributed() or dist.get_rank() == 0


def barrier():
    if _distributed():
        dist.barrier()


@contextlib.contextmanager
def distributed_session(completes=()):
    """init_distributed()'s `(rank, world_size, local_rank, distributed)` for the with-block, and the
    process group left on the way out: together (end_distributed) when the block finished or raised
    one of `completes` (an exit every rank takes after the same step), at once after anything else."""
    session = init_distributed()
    completed = False
    try:
        yield session
        completed = True
    except completes:
        completed = True
        raise
    finally:
        end_distributed(completed)


def end_distributed(completed=True):
    """Leave the process group, if one was joined. After a completed run every rank first waits
    for the others, so that none tears its connections down (or exits) while another still
    writes or talks to it; after a failure the group is destroyed at once, since the other
    ranks may never reach the barrier."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if completed and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


def all_gather_object(obj):
    """A list of `obj` from every process, in rank order (`[obj]` without a process group)."""
    if not _distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_flag(flag):
    """Rank 0's boolean, on every process (the flag itself without a process group)."""
    if not _distributed():
        return bool(flag)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())
