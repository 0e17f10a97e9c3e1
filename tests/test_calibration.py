"""calibration: temperature scaling fitted at the token and at the word level, the word confidence
under a temperature, and the calibration metrics. Expected values are worked out by hand in
comments."""
import math

import pytest
import torch

from measurement import calibration
import options
import utils
from utils import UserError

torch.set_num_threads(1)

ATTN = utils.AttnLabelConverter("abcd")    # [GO]=0 [s]=1 a..d=2..5
CTC = utils.CTCLabelConverter("abcd")      # blank=0 a..d=1..4


def attn_logits(batch, steps, scale, generator):
    """Random Attn logits whose [s] grows likelier along the steps, so that lengths vary."""
    z = scale * torch.randn(batch, steps, len(ATTN.character), generator=generator)
    z[:, :, ATTN.EOS] += torch.linspace(-2 * scale, 2 * scale, steps)
    return z


def ctc_logits(batch, steps, scale, generator):
    return scale * torch.randn(batch, steps, len(CTC.character), generator=generator)


def sample_correct(confidence, generator):
    """Correctness drawn with the given probabilities: a model calibrated at that confidence."""
    return (torch.rand(confidence.numel(), generator=generator, dtype=torch.float64) < confidence).double()


# ------------------------------------------------------------------------------ word confidence

@pytest.mark.parametrize("converter", [ATTN, CTC], ids=["Attn", "CTC"])
def test_word_confidence_is_that_of_decode_predictions_under_the_temperature(converter):
    generator = torch.Generator().manual_seed(0)
    make = attn_logits if converter is ATTN else ctc_logits
    z = make(64, 7, 2.0, generator)
    for temperature in (0.3, 1.0, 2.5):
        texts, expected, _ = utils.decode_predictions(calibration.apply_temperature(z, temperature), converter)
        got = calibration.word_confidence(z, converter, temperature)
        assert got.dtype == torch.float64 and got.shape == (64,)
        assert torch.allclose(got, expected.double(), rtol=1e-4, atol=1e-7)
        # the reading does not move with the temperature
        assert texts == utils.decode_predictions(z, converter)[0]


def test_attn_word_confidence_falls_as_the_temperature_rises_but_not_in_raw_order():
    generator = torch.Generator().manual_seed(1)
    z = attn_logits(200, 6, 2.0, generator)
    confidences = [calibration.word_confidence(z, ATTN, t) for t in (0.5, 1.0, 2.0, 4.0)]
    assert all((a >= b).all() for a, b in zip(confidences, confidences[1:]))
    # Not monotone in the raw confidence for a fixed length (measurement/calibration.py's docstring): steps
    # over [GO], [s], a, b with winners a (0.9) then b (0.5), and a, b at 0.67 each, [s] sure in
    # both; raw 0.450 > 0.449, at T = 0.5 they swap: 0.494 < 0.648.
    sure_eos = [1e-9, 1 - 3e-9, 1e-9, 1e-9]
    first = [[1e-9, 1e-9, 0.9, 0.1 - 2e-9], [1e-9, 1e-9, 0.5 + 2e-9, 0.5 - 4e-9], sure_eos]
    second = [[1e-9, 1e-9, 0.67, 0.33 - 2e-9], [1e-9, 1e-9, 0.33 - 2e-9, 0.67], sure_eos]
    logits = torch.tensor([first, second], dtype=torch.float64).log()
    two_letters = utils.AttnLabelConverter("ab")
    raw = calibration.word_confidence(logits, two_letters, 1.0)
    sharp = calibration.word_confidence(logits, two_letters, 0.5)
    assert raw[0] > raw[1] and sharp[0] < sharp[1]
    assert sharp.tolist() == pytest.approx([0.81 / 0.82 * 0.5, (0.67 ** 2 / (0.67 ** 2 + 0.33 ** 2)) ** 2], abs=1e-6)


# ------------------------------------------------------------------------------ word-level temperature

