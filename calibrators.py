"""Training losses ("calibrators"): a registry from name to loss class, one calling convention.

`get_calibrator(name, opt)(logits, targets, target_lengths, progress)` -> scalar loss, where
`progress = (iteration, total_iterations)` and `opt.Prediction` picks the form:
  Attn: logits (B, T, C), targets (B, T) = text[:, 1:], 0 = ignored ([GO] / padding); every Attn
        loss is a mean over the counted (non-ignored) tokens.
  CTC:  raw logits (B, T, C), targets (B, S) padded, target_lengths (B,); CTC terms use blank 0,
        zero_infinity and the 'mean' reduction of `F.ctc_loss` (each sample's loss divided by its
        target length, then averaged over the batch).
Logits are cast to fp32 first, so calling a loss on bf16/fp16 autocast outputs is safe.

Losses that mix a fixed target distribution into the label (LS, robust) return KL(target || model),
which is the cross-entropy to the target minus the target's entropy (0 for a one-hot target), as
the original did through `nn.KLDivLoss`. The bootstrapping losses return the cross-entropy to their
target, as Reed et al. define them (SoftBootstrap says why the KL form is not the same there). The label-smoothed target of a label y is
q = (1 - alpha) one-hot(y) + alpha / (C - 1) on every other class.

`--smooth_tail` is accepted by every calibrator and used by none: in the original it only floored
the per-word weight of its SequenceSmoothLoss variants, which need confusion dictionaries that are
not part of this project."""
import math

import torch
import torch.nn.functional as F

from utils import UserError, ctc_keep_mask

HEADS = ("Attn", "CTC")


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------

def _option(opt, name, default, check, requirement):
    value = float(getattr(opt, name, default))
    if not check(value):
        raise UserError(f"--{name} {value:g}: {requirement}")
    return value


def _smoothing(opt):
    return _option(opt, "alpha", 0.0, lambda a: 0.0 <= a < 1.0, "the smoothing mass must lie in [0, 1)")


def progress_ratio(progress):
    """Fraction of training done, in [0, 1], from `(iteration, total_iterations)`."""
    if progress is None:
        raise ValueError("this calibrator needs progress=(iteration, total_iterations)")
    iteration, total = progress
    if total <= 0:
        return 1.0
    return min(max(float(iteration) / float(total), 0.0), 1.0)


def _token_mean(values, targets):
    """Mean of per-token values over the counted tokens (targets != 0); 0 when none counts."""
    mask = targets != 0
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp(min=1)


def _label_log_prob(log_probs, targets):
    """log p of each token's label, (B, T), from log-probabilities (B, T, C)."""
    return log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _one_hot_smoothed(index, num_class, alpha, dtype):
    target = torch.full((*index.shape, num_class), alpha / (num_class - 1), dtype=dtype, device=index.device)
    return target.scatter_(-1, index.unsqueeze(-1), 1.0 - alpha)


def _kl_to_target(target, log_probs):
    """KL(target || p) per token, summed over classes. t log t is taken as 0 where t = 0, with a
    finite gradient there too (the target may carry a gradient, as in boost_soft)."""
    positive = target > 0
    t_log_t = torch.where(positive, target * target.clamp_min(1e-30).log(), torch.zeros_like(target))
    return (t_log_t - target * log_probs).sum(-1)


def _entropy(log_probs):
    return -(log_probs.exp() * log_probs).sum(-1)


def _ctc_nll(logits, targets, target_lengths):
    """Per-sample CTC negative log-likelihood (B,), fp32, blank 0, zero_infinity."""
    if target_lengths is None:
        raise ValueError("CTC calibrators need target_lengths")
    log_probs = logits.log_softmax(-1).transpose(0, 1)
    input_lengths = torch.full((logits.size(0),), logits.size(1), dtype=torch.long, device=logits.device)
    return F.ctc_loss(log_probs, targets, input_lengths, target_lengths.to(logits.device), blank=0,
                      reduction="none", zero_infinity=True)


def _per_length(nll, target_lengths):
    """F.ctc_loss's 'mean' normalisation: each sample's NLL over its target length (at least 1)."""
    return nll / target_lengths.to(nll.device).clamp(min=1).to(nll.dtype)


def _ctc_mean(logits, targets, target_lengths):
    return _per_length(_ctc_nll(logits, targets, target_lengths), target_lengths).mean()


def _uniform_kl_per_element(log_probs):
    """Mean over frames and classes of u (log u - log p), u = 1/C: the original's `nn.KLDivLoss()`
    against the uniform distribution (KL(u || p) per frame divided by C)."""
    num_class = log_probs.size(-1)
    return ((-math.log(num_class) - log_probs) / num_class).mean(-1)


