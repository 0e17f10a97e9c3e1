"""Calibration of the word confidence: temperature scaling at the token or the word level, and the
calibration metrics (ECE, ACE, MCE, Brier) with reliability diagrams.

One temperature T > 0, fitted (`--temperature auto`) or given, applied at one of two levels
(`Scaling`):

- token (`fit_temperature`, `apply_temperature`): the logits are divided by T, and every
  probability (the word confidence, margin, entropy) is recomputed from them. T minimises the
  negative log-likelihood of the label tokens (Attn: `text[:, 1:]`, [s] included, under the
  teacher-forced logits, each token given the label's prefix; CTC: the CTC NLL of the label): it is
  fitted on characters. A number given to --temperature is such a T.
- word (`fit_word_temperature`, `apply_word_temperature`): the word confidence c itself becomes
  c ** (1 / T), i.e. its log is divided by T; logits and token probabilities are left alone. T
  minimises the binary negative log-likelihood of each greedy reading being right under c ** (1 / T).
  Scoring characters well does not make their product a good word probability, since the errors
  of one word's characters are not independent; for attention recognizers Slossberg et al. ("On
  calibration of scene-text recognition models", 2020) report that character-level scaling can
  make word-level ECE worse while a sequence-level temperature lowers it several-fold.

Direction: at the token level T > 1 flattens every step, so the confidence falls; at the word level
the log confidence is divided with no renormalisation over other readings, so T < 1 lowers the
confidence (an overconfident model gets T < 1) and T > 1 raises it.

Order: the word-level map is increasing in c for every T > 0, so it keeps the words' order by
confidence (whatever their lengths). The token-level one does not, not even for a fixed length:
the scaled confidence depends on the whole distribution of every step, not only on the winners'
probabilities. One step over three classes with probabilities (0.6, 0.4, 0) and another with
(0.6, 0.2, 0.2) share the raw confidence 0.6 but at T = 2 become 0.55 and 0.46; two-step words with
winners (0.9, 0.5) and (0.67, 0.67) over two classes (raw 0.450 > 0.449) swap order at T = 0.5
(0.49 < 0.65). Either way the greedy reading, hence whether it is right, is the unscaled one (the
argmax of z / T is the argmax of z)."""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from safe_files import atomic_io
import utils

# How `--temperature auto` is fitted; test.py also accepts "both" (token and word, compared).
METHODS = ("token", "word")
# The range of the word-level temperature (an exponent 1 / T from 0.001 to 1000: turning a word
# confidence of 0.99 into 0.5 already takes 1 / T = 69), and the clamp of the confidence in its
# objective.
WORD_TEMPERATURE_BOUNDS = (1e-3, 1e3)
CONFIDENCE_CLAMP = 1e-7


# ---------------------------------------------------------------------------------------------
# Temperature scaling
# ---------------------------------------------------------------------------------------------

def apply_temperature(logits, temperature):
    """Logits divided by a positive temperature."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return logits / temperature


def apply_word_temperature(confidence, temperature):
    """Word confidences (a tensor or an array in [0, 1]) raised to 1 / T: increasing in the
    confidence for every T > 0; 0 and 1 stay put."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return confidence ** (1.0 / temperature)


@dataclass(frozen=True)
class Scaling:
    """A temperature and the level it applies at: `logits` scales what every probability is
    computed from (token level), `confidence` scales the word confidence (word level)."""
    temperature: float
    level: str = "token"

    def __post_init__(self):
        if self.level not in METHODS:
            raise ValueError(f"unknown calibration level {self.level!r}; one of {', '.join(METHODS)}")

    def logits(self, logits):
        return apply_temperature(logits, self.temperature) if self.level == "token" else logits

    def confidence(self, confidence):
        return apply_word_temperature(confidence, self.temperature) if self.level == "word" else confidence


def as_scaling(temperature, level=None):
    """None for no temperature; a Scaling as it is; a number as a Scaling at `level` (token when
    None)."""
    if temperature is None or isinstance(temperature, Scaling):
        return temperature
    return Scaling(float(temperature), level or "token")