def groups(*spec):
    """(confidence, correct) of groups (c, right, wrong): `right + wrong` words at raw confidence c."""
    confidence, correct = [], []
    for c, right, wrong in spec:
        confidence += [c] * (right + wrong)
        correct += [1.0] * right + [0.0] * wrong
    return torch.tensor(confidence, dtype=torch.float64), torch.tensor(correct, dtype=torch.float64)


@pytest.mark.parametrize("spec, expected", [
    # c ** (1 / 2): 0.81 -> 0.9 and 0.6561 -> 0.81, the shares of right words in each group
    (((0.81, 9, 1), (0.6561, 81, 19)), 2.0),
    # c ** 2: 0.9 -> 0.81 and 0.5 -> 0.25
    (((0.9, 81, 19), (0.5, 1, 3)), 0.5),
])
def test_word_temperature_recovers_a_known_temperature_in_closed_form(spec, expected):
    # The likelihood of a group of words at confidence c, a share q of them right, peaks where
    # c ** (1 / T) = q. Both groups peak at the same T, so their sum peaks there too.
    confidence, correct = groups(*spec)
    assert calibration.fit_word_temperature(confidence, correct) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("true_temperature", [0.4, 2.5])
def test_word_temperature_recovers_a_known_temperature_from_draws(true_temperature):
    # Words right with probability exactly c ** (1 / T*): the binary likelihood peaks near T*.
    generator = torch.Generator().manual_seed(2)
    confidence = torch.rand(4000, generator=generator, dtype=torch.float64) * 0.98 + 0.01
    correct = sample_correct(confidence ** (1 / true_temperature), generator)
    assert calibration.fit_word_temperature(confidence, correct) == pytest.approx(true_temperature, rel=0.1)


def two_words_of_one_length():
    """Attn logits of two 2-letter words over [GO], [s], a, b: winners a (0.9) then b (0.5), and a,
    b at 0.67 each, [s] sure in both: raw confidences 0.450 > 0.449. Dividing their logits by 0.5
    swaps them (0.494 < 0.648, the test above)."""
    sure_eos = [1e-9, 1 - 3e-9, 1e-9, 1e-9]
    first = [[1e-9, 1e-9, 0.9, 0.1 - 2e-9], [1e-9, 1e-9, 0.5 + 2e-9, 0.5 - 4e-9], sure_eos]
    second = [[1e-9, 1e-9, 0.67, 0.33 - 2e-9], [1e-9, 1e-9, 0.33 - 2e-9, 0.67], sure_eos]
    return torch.tensor([first, second], dtype=torch.float64).log().float(), utils.AttnLabelConverter("ab")


@pytest.mark.parametrize("spec, low", [(((0.81, 9, 1), (0.6561, 81, 19)), False),
                                       (((0.9, 81, 19), (0.5, 1, 3)), True)], ids=["T>1", "T<1"])
def test_word_level_keeps_the_order_of_words_of_one_length(spec, low):
    temperature = calibration.fit_word_temperature(*groups(*spec))
    assert (temperature < 1) == low
    logits, converter = two_words_of_one_length()
    texts, raw, _ = utils.decode_predictions(logits, converter)
    assert [len(t) for t in texts] == [2, 2] and raw[0] > raw[1]
    # the path evaluate(), demo.py and data_sampling.py take
    _, calibrated, _ = calibration.decode_calibrated(logits, converter, calibration.Scaling(temperature, "word"))
    assert calibrated[0] > calibrated[1]
    assert calibrated.tolist() == pytest.approx((raw.double() ** (1 / temperature)).tolist(), rel=1e-5)
    # and it lowers every confidence for T < 1, raises it for T > 1
    assert ((calibrated < raw) if low else (calibrated > raw)).all()
    # the token level, by contrast, at T = 0.5: swapped
    _, token, _ = calibration.decode_calibrated(logits, converter, calibration.Scaling(0.5, "token"))
    assert token[0] < token[1]


