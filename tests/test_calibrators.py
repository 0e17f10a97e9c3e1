"""Calibrators on tiny tensors, against values computed by hand or from each loss's formula."""
import math
from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F

import calibrators
from utils import UserError

torch.set_num_threads(1)

ATTN_NAMES = calibrators.names_for("Attn")
CTC_NAMES = calibrators.names_for("CTC")


def opt(prediction="Attn", **fields):
    return Namespace(Prediction=prediction, **fields)


def loss_of(name, logits, targets, lengths=None, progress=(0, 100), prediction="Attn", **fields):
    return calibrators.get_calibrator(name, opt(prediction, **fields))(logits, targets, lengths, progress)


def attn_batch(seed=0, batch=3, steps=5, num_class=6):
    generator = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(batch, steps, num_class, generator=generator)
    targets = torch.randint(1, num_class, (batch, steps), generator=generator)
    targets[0, 3:] = 0  # padding after a short label
    targets[2, 1:] = 0
    return logits, targets


def ctc_batch(seed=0, batch=3, steps=8, num_class=5, max_len=3):
    generator = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(batch, steps, num_class, generator=generator)
    targets = torch.randint(1, num_class, (batch, max_len), generator=generator)
    lengths = torch.tensor([3, 1, 2])[:batch]
    for i, length in enumerate(lengths.tolist()):
        targets[i, length:] = 0
    return logits, targets, lengths


def counted(targets):
    return [(b, t) for b in range(targets.size(0)) for t in range(targets.size(1)) if targets[b, t] != 0]


def smoothed(label, num_class, alpha):
    return [1.0 - alpha if c == label else alpha / (num_class - 1) for c in range(num_class)]


def kl(target, probs):
    return sum(t * (math.log(t) - math.log(p)) for t, p in zip(target, probs) if t > 0)


def probs_at(logits, b, t):
    return logits[b, t].double().softmax(-1).tolist()


# ------------------------------------------------------------------------------ Attn forms

def test_ce_by_hand_and_equal_to_torch():
    logits = torch.tensor([[[1.0, 2.0, 0.0], [0.5, 0.5, 3.0]]])
    targets = torch.tensor([[1, 0]])
    # Only the first token counts: -log(e^2 / (e^1 + e^2 + e^0)) = log(e + e^2 + 1) - 2 = 0.407606
    assert loss_of("CE", logits, targets).item() == pytest.approx(0.407606, abs=1e-5)
    logits, targets = attn_batch()
    expected = F.cross_entropy(logits.view(-1, 6), targets.view(-1), ignore_index=0)
    assert loss_of("CE", logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)


def test_ls_alpha_zero_equals_ce_and_alpha_from_the_formula():
    logits, targets = attn_batch()
    assert loss_of("LS", logits, targets, alpha=0.0).item() == pytest.approx(
        loss_of("CE", logits, targets).item(), rel=1e-6)
    alpha = 0.1
    tokens = counted(targets)
    expected = sum(kl(smoothed(targets[b, t].item(), 6, alpha), probs_at(logits, b, t)) for b, t in tokens)
    assert loss_of("LS", logits, targets, alpha=alpha).item() == pytest.approx(expected / len(tokens), rel=1e-5)


def cross_entropy(target, probs):
    return -sum(t * math.log(p) for t, p in zip(target, probs))


def test_boost_soft_is_the_cross_entropy_to_the_bootstrapped_target():
    logits, targets = attn_batch(seed=1)
    tokens = counted(targets)
    # beta = 1: label smoothing's KL plus the (constant) entropy of the smoothed label
    ls = loss_of("LS", logits, targets, alpha=0.1).item()
    entropy_q = -(0.9 * math.log(0.9) + 5 * 0.02 * math.log(0.02))
    assert loss_of("boost_soft", logits, targets, alpha=0.1, beta=1.0).item() == pytest.approx(ls + entropy_q, rel=1e-6)
    expected = 0.0
    for b, t in tokens:
        p = probs_at(logits, b, t)
        q = smoothed(targets[b, t].item(), 6, 0.1)
        expected += cross_entropy([0.5 * qc + 0.5 * pc for qc, pc in zip(q, p)], p)
    got = loss_of("boost_soft", logits, targets, alpha=0.1, beta=0.5).item()
    assert got == pytest.approx(expected / len(tokens), rel=1e-5)