class Calibrator:
    """Base: casts logits to fp32 and dispatches to the form of the prediction head."""

    heads = HEADS
    options = ()
    help = ""

    def __init__(self, opt):
        self.prediction = opt.Prediction

    def __call__(self, logits, targets, target_lengths=None, progress=None):
        logits = logits.float()
        if self.prediction == "CTC":
            return self.ctc(logits, targets, target_lengths, progress)
        return self.attn(logits, targets, progress)

    def attn(self, logits, targets, progress):
        raise NotImplementedError

    def ctc(self, logits, targets, target_lengths, progress):
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# The calibrators
# ---------------------------------------------------------------------------------------------

class CrossEntropy(Calibrator):
    help = "cross-entropy over the label tokens (CTC: the CTC loss)"

    def attn(self, logits, targets, progress):
        nll = -_label_log_prob(logits.log_softmax(-1), targets)
        return _token_mean(nll, targets)

    def ctc(self, logits, targets, target_lengths, progress):
        return _ctc_mean(logits, targets, target_lengths)


class LabelSmoothing(Calibrator):
    options = ("alpha",)
    help = ("label smoothing: KL to the label with --alpha spread over the other classes "
            "(CTC: (1 - alpha) CTC + alpha KL(uniform || p) per frame / C, as the original)")

    def __init__(self, opt):
        super().__init__(opt)
        self.alpha = _smoothing(opt)

    def attn(self, logits, targets, progress):
        log_probs = logits.log_softmax(-1)
        target = _one_hot_smoothed(targets, logits.size(-1), self.alpha, log_probs.dtype)
        return _token_mean(_kl_to_target(target, log_probs), targets)

    def ctc(self, logits, targets, target_lengths, progress):
        ctc = _ctc_mean(logits, targets, target_lengths)
        return (1.0 - self.alpha) * ctc + self.alpha * _uniform_kl_per_element(logits.log_softmax(-1)).mean()


class Focal(Calibrator):
    options = ("alpha",)
    help = ("focal loss -(1 - p_y)^gamma log p_y with gamma = --alpha (CTC: focal CTC, Feng et al. "
            "2019: each sample's CTC NLL L weighted by (1 - exp(-L))^gamma)")

    def __init__(self, opt):
        super().__init__(opt)
        self.gamma = _option(opt, "alpha", 0.0, lambda g: g >= 0.0, "the focal gamma must be at least 0")

    def attn(self, logits, targets, progress):
        log_pt = _label_log_prob(logits.log_softmax(-1), targets)
        # 1 - p computed as -expm1(log p) keeps precision near p = 1; the floor keeps the gradient
        # of x^gamma finite at x = 0 for gamma < 1.
        weight = (-torch.expm1(log_pt)).clamp_min(1e-12) ** self.gamma
        return _token_mean(-weight * log_pt, targets)

    def ctc(self, logits, targets, target_lengths, progress):
        nll = _ctc_nll(logits, targets, target_lengths)
        weight = (-torch.expm1(-nll)).clamp_min(1e-12) ** self.gamma
        return _per_length(weight * nll, target_lengths).mean()


class MarginLabelSmoothing(Calibrator):
    options = ("alpha",)
    help = ("margin-based label smoothing (Liu et al. CVPR 2022): CE + --alpha x mean over tokens and "
            "classes of relu(max logit - logit - 10), the authors' averaging (CTC: over all frames)")
    margin = 10.0

    def __init__(self, opt):
        super().__init__(opt)
        # The original passed --alpha as the penalty weight (lambda) and kept the margin at 10.
        self.weight = _option(opt, "alpha", 0.0, lambda w: w >= 0.0, "the margin penalty weight must be at least 0")

    def _penalty(self, logits):
        gaps = logits.max(-1, keepdim=True).values - logits
        return F.relu(gaps - self.margin).mean(-1)

    def attn(self, logits, targets, progress):
        nll = -_label_log_prob(logits.log_softmax(-1), targets)
        return _token_mean(nll + self.weight * self._penalty(logits), targets)

    def ctc(self, logits, targets, target_lengths, progress):
        return _ctc_mean(logits, targets, target_lengths) + self.weight * self._penalty(logits).mean()