def test_word_level_lowers_word_ece_where_token_level_does_not():
    # Words of 8 characters and [s] (9 steps) over [GO], [s], a..h. Every step of word i puts p_i
    # (0.85 to 0.95) on its winner and spreads the rest evenly, and every token is right with
    # probability p_i: token-level calibrated, so the token fit keeps T near 1. But the errors come
    # together: word i is wrong with probability 3 (1 - p_i), and then in 3 of its characters. So
    # a word is right 70% of the time while its confidence p_i^9 averages 0.40: word ECE about 0.3,
    # which only a temperature fitted on the words removes. Right words: 3p - 2, from 0.55 at
    # p = 0.85 (confidence 0.23: 1 / T = log 0.55 / log 0.23 = 0.41) to 0.85 at p = 0.95
    # (confidence 0.63: 1 / T = 0.35), so the word fit lands near T = 2.6.
    generator = torch.Generator().manual_seed(3)
    converter = utils.AttnLabelConverter("abcdefgh")
    batch, length, classes = 2000, 8, 10
    steps = length + 1
    p = 0.85 + 0.1 * torch.rand(batch, generator=generator, dtype=torch.float64)
    winners = torch.randint(2, classes, (batch, steps), generator=generator)
    winners[:, length] = converter.EOS
    probs = ((1 - p) / (classes - 1)).view(batch, 1, 1).repeat(1, steps, classes)
    probs.scatter_(2, winners.unsqueeze(2), p.view(batch, 1, 1).expand(batch, steps, 1))
    logits = probs.log().float()
    wrong = torch.rand(batch, generator=generator, dtype=torch.float64) < 3 * (1 - p)
    targets = winners.clone()
    for i in torch.nonzero(wrong).flatten().tolist():
        for step in torch.randperm(length, generator=generator)[:3].tolist():
            shift = torch.randint(1, classes, (1,), generator=generator).item()  # any other class, evenly
            targets[i, step] = (winners[i, step] + shift) % classes
    correct = (~wrong).double()
    assert (targets == winners).double().mean().item() == pytest.approx(p.mean().item(), abs=0.01)

    raw = calibration.word_confidence(logits, converter)
    token_t = calibration.fit_temperature(logits, targets, mask=torch.ones_like(targets, dtype=torch.bool))
    word_t = calibration.fit_word_temperature(raw, correct)
    assert token_t == pytest.approx(1.0, abs=0.05)
    assert 2.4 < word_t < 2.9

    def ece(confidence):
        return calibration.calibration_metrics(confidence, correct)["ece"]

    token_ece = ece(calibration.word_confidence(logits, converter, token_t))
    word_ece = ece(calibration.apply_word_temperature(raw, word_t))
    assert ece(raw) > 0.25 and token_ece > 0.25
    assert word_ece < 0.05 and word_ece < 0.3 * token_ece


def test_word_temperature_edge_cases():
    assert calibration.fit_word_temperature(torch.zeros(0), torch.zeros(0)) == 1.0
    with pytest.raises(ValueError, match="50 confidences but 3 correctness values"):
        calibration.fit_word_temperature(torch.full((50,), 0.5), torch.ones(3))
    # all right: c ** (1 / T) rises towards 1 with T but passes 1 - 1e-7 only for T > log 0.5 / -1e-7
    # (7e6): the fit stops at the upper bound
    half = torch.full((50,), 0.5)
    assert calibration.fit_word_temperature(half, torch.ones(50)) == pytest.approx(calibration.WORD_TEMPERATURE_BOUNDS[1])
    # all wrong: lowering helps until every confidence is down at the clamp 1e-7, which 0.5 reaches at
    # T = log 0.5 / log 1e-7 = 0.0430; the loss is flat below, and the search stops on that plateau
    low = calibration.fit_word_temperature(half, torch.zeros(50))
    assert calibration.WORD_TEMPERATURE_BOUNDS[0] <= low <= math.log(0.5) / math.log(1e-7) * 1.0001
    assert low > 0.02  # not run down to the bound: the grid point nearest T = 1 on the plateau
    # a confidence of 0 or 1 stays where it is, and does not move the fit
    confidence, correct = groups((0.81, 9, 1), (0.6561, 81, 19))
    padded = torch.cat([confidence, torch.tensor([0.0, 1.0], dtype=torch.float64)])
    assert calibration.fit_word_temperature(padded, torch.cat([correct, torch.tensor([0.0, 1.0])])) == \
        pytest.approx(2.0, rel=1e-3)
    assert calibration.apply_word_temperature(torch.tensor([0.0, 1.0]), 0.3).tolist() == [0.0, 1.0]
    with pytest.raises(UserError, match="^--calibration word scales the word confidence only, and this strategy "
                                        "ranks margin"):
        calibration.check_level("word", ("margin",))
    calibration.check_level("token", ("margin",))
    calibration.check_level("word", ("cal_confidence",))