def test_boost_soft_gradient_is_beta_ce_plus_one_minus_beta_entropy():
    # Closed form per counted token, alpha = 0: d/dz [beta (-log p_y) + (1 - beta) H(p)]
    #   = beta (p - y) - (1 - beta) p (log p + H(p)),  divided by the number of counted tokens.
    logits, targets = attn_batch(seed=2)
    beta = 0.6
    live = logits.clone().requires_grad_(True)
    loss_of("boost_soft", live, targets, alpha=0.0, beta=beta).backward()
    p = logits.double().softmax(-1)
    log_p = p.log()
    entropy = -(p * log_p).sum(-1, keepdim=True)
    one_hot = F.one_hot(targets, 6).double()
    mask = (targets != 0).double().unsqueeze(-1)
    closed = (beta * (p - one_hot) - (1 - beta) * p * (log_p + entropy)) * mask / mask.sum()
    assert torch.allclose(live.grad.double(), closed, atol=1e-6)
    # The original's KL(m || p) form gives c(p_y) (p - y) per token, a multiple of p - y; the
    # bootstrap gradient is not one: its ratio to p - y varies across the classes of a token.
    p_minus_y = (p - one_hot) * mask
    ratio = live.grad.double() / p_minus_y.where(p_minus_y.abs() > 1e-9, torch.ones_like(p_minus_y))
    counted_ratio = ratio[mask.squeeze(-1).bool()]
    assert (counted_ratio.max(-1).values - counted_ratio.min(-1).values).max() > 1e-2


def kl_bootstrap_factor(p_y, beta):
    """c in the gradient c (p - y) of the original's KL(m || p), m = beta y + (1 - beta) p, p live.
    From dKL/dz_j = beta (p_j - y_j) + (1 - beta) p_j (r_j - sum_k p_k r_k), r_k = log(m_k / p_k):
    r_k = log(1 - beta) off the label and log(1 - beta) + log(1 + beta / ((1 - beta) p_y)) on it."""
    return beta - (1 - beta) * p_y * math.log(1 + beta / ((1 - beta) * p_y))