def decode_calibrated(logits, converter, scaling):
    """`utils.decode_predictions` of (B, T, C) `logits` under `scaling` (a Scaling, a number: token
    level, or None): (texts, calibrated word confidence, per-step confidences of the scaled logits)."""
    scaling = as_scaling(scaling)
    if scaling is None:
        return utils.decode_predictions(logits, converter)
    texts, confidence, steps = utils.decode_predictions(scaling.logits(logits), converter)
    return texts, scaling.confidence(confidence), steps


def fit_temperature(logits, targets, mask=None, target_lengths=None, max_iter=100):
    """Token level: the temperature T > 0 minimising the NLL of the labels under softmax(logits / T).

    Token form (Attn; `target_lengths` None): `logits` (..., C), `targets` (...) class indices,
    `mask` the counted tokens (default `targets != 0`: the labels incl. `[s]`, no padding).
    CTC form (`target_lengths` given): the CTC negative log-likelihood (blank 0) of `targets`
    (B, S) under (B, T, C) logits, summed over samples (not divided by target length, which would
    weight the likelihood by the data and bias T); `mask` (B,) picks samples.
    LBFGS on log T in fp32; returns 1.0 when nothing is counted."""
    logits = logits.detach().float()
    targets = targets.detach().to(logits.device).long()
    if target_lengths is None:
        mask = (targets != 0) if mask is None else mask.to(logits.device).bool()
        logits, targets = logits[mask], targets[mask]
        if targets.numel() == 0:
            return 1.0

        def nll(temperature):
            return F.cross_entropy(logits / temperature, targets)
    else:
        target_lengths = target_lengths.detach().to(logits.device).long()
        if mask is not None:
            mask = mask.to(logits.device).bool()
            logits, targets, target_lengths = logits[mask], targets[mask], target_lengths[mask]
        if logits.size(0) == 0:
            return 1.0
        input_lengths = torch.full((logits.size(0),), logits.size(1), dtype=torch.long, device=logits.device)

        def nll(temperature):
            log_probs = (logits / temperature).log_softmax(-1).transpose(0, 1)
            return F.ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=0,
                              reduction="sum", zero_infinity=True) / targets.size(0)

    log_t = torch.zeros((), device=logits.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = nll(log_t.clamp(-6.0, 6.0).exp())
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().clamp(-6.0, 6.0).exp())
    return temperature if math.isfinite(temperature) else 1.0


class WordConfidence:
    """The log word confidence of the greedy readings of (B, T, C) `logits` as a function of a
    token-level temperature, in float64 on the CPU: `log_confidence(T)` is the log of
    `utils.decode_predictions(logits / T, converter)[1]`. The reading is taken once, from the
    unscaled logits (a temperature does not change it); only the probabilities are recomputed."""

    def __init__(self, logits, converter):
        logits = logits.detach().cpu().double()
        index = logits.argmax(-1)
        self.batch = logits.size(0)
        self.ctc = getattr(converter, "prediction", None) == "CTC"
        if self.ctc:
            keep = utils.ctc_keep_mask(index)
            steps = index.size(1)
            # the kept symbols packed to the left of each row (the rest scatter into a spare column)
            position = torch.where(keep, keep.long().cumsum(1) - 1, torch.full_like(index, steps))
            targets = torch.zeros(self.batch, steps + 1, dtype=torch.long)
            targets.scatter_(1, position, torch.where(keep, index, torch.zeros_like(index)))
            self.logits, self.targets = logits, targets[:, :steps]
            self.target_lengths = keep.sum(1)
            self.input_lengths = torch.full((self.batch,), steps, dtype=torch.long)
        else:
            counted = utils.token_mask(logits, converter)
            self.steps = logits[counted]                      # (K, C): the counted steps only
            self.winner = index[counted].unsqueeze(1)
            self.row = torch.arange(self.batch).unsqueeze(1).expand_as(counted)[counted]

    def log_confidence(self, temperature):
        """(B,) float64: log word confidence under logits / `temperature`."""
        if self.batch == 0:
            return torch.zeros(0, dtype=torch.float64)
        if self.ctc:
            if self.logits.size(1) == 0:
                return torch.zeros(self.batch, dtype=torch.float64)
            log_probs = (self.logits / temperature).log_softmax(-1).transpose(0, 1)
            return -F.ctc_loss(log_probs, self.targets, self.input_lengths, self.target_lengths, blank=0,
                               reduction="none")
        step_log_prob = (self.steps / temperature).log_softmax(-1).gather(1, self.winner).squeeze(1)
        return torch.zeros(self.batch, dtype=torch.float64).index_add_(0, self.row, step_log_prob)


