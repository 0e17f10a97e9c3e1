"""Label quality: how far a model believes the label a sample was given, and how well that finds
wrong labels.

The quality of a label is the model's probability of the given label relative to its own best
(greedy) reading of the image, in log space:

    log q = log P(label | image) - log P(reading | image)

Attn: log P(label) is the teacher-forced sum of log p(token | the label's prefix) over the label's
characters and the end token [s] (the decoder fed [GO] + label, `model(images, text[:, :-1],
is_train=True)`); log P(reading) is the sum of the greedy pass's per-step log max probabilities up
to and including its first [s] (all steps when none), the log of `utils.decode_predictions`'
word_conf. CTC: log P(text) = -CTC NLL of the text (summed over every alignment of it), for the
label and for the collapsed greedy path alike; an alignment the frames cannot hold (a label longer
than the frames allow) has P = 0, log q = -inf.

q = 1 when the label is the reading. q can exceed 1: greedy decoding does not always find the most
probable string (Attn: a locally best step may lead to a worse whole; CTC: the best path's text is
not always the most probable text), so a label that beats the reading scores above 1. Nothing is
clipped: ranking and the metrics use log q as it is.

Everything is computed in fp32 from the logits (the forward passes may run under autocast).

Detection metrics (`precision_at_k`, `recall_at_k`, `roc_auc`, `detection_metrics`) take scores where
a lower score is more suspicious (log q), and a boolean truth (the label is wrong); a NaN score
(broken logits) counts as -inf, the most suspicious."""
import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import utils
from measurement.evaluation import eval_loader, forward_logits, show_progress, teacher_forced_logits

COLUMNS_FLOAT = ("log_quality", "label_log_prob", "reading_log_prob")


# ---------------------------------------------------------------------------------------------
# log-probabilities of texts


def attn_label_log_prob(logits, targets, lengths):
    """(B,) sum over the first `lengths[i]` steps of log softmax(logits)[target]: the
    teacher-forced log-probability of a label. `logits` (B, T, C) from the decoder fed [GO] + label,
    `targets` (B, T) = the converter's `text[:, 1:]` (the characters, then [s]), `lengths` (B,) =
    characters + 1 (the converter's lengths)."""
    log_probs = logits.float().log_softmax(-1)
    steps = min(log_probs.size(1), targets.size(1))
    picked = log_probs[:, :steps].gather(2, targets[:, :steps].long().unsqueeze(2)).squeeze(2)
    counted = torch.arange(steps, device=picked.device).unsqueeze(0) < lengths.to(picked.device).view(-1, 1)
    return torch.where(counted, picked, torch.zeros_like(picked)).sum(1)


def attn_reading_log_prob(logits, converter):
    """(B,) log-probability of the greedy reading of Attn logits from a greedy pass: the sum of the
    per-step log max probabilities up to and including the first [s] (all steps when none)."""
    log_probs = logits.float().log_softmax(-1)
    mask = utils.token_mask(logits, converter).to(log_probs.device)
    best = log_probs.max(-1).values
    return torch.where(mask, best, torch.zeros_like(best)).sum(1)


def ctc_log_prob(logits, targets, target_lengths):
    """(B,) log P(text | x) under CTC logits (B, T, C), blank 0: minus the CTC loss of `targets`
    (B, S), summed over every alignment, not divided by the length. -inf where no alignment fits in
    the T frames (never zeroed, unlike `zero_infinity`)."""
    logits = logits.float()
    batch, steps = logits.shape[:2]
    if batch == 0:
        return torch.zeros(0, device=logits.device)
    log_probs = logits.log_softmax(-1).transpose(0, 1)
    input_lengths = torch.full((batch,), steps, dtype=torch.long, device=logits.device)
    targets = targets.to(logits.device).long()
    target_lengths = target_lengths.to(logits.device).long()
    if targets.size(1) == 0:  # every text empty: ctc_loss needs a column to index
        targets = torch.zeros(batch, 1, dtype=torch.long, device=logits.device)
    nll = F.ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=0, reduction="none",
                     zero_infinity=False)
    return torch.where(torch.isfinite(nll), -nll, torch.full_like(nll, -math.inf))