@pytest.mark.parametrize("beta", [0.5, 0.8, 0.95])
@pytest.mark.parametrize("label_logit", [-2.0, math.log(3.0), 4.0, 12.0])
def test_the_originals_kl_bootstrap_gradient_is_c_times_p_minus_y_with_c_at_most_beta(beta, label_logit):
    # one token over 4 classes, label 0; label_logit log 3 gives p_y = 3 / 6 = 1/2 exactly
    logits = torch.tensor([label_logit, 0.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    log_p = logits.log_softmax(-1)
    m = beta * y + (1 - beta) * log_p.exp()
    F.kl_div(log_p, m, reduction="sum").backward()  # the original's nn.KLDivLoss(log p, m)
    p = log_p.exp().detach()
    p_y = p[0].item()
    c = kl_bootstrap_factor(p_y, beta)
    assert torch.allclose(logits.grad, c * (p - y), rtol=1e-9, atol=1e-12)
    # below beta, never between beta and 1; its floor at p_y = 1 is beta + (1 - beta) log(1 - beta)
    assert beta + (1 - beta) * math.log(1 - beta) < c < beta
    if label_logit == math.log(3.0) and beta == 0.8:
        assert c == pytest.approx(0.8 - 0.1 * math.log(9.0), rel=1e-12)  # 0.5803
    if label_logit == 12.0:
        assert c == pytest.approx(beta + (1 - beta) * math.log(1 - beta), abs=1e-3)  # 0.478 at beta 0.8


def test_boost_hard_from_the_formula():
    logits, targets = attn_batch(seed=3)
    tokens = counted(targets)
    expected = 0.0
    for b, t in tokens:
        p = probs_at(logits, b, t)
        label = smoothed(targets[b, t].item(), 6, 0.1)
        model = smoothed(max(range(6), key=lambda c: p[c]), 6, 0.1)
        expected += cross_entropy([0.8 * lc + 0.2 * mc for lc, mc in zip(label, model)], p)
    got = loss_of("boost_hard", logits, targets, alpha=0.1, beta=0.8).item()
    assert got == pytest.approx(expected / len(tokens), rel=1e-5)


def test_focal_gamma_zero_is_ce_and_gamma_two_from_the_formula():
    logits, targets = attn_batch(seed=4)
    assert loss_of("FL", logits, targets, alpha=0.0).item() == pytest.approx(
        loss_of("CE", logits, targets).item(), rel=1e-6)
    tokens = counted(targets)
    expected = 0.0
    for b, t in tokens:
        pt = probs_at(logits, b, t)[targets[b, t].item()]
        expected += -((1 - pt) ** 2) * math.log(pt)
    assert loss_of("FL", logits, targets, alpha=2.0).item() == pytest.approx(expected / len(tokens), rel=1e-5)


def test_mbls_penalises_only_gaps_beyond_the_margin():
    logits = torch.tensor([[[15.0, 0.0, 3.0], [1.0, 2.0, 3.0]]])
    targets = torch.tensor([[1, 2]])
    ce = loss_of("CE", logits, targets).item()
    # Gaps to the max: token 0: 0, 15, 12 -> relu(g - 10) = 0, 5, 2 -> mean 7/3; token 1: all < 10.
    # Mean over the two tokens: 7/6, weighted by alpha = 0.1.
    assert loss_of("MBLS", logits, targets, alpha=0.1).item() == pytest.approx(ce + 0.1 * 7 / 6, rel=1e-6)
    assert loss_of("MBLS", logits, targets, alpha=0.0).item() == pytest.approx(ce, rel=1e-6)


def test_er_subtracts_the_mean_token_entropy():
    logits, targets = attn_batch(seed=5)
    tokens = counted(targets)
    entropy = sum(-sum(p * math.log(p) for p in probs_at(logits, b, t)) for b, t in tokens) / len(tokens)
    expected = loss_of("CE", logits, targets).item() - 0.2 * entropy
    assert loss_of("ER", logits, targets, alpha=0.2).item() == pytest.approx(expected, rel=1e-5)


def test_robust_at_the_start_is_almost_ce():
    # progress 0: global trust 1 / (1 + e^(16 * 0.5)) = 3.4e-4, so the target is ~ the label.
    logits, targets = attn_batch(seed=6)
    ce = loss_of("CE", logits, targets).item()
    assert loss_of("robust", logits, targets, progress=(0, 1000)).item() == pytest.approx(ce, rel=1e-3)


def test_robust_gradient_is_the_self_corrected_one():
    # With eps and p detached, d KL((1-eps) y + eps p || p') / d logits = (1 - eps)(p - y) per token,
    # divided by the number of counted tokens; eps = g * (1 - H(p) / ln C), g = 1 / (1 + e^(-B (r - t))).
    logits, targets = attn_batch(seed=7)
    logits.requires_grad_(True)
    loss_of("robust", logits, targets, progress=(750, 1000), B=16.0, t=0.5).backward()
    g = 1.0 / (1.0 + math.exp(-16.0 * (0.75 - 0.5)))
    tokens = counted(targets)
    for b, t in tokens:
        p = probs_at(logits, b, t)
        eps = g * (1.0 + sum(x * math.log(x) for x in p) / math.log(6))
        one_hot = [1.0 if c == targets[b, t].item() else 0.0 for c in range(6)]
        expected = [(1.0 - eps) * (pc - yc) / len(tokens) for pc, yc in zip(p, one_hot)]
        assert logits.grad[b, t].tolist() == pytest.approx(expected, abs=1e-6)


def test_robust_needs_progress():
    logits, targets = attn_batch()
    with pytest.raises(ValueError, match="progress"):
        calibrators.get_calibrator("robust", opt())(logits, targets, None, None)


@pytest.mark.parametrize("name", ATTN_NAMES)
def test_padding_positions_change_nothing(name):
    logits, targets = attn_batch(seed=8)
    fields = dict(alpha=0.1, beta=0.7)
    base = logits.clone().requires_grad_(True)
    loss = loss_of(name, base, targets, progress=(30, 100), **fields)
    loss.backward()
    noisy = logits.clone()
    noisy[targets == 0] = 50.0 * torch.randn(int((targets == 0).sum()), logits.size(-1))
    noisy.requires_grad_(True)
    other = loss_of(name, noisy, targets, progress=(30, 100), **fields)
    other.backward()
    assert other.item() == pytest.approx(loss.item(), rel=1e-6)
    assert (noisy.grad[targets == 0] == 0).all()
    assert torch.isfinite(base.grad).all()


@pytest.mark.parametrize("name", ATTN_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attn_gradients_are_finite(name, dtype):
    # Extreme logits and alpha = 0 (zeros in the target) are where log 0 could leak a NaN.
    logits, targets = attn_batch(seed=9)
    logits[0, 0] = torch.tensor([80.0, -80.0, 0.0, 0.0, 0.0, 0.0])
    logits = logits.to(dtype).requires_grad_(True)
    loss = loss_of(name, logits, targets, alpha=0.0, beta=1.0, progress=(90, 100))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(logits.grad.float()).all()


def test_all_padding_gives_zero_not_nan():
    logits = torch.randn(2, 3, 4)
    targets = torch.zeros(2, 3, dtype=torch.long)
    for name in ATTN_NAMES:
        assert loss_of(name, logits, targets, alpha=0.1).item() == 0.0


# ------------------------------------------------------------------------------ CTC forms

def torch_ctc(logits, targets, lengths, reduction="mean"):
    log_probs = logits.log_softmax(-1).transpose(0, 1)
    steps = torch.full((logits.size(0),), logits.size(1))
    return F.ctc_loss(log_probs, targets, steps, lengths, blank=0, reduction=reduction, zero_infinity=True)


def test_ctc_ce_is_the_ctc_loss_and_alias_matches():
    logits, targets, lengths = ctc_batch()
    expected = torch_ctc(logits, targets, lengths).item()
    for name in ("CE", "CTC"):
        assert loss_of(name, logits, targets, lengths, prediction="CTC").item() == pytest.approx(expected, rel=1e-6)


def test_ctc_ls_from_the_formula():
    logits, targets, lengths = ctc_batch(seed=1)
    ctc = torch_ctc(logits, targets, lengths).item()
    assert loss_of("LS", logits, targets, lengths, prediction="CTC", alpha=0.0).item() == pytest.approx(ctc, rel=1e-6)
    # (1 - a) CTC + a * mean over frames and classes of u (ln u - ln p), u = 1/5.
    log_p = logits.double().log_softmax(-1)
    uniform_term = ((math.log(1 / 5) - log_p) / 5).mean().item()
    expected = 0.9 * ctc + 0.1 * uniform_term
    assert loss_of("CTCLS", logits, targets, lengths, prediction="CTC", alpha=0.1).item() == pytest.approx(
        expected, rel=1e-5)


def test_ctc_focal_from_the_formula():
    logits, targets, lengths = ctc_batch(seed=2)
    ctc = torch_ctc(logits, targets, lengths).item()
    assert loss_of("FL", logits, targets, lengths, prediction="CTC", alpha=0.0).item() == pytest.approx(ctc, rel=1e-6)
    nll = torch_ctc(logits, targets, lengths, reduction="none").double()
    expected = ((1 - torch.exp(-nll)) ** 2 * nll / lengths).mean().item()
    assert loss_of("FL", logits, targets, lengths, prediction="CTC", alpha=2.0).item() == pytest.approx(
        expected, rel=1e-5)


def test_ctc_robust_at_the_start_is_almost_ctc_and_later_adds_the_weighted_term():
    logits, targets, lengths = ctc_batch(seed=3)
    ctc = torch_ctc(logits, targets, lengths).item()
    start = loss_of("robust", logits, targets, lengths, prediction="CTC", progress=(0, 100)).item()
    assert start == pytest.approx(ctc, rel=1e-3)
    log_p = logits.double().log_softmax(-1)
    trust = 1 + (log_p.exp() * log_p).sum(-1) / math.log(5)  # (B, T)
    eps = trust.mean(1) / (1 + math.exp(-16 * 0.5))  # progress 1, transition 0.5
    per_sample = ((math.log(1 / 5) - log_p) / 5).mean(dim=(1, 2))
    expected = ctc + (eps * per_sample).mean().item()
    end = loss_of("robust", logits, targets, lengths, prediction="CTC", progress=(100, 100)).item()
    assert end == pytest.approx(expected, rel=1e-5)


def test_ctc_mbls_and_er():
    logits, targets, lengths = ctc_batch(seed=4)
    logits[0, 0, 0] = 30.0  # a gap beyond the margin
    ctc = torch_ctc(logits, targets, lengths).item()
    gaps = logits.max(-1, keepdim=True).values - logits
    penalty = F.relu(gaps - 10).mean().item()
    got = loss_of("MBLS", logits, targets, lengths, prediction="CTC", alpha=0.1).item()
    assert penalty > 0 and got == pytest.approx(ctc + 0.1 * penalty, rel=1e-5)
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean().item()
    got = loss_of("ER", logits, targets, lengths, prediction="CTC", alpha=0.3).item()
    assert got == pytest.approx(ctc - 0.3 * entropy, rel=1e-5)


@pytest.mark.parametrize("name", CTC_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ctc_gradients_are_finite(name, dtype):
    logits, targets, lengths = ctc_batch(seed=5)
    logits = logits.to(dtype).requires_grad_(True)
    loss = loss_of(name, logits, targets, lengths, prediction="CTC", alpha=0.1, progress=(50, 100))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(logits.grad.float()).all()


def test_ctc_padding_after_the_target_length_changes_nothing():
    logits, targets, lengths = ctc_batch(seed=6)
    other = targets.clone()
    other[1, 1:] = 3  # beyond length 1
    for name in CTC_NAMES:
        a = loss_of(name, logits, targets, lengths, prediction="CTC", alpha=0.1).item()
        assert loss_of(name, logits, other, lengths, prediction="CTC", alpha=0.1).item() == pytest.approx(a, rel=1e-6)


# ------------------------------------------------------------------------------ registry

def test_unknown_name_lists_the_valid_names():
    with pytest.raises(UserError) as err:
        calibrators.get_calibrator("nope", opt())
    message = str(err.value)
    assert "--calibrator nope" in message
    assert all(name in message for name in ATTN_NAMES)


def test_a_name_without_a_form_for_the_head_lists_that_heads_names():
    with pytest.raises(UserError) as err:
        calibrators.get_calibrator("MBLS_missing", opt("CTC"))
    message = str(err.value)
    assert "robust" in message and "boost_hard" in message and "CTCLS" in message
    with pytest.raises(UserError) as err:
        calibrators.get_calibrator("CE", opt("Attn")) and calibrators.get_calibrator("CTC", opt("Attn"))
    message = str(err.value)
    assert "--Prediction Attn" in message and "CTCLS" not in message and "boost_soft" in message
    with pytest.raises(UserError):
        calibrators.get_calibrator("CTCLS", opt("Attn"))
    with pytest.raises(UserError, match="--Prediction"):
        calibrators.get_calibrator("CE", opt("Transformer"))


@pytest.mark.parametrize("name,fields,flag", [
    ("LS", {"alpha": 1.0}, "--alpha"), ("FL", {"alpha": -1.0}, "--alpha"),
    ("boost_soft", {"beta": 1.5}, "--beta"), ("robust", {"B": 0.0}, "--B"), ("robust", {"t": 2.0}, "--t"),
])
def test_out_of_range_options_are_user_errors(name, fields, flag):
    with pytest.raises(UserError, match=flag):
        calibrators.get_calibrator(name, opt(**fields))


def test_defaults_when_optional_options_are_missing():
    # Only Prediction given: beta 0.95, B 16, t 0.5, alpha 0, and smooth_tail is never required.
    robust = calibrators.get_calibrator("robust", opt())
    assert (robust.base, robust.transition, robust.alpha) == (16.0, 0.5, 0.0)
    assert calibrators.get_calibrator("boost_soft", opt()).beta == 0.95


def test_help_names_every_calibrator_and_its_options():
    assert set(calibrators.CALIBRATOR_HELP) == set(calibrators.CALIBRATORS)
    assert "--beta" in calibrators.CALIBRATOR_HELP["boost_soft"]
    assert "--B" in calibrators.CALIBRATOR_HELP["robust"] and "--t" in calibrators.CALIBRATOR_HELP["robust"]
    assert all("smooth_tail" in line for line in calibrators.CALIBRATOR_HELP.values())


def test_ctc_bootstraps_from_their_formulas():
    logits, targets, lengths = ctc_batch(seed=3)
    ctc = loss_of("CE", logits, targets, lengths, prediction="CTC").item()
    log_probs = logits.log_softmax(-1)
    frame_entropy = -(log_probs.exp() * log_probs).sum(-1).mean().item()
    soft = loss_of("boost_soft", logits, targets, lengths, prediction="CTC", alpha=0.0, beta=0.8).item()
    assert soft == pytest.approx(0.8 * ctc + 0.2 * frame_entropy, rel=1e-6)
    assert loss_of("boost_soft", logits, targets, lengths, prediction="CTC", alpha=0.0, beta=1.0).item() == \
        pytest.approx(ctc, rel=1e-6)
    # hard: the second term is the CTC loss of the model's own greedy reading
    greedy, greedy_lengths = calibrators.greedy_ctc_targets(logits)
    own = loss_of("CE", logits, greedy, greedy_lengths, prediction="CTC").item()
    hard = loss_of("boost_hard", logits, targets, lengths, prediction="CTC", alpha=0.0, beta=0.7).item()
    assert hard == pytest.approx(0.7 * ctc + 0.3 * own, rel=1e-6)


def test_greedy_ctc_targets_collapse_by_hand():
    # argmax paths: [1, 1, 0, 2, 2, 0, 1] -> "1 2 1"; [0, 0, 3, 0, 3, 3, 3] -> "3 3"
    paths = torch.tensor([[1, 1, 0, 2, 2, 0, 1], [0, 0, 3, 0, 3, 3, 3]])
    logits = F.one_hot(paths, 5).float() * 10
    targets, lengths = calibrators.greedy_ctc_targets(logits)
    assert lengths.tolist() == [3, 2]
    assert targets.tolist() == [[1, 2, 1, 0, 0, 0, 0], [3, 3, 0, 0, 0, 0, 0]]