@pytest.mark.parametrize("value, temperature, allow_both, expected", [
    (None, "auto", False, "token"), ("word", "auto", False, "word"), (" Token ", "auto", False, "token"),
    ("both", "auto", True, "both"), (None, None, False, None), (None, 1.5, True, None),
])
def test_parse_calibration(value, temperature, allow_both, expected):
    assert options.parse_calibration(value, temperature, allow_both=allow_both) == expected


@pytest.mark.parametrize("value, temperature, allow_both, message", [
    ("both", "auto", False, "--calibration both: give token or word"),
    ("sequence", "auto", True, "--calibration sequence: give token, word or both"),
    ("word", 1.5, False, "--calibration word: it chooses how --temperature auto is fitted; give --temperature "
                         "auto (or leave --calibration out)"),
    ("token", None, False, "--calibration token: it chooses how --temperature auto is fitted"),
])
def test_parse_calibration_rejects_with_the_flag_and_the_fix(value, temperature, allow_both, message):
    with pytest.raises(UserError) as info:
        options.parse_calibration(value, temperature, allow_both=allow_both)
    assert str(info.value).startswith(message)


# ------------------------------------------------------------------------------ token-level temperature

def test_fit_temperature_recovers_a_known_temperature():
    generator = torch.Generator().manual_seed(0)
    z = 3.0 * torch.randn(4000, 10, generator=generator)
    labels = torch.multinomial((z / 2.0).softmax(-1), 1, generator=generator).squeeze(1) + 1
    mask = torch.ones_like(labels, dtype=torch.bool)
    # Labels are 1-based here so that none is mistaken for the ignored index 0 by default.
    logits = torch.cat([torch.full((4000, 1), -1e4), z], dim=1)
    assert calibration.fit_temperature(logits, labels) == pytest.approx(2.0, abs=0.15)
    assert calibration.fit_temperature(logits, labels, mask) == pytest.approx(2.0, abs=0.15)
    scaled = calibration.apply_temperature(logits, 2.0)
    assert torch.allclose(scaled, logits / 2.0)


def test_fit_temperature_ctc_form_recovers_a_known_temperature():
    # Texts drawn from the CTC model itself at T0 = 2: sample a path frame by frame from
    # softmax(z / 2) and collapse it; the CTC likelihood of those texts peaks near T = 2.
    generator = torch.Generator().manual_seed(1)
    batch, steps, num_class = 400, 10, 6
    z = 3.0 * torch.randn(batch, steps, num_class, generator=generator)
    paths = torch.multinomial((z / 2.0).softmax(-1).view(-1, num_class), 1, generator=generator).view(batch, steps)
    keep = utils.ctc_keep_mask(paths)
    lengths = keep.sum(1)
    targets = torch.zeros(batch, steps, dtype=torch.long)
    for i in range(batch):
        targets[i, :lengths[i]] = paths[i][keep[i]]
    assert calibration.fit_temperature(z, targets, target_lengths=lengths) == pytest.approx(2.0, abs=0.15)