def word_confidence(logits, converter, temperature=1.0):
    """(B,) float64 word confidence of the greedy readings under logits / `temperature` (that of
    `utils.decode_predictions`, computed in float64; the raw one at the default T = 1)."""
    return WordConfidence(logits, converter).log_confidence(temperature).exp()


def _binary_nll(log_confidence, correct):
    """Mean -[c log p + (1 - c) log(1 - p)] with p = exp(log_confidence) clamped to
    [CONFIDENCE_CLAMP, 1 - CONFIDENCE_CLAMP]."""
    log_p = log_confidence.clamp(math.log(CONFIDENCE_CLAMP), math.log1p(-CONFIDENCE_CLAMP))
    log_not_p = torch.log(-torch.expm1(log_p))
    return -(correct * log_p + (1.0 - correct) * log_not_p).mean().item()


def fit_word_temperature(confidence, correct, bounds=WORD_TEMPERATURE_BOUNDS, grid=41, tolerance=1e-5):
    """Word level: the temperature T in `bounds` minimising the binary negative log-likelihood of
    `correct` (whether each reading is right) under its raw word `confidence` ** (1 / T), clamped
    to [1e-7, 1 - 1e-7].

    The loss is convex in 1 / T (linear in it where a word is right, -log(1 - c ** (1 / T)) where it
    is wrong), so it has one minimum. A one-dimensional search on log T, deterministic: `grid`
    evenly spaced points over the bounds, then golden-section search between the neighbours of the
    best (among equally good points the one nearest T = 1, so a loss that stops changing, as when
    every confidence has reached the clamp, stops the temperature where it stops mattering).
    Returns 1.0 for no words."""
    confidence, correct = _pairs(confidence, correct)
    if correct.numel() == 0:
        return 1.0
    log_confidence = confidence.log()  # -inf for a confidence of 0: at the clamp for every T

    def loss(log_t):
        return _binary_nll(log_confidence / math.exp(log_t), correct)

    low, high = math.log(bounds[0]), math.log(bounds[1])
    points = np.linspace(low, high, grid)
    values = np.array([loss(x) for x in points])
    best = np.flatnonzero(values == values.min())
    k = int(best[np.argmin(np.abs(points[best]))])
    a, b = points[max(k - 1, 0)], points[min(k + 1, grid - 1)]
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = loss(c), loss(d)
    while b - a > tolerance:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = loss(d)
    x, fx = (c, fc) if fc <= fd else (d, fd)
    if values[k] < fx:  # the grid point itself (an edge of the bounds, or a plateau)
        x = points[k]
    return float(math.exp(x))


def check_level(level, needs):
    """--calibration word scales only the word confidence: a query strategy that ranks token
    quantities would be ranked unscaled."""
    token_only = [name for name in needs if name in ("margin", "entropy", "mc")]
    if level == "word" and token_only:
        raise utils.UserError(f"--calibration word scales the word confidence only, and this strategy ranks "
                              f"{token_only[0]} (token probabilities); give --calibration token")


# ---------------------------------------------------------------------------------------------
# Calibration metrics
# ---------------------------------------------------------------------------------------------

def _as_float64(values):
    """A flat float64 CPU tensor of a tensor, an array or a list."""
    if torch.is_tensor(values):
        return values.detach().cpu().double().reshape(-1)
    return torch.from_numpy(np.asarray(values, dtype=np.float64).reshape(-1))


def _pairs(confidence, correct):
    confidence, correct = _as_float64(confidence), _as_float64(correct)
    if confidence.numel() != correct.numel():
        raise ValueError(f"{confidence.numel()} confidences but {correct.numel()} correctness values")
    return confidence, correct


def equal_width_bins(confidence, bins=15):
    """Bin index of each confidence in `bins` equal-width bins over [0, 1]. Bins are closed on the
    right, (lo, hi], except the first, which also holds 0 ([0, hi]); values outside [0, 1] go to the
    nearest end bin. So 1.0 falls in the last bin and an edge value in the bin below it (as the
    original's `conf > lo and conf <= hi`, which however dropped conf = 0)."""
    confidence = torch.as_tensor(confidence).double()
    inner_edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)[1:-1]
    return torch.bucketize(confidence, inner_edges, right=False)