def ctc_path_targets(index):
    """The collapsed greedy paths of (B, T) argmax indices as CTC targets: `(targets (B, S) padded
    with 0, lengths (B,))`, S = the longest text (at least 1)."""
    keep = utils.ctc_keep_mask(index)
    lengths = keep.sum(1)
    width = max(int(lengths.max()) if lengths.numel() else 0, 1)
    position = torch.where(keep, keep.long().cumsum(1) - 1, torch.full_like(index, width))
    targets = torch.zeros(index.size(0), width + 1, dtype=torch.long, device=index.device)
    targets.scatter_(1, position, torch.where(keep, index, torch.zeros_like(index)))
    return targets[:, :width], lengths


def ctc_reading_log_prob(logits):
    """(B,) log P(greedy reading | x) for CTC logits: the collapsed argmax path's text, summed over
    its alignments (the log of `utils.decode_predictions`' CTC word_conf)."""
    targets, lengths = ctc_path_targets(logits.argmax(-1))
    return ctc_log_prob(logits, targets, lengths)


def log_quality(label_log_prob, reading_log_prob):
    """log q = log P(label) - log P(reading); -inf wherever the label is impossible."""
    label_log_prob, reading_log_prob = label_log_prob.double(), reading_log_prob.double()
    impossible = torch.isneginf(label_log_prob)
    return torch.where(impossible, torch.full_like(label_log_prob, -math.inf), label_log_prob - reading_log_prob)


# ---------------------------------------------------------------------------------------------
# scoring


def score_batch(model, images, labels, converter, opt, device):
    """Readings and label qualities of one batch: `(readings, {"log_quality", "label_log_prob",
    "reading_log_prob"} as float64 numpy arrays)`. The passes run under autocast with `opt.amp`;
    everything after the logits is fp32. Call under `torch.no_grad()`, the model in eval mode."""
    amp = bool(getattr(opt, "amp", False))
    with utils.autocast_context(device, amp):
        greedy = forward_logits(model, images, opt.batch_max_length, opt.Prediction)
    greedy = greedy.float()
    readings, _, _ = utils.decode_predictions(greedy, converter)
    text, lengths = converter.encode(labels, batch_max_length=opt.batch_max_length)
    text, lengths = text.to(greedy.device), lengths.to(greedy.device)
    if opt.Prediction == "CTC":
        label_lp = ctc_log_prob(greedy, text, lengths)
        reading_lp = ctc_reading_log_prob(greedy)
    else:
        with utils.autocast_context(device, amp):
            forced = teacher_forced_logits(model, images, text)
        label_lp = attn_label_log_prob(forced.float(), text[:, 1:], lengths)
        reading_lp = attn_reading_log_prob(greedy, converter)
    values = {"log_quality": log_quality(label_lp, reading_lp), "label_log_prob": label_lp.double(),
              "reading_log_prob": reading_lp.double()}
    return readings, {k: v.detach().cpu().numpy().astype(np.float64) for k, v in values.items()}


class QualityTable:
    """Per-sample records, column-wise: identity, given label, reading and the log-probabilities."""

    def __init__(self):
        self.relpaths, self.indices, self.labels, self.readings = [], [], [], []
        self.values = {name: [] for name in COLUMNS_FLOAT}

    def extend(self, identities, labels, readings, values):
        self.relpaths.extend(r for r, _ in identities)
        self.indices.extend(int(i) for _, i in identities)
        self.labels.extend(labels)
        self.readings.extend(readings)
        for name in COLUMNS_FLOAT:
            self.values[name].append(values[name])

    def columns(self):
        return {"relpath": self.relpaths, "index": np.asarray(self.indices, dtype=np.int64),
                "label": self.labels, "reading": self.readings,
                **{k: np.concatenate(v) if v else np.zeros(0) for k, v in self.values.items()}}


def score_batches(model, batches, converter, opt, device):
    """Score every `(images, labels, identities)` batch (empty ones skipped); returns the columns
    of a `QualityTable`."""
    table = QualityTable()
    with torch.no_grad():
        for images, labels, identities in batches:
            if not labels:
                continue
            readings, values = score_batch(model, images.to(device, non_blocking=True), list(labels), converter,
                                           opt, device)
            table.extend(identities, list(labels), readings, values)
    return table.columns()