def test_fit_temperature_with_nothing_counted_is_one():
    assert calibration.fit_temperature(torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)) == 1.0


# ------------------------------------------------------------------------------ metrics

def test_metrics_small_case_by_hand():
    conf = [0.1, 0.3, 0.35, 0.75, 0.9, 1.0]
    correct = [0, 0, 1, 1, 0, 1]
    m = calibration.calibration_metrics(conf, correct, bins=5)
    # Equal-width bins of 0.2: {0.1} acc 0 conf 0.1 gap 0.1; {0.3, 0.35} acc 0.5 conf 0.325 gap 0.175;
    # {0.75} acc 1 gap 0.25; {0.9, 1.0} acc 0.5 conf 0.95 gap 0.45.
    # ECE = (1*0.1 + 2*0.175 + 1*0.25 + 2*0.45) / 6 = 1.6 / 6; MCE = 0.45.
    assert m["ece"] == pytest.approx(1.6 / 6)
    assert m["mce"] == pytest.approx(0.45)
    # Brier = (0.01 + 0.09 + 0.4225 + 0.0625 + 0.81 + 0) / 6 = 1.395 / 6.
    assert m["brier"] == pytest.approx(1.395 / 6)
    assert m["n"] == 6 and m["accuracy"] == pytest.approx(0.5) and m["confidence"] == pytest.approx(3.4 / 6)
    # Equal-count bins of 2 after sorting: {0.1, 0.3} acc 0 conf 0.2 gap 0.2; {0.35, 0.75} acc 1
    # conf 0.55 gap 0.45; {0.9, 1.0} acc 0.5 conf 0.95 gap 0.45. ACE = (0.4 + 0.9 + 0.9) / 6 = 2.2 / 6.
    assert calibration.calibration_metrics(conf, correct, bins=3)["ace"] == pytest.approx(2.2 / 6)


def test_metrics_perfectly_calibrated_is_zero():
    conf = torch.tensor([0.5, 0.5, 0.5, 0.5, 1.0, 1.0])
    correct = torch.tensor([1, 0, 1, 0, 1, 1])
    m = calibration.calibration_metrics(conf, correct, bins=3)
    assert m["ece"] == pytest.approx(0.0) and m["ace"] == pytest.approx(0.0) and m["mce"] == pytest.approx(0.0)
    assert m["brier"] == pytest.approx(4 * 0.25 / 6)


def test_metrics_all_wrong_at_full_confidence():
    m = calibration.calibration_metrics(torch.ones(7), torch.zeros(7))
    assert m["ece"] == pytest.approx(1.0) and m["ace"] == pytest.approx(1.0)
    assert m["mce"] == pytest.approx(1.0) and m["brier"] == pytest.approx(1.0)


def test_bin_edges_zero_in_first_one_in_last_and_right_closed():
    assert calibration.equal_width_bins(torch.tensor([0.0, 0.25, 0.5, 0.51, 1.0]), bins=2).tolist() == [0, 0, 0, 1, 1]
    # conf 0 counts: alone in the first bin with a wrong answer -> ECE 0 there; 1.0 right in the last.
    assert calibration.calibration_metrics([0.0, 1.0], [0, 1], bins=15)["ece"] == pytest.approx(0.0)


def test_metrics_of_nothing_are_nan():
    m = calibration.calibration_metrics(torch.zeros(0), torch.zeros(0))
    assert m["n"] == 0
    assert all(math.isnan(m[k]) for k in ("ece", "ace", "mce", "brier"))


def test_reliability_diagram_writes_a_png(tmp_path):
    generator = torch.Generator().manual_seed(0)
    conf = torch.rand(200, generator=generator)
    correct = (torch.rand(200, generator=generator) < conf).float()
    path = tmp_path / "sub" / "reliability.png"
    calibration.reliability_diagram(conf, correct, path, bins=10, title="test")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert [p.name for p in path.parent.iterdir()] == ["reliability.png"]  # no temporary left behind