def _bin_stats(bin_index, confidence, correct, bins):
    count = torch.zeros(bins, dtype=torch.float64).index_add_(0, bin_index, torch.ones_like(confidence))
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, bin_index, confidence)
    acc_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, bin_index, correct)
    filled = count > 0
    safe = count.clamp(min=1)
    return count, conf_sum / safe, acc_sum / safe, filled


def reliability_bins(confidence, correct, bins=15):
    """Per equal-width bin: `count`, mean `confidence`, `accuracy` (NaN for empty bins), `edges`."""
    confidence, correct = _pairs(confidence, correct)
    count, conf, acc, filled = _bin_stats(equal_width_bins(confidence, bins), confidence, correct, bins)
    nan = torch.full_like(conf, float("nan"))
    return {"count": count, "confidence": torch.where(filled, conf, nan),
            "accuracy": torch.where(filled, acc, nan),
            "edges": torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)}


def calibration_metrics(confidence, correct, bins=15):
    """ECE, ACE, MCE, Brier score, accuracy and mean confidence of (confidence, correct) pairs.

    ece: equal-width bins (see `equal_width_bins`), sum over bins of n_b / N * |acc_b - conf_b|.
    ace: the same sum over `bins` equal-count bins of the samples sorted by confidence (sizes
         differ by at most one; the original reported this one as its "ECE" and put the remainder
         in its last bin).
    mce: the largest |acc_b - conf_b| over non-empty equal-width bins.
    brier: mean (conf - correct)^2.
    Empty input: every metric NaN and n = 0."""
    confidence, correct = _pairs(confidence, correct)
    n = confidence.numel()
    if n == 0:
        nan = float("nan")
        return {"ece": nan, "ace": nan, "mce": nan, "brier": nan, "accuracy": nan, "confidence": nan, "n": 0}
    count, conf, acc, filled = _bin_stats(equal_width_bins(confidence, bins), confidence, correct, bins)
    gap = (acc - conf).abs()
    ece = (gap * count).sum() / n
    mce = gap[filled].max()

    order = torch.sort(confidence, stable=True).indices
    adaptive_index = torch.div(torch.arange(n, dtype=torch.long) * bins, n, rounding_mode="floor")
    a_count, a_conf, a_acc, _ = _bin_stats(adaptive_index, confidence[order], correct[order], bins)
    ace = ((a_acc - a_conf).abs() * a_count).sum() / n

    return {"ece": ece.item(), "ace": ace.item(), "mce": mce.item(),
            "brier": ((confidence - correct) ** 2).mean().item(),
            "accuracy": correct.mean().item(), "confidence": confidence.mean().item(), "n": n}


def reliability_diagram(confidence, correct, path, bins=15, title=""):
    """Write a reliability diagram (PNG) to `path` atomically: accuracy per equal-width confidence
    bin, the gap to the bin's mean confidence, the diagonal, and the metrics in the title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stats = reliability_bins(confidence, correct, bins)
    metrics = calibration_metrics(confidence, correct, bins)
    edges = stats["edges"].numpy()
    centres, width = (edges[:-1] + edges[1:]) / 2, 1.0 / bins
    filled = (stats["count"] > 0).numpy()
    acc, conf = stats["accuracy"].numpy()[filled], stats["confidence"].numpy()[filled]

    figure = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    axes.bar(centres[filled], acc, width=width, edgecolor="black", color="tab:blue", label="accuracy")
    axes.bar(centres[filled], conf - acc, bottom=acc, width=width, edgecolor="tab:red", color="tab:red",
             alpha=0.3, hatch="//", label="gap to confidence")
    axes.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("confidence")
    axes.set_ylabel("accuracy")
    axes.legend(loc="upper left", fontsize=8)
    summary = (f"ECE {metrics['ece']:.4f}  ACE {metrics['ace']:.4f}  MCE {metrics['mce']:.4f}  "
               f"Brier {metrics['brier']:.4f}  n={metrics['n']}")
    axes.set_title(f"{title}\n{summary}" if title else summary, fontsize=9)
    figure.tight_layout()
    with atomic_io.atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