def score_dataset(model, data, converter, opt, device, rank=0, desc="scoring labels"):
    """The `score_batches` columns of every `(image, label, identity)` item of `data`, read by
    evaluation.eval_loader, with a progress bar on rank 0 unless --no_progress."""
    loader = eval_loader(data, opt, device)
    bar = tqdm(loader, total=len(loader), desc=desc, unit="batch", disable=not show_progress(opt, rank),
               dynamic_ncols=True)
    try:
        return score_batches(model, bar, converter, opt, device)
    finally:
        bar.close()


def worst_first(columns):
    """Row order of the columns, lowest log quality first, ties by relpath then index (so the
    ranking depends neither on the scoring order nor on the number of processes). NaN (broken
    logits) sorts first: such a sample deserves a look."""
    scores = np.asarray(columns["log_quality"], dtype=np.float64)
    scores = np.where(np.isnan(scores), -np.inf, scores)
    _, relpath_rank = np.unique(np.asarray(columns["relpath"], dtype=object).astype(str), return_inverse=True)
    return np.lexsort((np.asarray(columns["index"]), relpath_rank.reshape(-1), scores))


def reorder(columns, order):
    return {k: v[order] if isinstance(v, np.ndarray) else [v[i] for i in order] for k, v in columns.items()}


def quality(log_q):
    """exp(log q) as float64 (0 for -inf; may exceed 1)."""
    with np.errstate(over="ignore"):
        return np.exp(np.asarray(log_q, dtype=np.float64))


# ---------------------------------------------------------------------------------------------
# detection metrics


def _inputs(scores, truth):
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    truth = np.asarray(truth, dtype=bool).reshape(-1)
    if scores.shape != truth.shape:
        raise ValueError(f"{scores.size} scores but {truth.size} truth values")
    return np.where(np.isnan(scores), -np.inf, scores), truth


def flagged(scores, k):
    """Positions of the k lowest scores; ties keep the input order (a stable sort), NaN lowest."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    scores = np.where(np.isnan(scores), -np.inf, scores)  # as worst_first: broken scores first
    return np.argsort(scores, kind="stable")[:max(int(k), 0)]


def precision_at_k(scores, truth, k):
    """Share of wrong labels among the k lowest scores (ties: input order); None for k = 0."""
    scores, truth = _inputs(scores, truth)
    k = min(int(k), scores.size)
    if k <= 0:
        return None
    return float(truth[flagged(scores, k)].sum() / k)


def recall_at_k(scores, truth, k):
    """Share of all wrong labels that are among the k lowest scores; None when none is wrong."""
    scores, truth = _inputs(scores, truth)
    positives = int(truth.sum())
    if positives == 0:
        return None
    return float(truth[flagged(scores, min(int(k), scores.size))].sum() / positives)


def average_ranks(values):
    """1-based ranks of `values` ascending, tied values sharing the mean of their ranks."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.arange(1, values.size + 1, dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def roc_auc(scores, truth):
    """Area under the ROC curve of flagging low scores as wrong labels: the probability that a
    wrong label scores lower than a right one, ties counted half (the Mann-Whitney U statistic over
    n_wrong x n_right). None when either class is empty."""
    scores, truth = _inputs(scores, truth)
    positives, negatives = int(truth.sum()), int((~truth).sum())
    if positives == 0 or negatives == 0:
        return None
    ranks = average_ranks(-scores)  # higher = more suspicious
    u = ranks[truth].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def detection_metrics(scores, truth):
    """{scored, corrupted, k, precision_at_k, recall_at_k, roc_auc} with k = the number of wrong
    labels (so precision and recall at k are equal; both are given)."""
    scores, truth = _inputs(scores, truth)
    k = int(truth.sum())
    return {"scored": int(scores.size), "corrupted": k, "k": k,
            "precision_at_k": precision_at_k(scores, truth, k), "recall_at_k": recall_at_k(scores, truth, k),
            "roc_auc": roc_auc(scores, truth)}


def threshold_metrics(scores, truth, log_threshold):
    """Flagging every score below `log_threshold`: {flagged, precision, recall} (None where the
    denominator is 0)."""
    scores, truth = _inputs(scores, truth)
    below = scores < log_threshold
    hits = int((below & truth).sum())
    return {"flagged": int(below.sum()),
            "precision": float(hits / below.sum()) if below.any() else None,
            "recall": float(hits / truth.sum()) if truth.any() else None}