class EntropyRegularised(Calibrator):
    options = ("alpha",)
    help = ("confidence penalty: CE - --alpha x mean token entropy (CTC: CTC - alpha x mean frame "
            "entropy over all frames)")

    def __init__(self, opt):
        super().__init__(opt)
        self.weight = _option(opt, "alpha", 0.0, lambda w: w >= 0.0, "the entropy weight must be at least 0")

    def attn(self, logits, targets, progress):
        log_probs = logits.log_softmax(-1)
        nll = -_label_log_prob(log_probs, targets)
        return _token_mean(nll - self.weight * _entropy(log_probs), targets)

    def ctc(self, logits, targets, target_lengths, progress):
        entropy = _entropy(logits.log_softmax(-1)).mean()
        return _ctc_mean(logits, targets, target_lengths) - self.weight * entropy


class SoftBootstrap(Calibrator):
    """Reed et al. 2014, soft bootstrapping: the cross-entropy to the target m = beta q + (1 - beta) p,
    -sum m log p, with p the model's own softmax, not detached: beta CE(q) + (1 - beta) H(p). The
    entropy term pulls each token towards the model's own reading, which is what lets a confident
    model overrule a wrong label.

    The original code took KL(m || p) through `nn.KLDivLoss` instead. That is CE(m) - H(m), and with
    p live inside m the gradient of -H(m) cancels the bootstrap term: for a one-hot label y
    (alpha = 0) the logit gradient is c (p - y), with
        c = beta - (1 - beta) p_y log(1 + beta / ((1 - beta) p_y)),
    which lies in (0, beta]: beta as p_y -> 0, down to beta + (1 - beta) log(1 - beta) at p_y = 1
    (0.48 at beta = 0.8, 0.15 at beta = 0.5). So it is a cross-entropy down-weighted where the model
    already agrees with the label, and the model's prediction never pulls the target. The two
    agree only at beta = 1 (up to the constant H(q)).

    CTC has no per-frame label, so the CTC form is Reed's loss written for sequences: beta x the
    CTC loss of the label + (1 - beta) x the cross-entropy of every frame against the model's own
    posterior, H(p_t), averaged over frames (the label term keeps CTC's alignment freedom)."""

    options = ("alpha", "beta")
    help = ("soft bootstrapping (Reed et al. 2014): cross-entropy to --beta x label smoothed by --alpha + "
            "(1 - beta) x the model's softmax, i.e. beta CE + (1 - beta) token entropy (CTC: beta CTC + "
            "(1 - beta) mean frame entropy)")

    def __init__(self, opt):
        super().__init__(opt)
        self.alpha = _smoothing(opt)
        self.beta = _option(opt, "beta", 0.95, lambda b: 0.0 <= b <= 1.0, "the label weight must lie in [0, 1]")

    def model_target(self, log_probs):
        return log_probs.exp()

    def attn(self, logits, targets, progress):
        log_probs = logits.log_softmax(-1)
        label = _one_hot_smoothed(targets, logits.size(-1), self.alpha, log_probs.dtype)
        target = self.beta * label + (1.0 - self.beta) * self.model_target(log_probs)
        return _token_mean(-(target * log_probs).sum(-1), targets)

    def ctc(self, logits, targets, target_lengths, progress):
        label_term = _ctc_mean(logits, targets, target_lengths)
        return self.beta * label_term + (1.0 - self.beta) * self.ctc_model_term(logits)

    def ctc_model_term(self, logits):
        return _entropy(logits.log_softmax(-1)).mean()


def greedy_ctc_targets(logits):
    """The model's own greedy reading as CTC targets: `(targets (B, T), lengths (B,))`, the argmax
    path with repeats and blanks collapsed, left-aligned and padded with 0."""
    index = logits.argmax(-1)
    keep = ctc_keep_mask(index)
    lengths = keep.sum(1)
    # a stable sort on "not kept" moves the kept symbols to the front in their order
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
    packed = index.gather(1, order)
    positions = torch.arange(index.size(1), device=index.device).unsqueeze(0)
    return torch.where(positions < lengths.unsqueeze(1), packed, torch.zeros_like(packed)), lengths


class HardBootstrap(SoftBootstrap):
    help = ("hard bootstrapping (Reed et al. 2014): as boost_soft with the model's argmax, smoothed by "
            "--alpha, in place of its softmax, so the target carries no gradient (CTC: beta CTC(label) + (1 - beta) CTC(greedy reading))")

    def model_target(self, log_probs):
        return _one_hot_smoothed(log_probs.argmax(-1), log_probs.size(-1), self.alpha, log_probs.dtype)

    def ctc_model_term(self, logits):
        targets, lengths = greedy_ctc_targets(logits.detach())
        return _ctc_mean(logits, targets, lengths)


class ProgressiveSelfCorrection(Calibrator):
    """ProSelfLC (Wang et al., CVPR 2021): target = (1 - eps) q + eps p, p the detached softmax,
    eps = g(progress) l(p). Global trust g = 1 / (1 + exp(-B (progress - t))) is the paper's
    h(t/Gamma - b, B) = 1 / (1 + exp(-(t/Gamma - b) B)) with the transition point b = --t; local
    trust l(p) = 1 - H(p) / H(uniform) = 1 - H(p) / log C. Since eps and p carry no gradient, the
    logit gradient is (1 - eps)(p - q): confident tokens late in training lean on the model.

    CTC has no per-frame label to correct, so the CTC form is the original's: CTC + mean over
    samples of eps_b x KL(uniform || p) per frame / C, with eps_b = g x mean over frames of l(p)."""

    options = ("alpha", "B", "t")
    help = ("progressive self label correction (ProSelfLC, Wang et al. CVPR 2021): target (1 - eps) x "
            "label smoothed by --alpha + eps x detached softmax, eps = sigmoid(--B x (progress - --t)) x "
            "(1 - H(p)/log C) (CTC: CTC + eps-weighted KL to uniform, as the original)")

    def __init__(self, opt):
        super().__init__(opt)
        self.alpha = _smoothing(opt)
        self.base = _option(opt, "B", 16.0, lambda b: b > 0.0, "the exponent base must be positive")
        self.transition = _option(opt, "t", 0.5, lambda t: 0.0 <= t <= 1.0,
                                  "the transition point is a fraction of training in [0, 1]")

    def global_trust(self, progress):
        return 1.0 / (1.0 + math.exp(-self.base * (progress_ratio(progress) - self.transition)))

    @staticmethod
    def local_trust(log_probs):
        return 1.0 - _entropy(log_probs) / math.log(log_probs.size(-1))

    def attn(self, logits, targets, progress):
        log_probs = logits.log_softmax(-1)
        probs = log_probs.detach().exp()
        epsilon = (self.global_trust(progress) * self.local_trust(log_probs.detach())).unsqueeze(-1)
        label = _one_hot_smoothed(targets, logits.size(-1), self.alpha, log_probs.dtype)
        target = (1.0 - epsilon) * label + epsilon * probs
        return _token_mean(_kl_to_target(target, log_probs), targets)

    def ctc(self, logits, targets, target_lengths, progress):
        log_probs = logits.log_softmax(-1)
        epsilon = self.global_trust(progress) * self.local_trust(log_probs.detach()).mean(-1)
        regulariser = (epsilon * _uniform_kl_per_element(log_probs).mean(-1)).mean()
        return _ctc_mean(logits, targets, target_lengths) + regulariser


class CTCOnlyCrossEntropy(CrossEntropy):
    heads = ("CTC",)
    help = "the original's name for CE with the CTC head"


class CTCOnlyLabelSmoothing(LabelSmoothing):
    heads = ("CTC",)
    help = "the original's name for LS with the CTC head"


CALIBRATORS = {
    "CE": CrossEntropy,
    "LS": LabelSmoothing,
    "FL": Focal,
    "MBLS": MarginLabelSmoothing,
    "ER": EntropyRegularised,
    "boost_soft": SoftBootstrap,
    "boost_hard": HardBootstrap,
    "robust": ProgressiveSelfCorrection,
    "CTC": CTCOnlyCrossEntropy,
    "CTCLS": CTCOnlyLabelSmoothing,
}



def _help_line(cls):
    used = ", ".join(f"--{name}" for name in cls.options) or "no option"
    return f"{cls.help}; uses {used} (--smooth_tail accepted, unused); heads: {'/'.join(cls.heads)}"


CALIBRATOR_HELP = {name: _help_line(cls) for name, cls in CALIBRATORS.items()}


def names_for(prediction):
    """The calibrator names that have a form for this prediction head."""
    return [name for name, cls in CALIBRATORS.items() if prediction in cls.heads]


def get_calibrator(name, opt):
    """The loss callable `loss(logits, targets, target_lengths, progress)` for --calibrator `name`."""
    prediction = getattr(opt, "Prediction", None)
    if prediction not in HEADS:
        raise UserError(f"--Prediction {prediction}: unknown; choose one of {', '.join(HEADS)}")
    cls = CALIBRATORS.get(name)
    if cls is None or prediction not in cls.heads:
        known = "unknown" if cls is None else f"has no form for --Prediction {prediction}"
        raise UserError(f"--calibrator {name}: {known}; choose one of {', '.join(names_for(prediction))}")
    return cls(opt)
