"""Simulated annotators: the exact share, nesting across ratios, repeatability (across processes
too), and what each noise model does to hand-made words: kinds, positions, charset, length bound."""
import collections
import hashlib
import json
import math
import os
import random
import subprocess
import sys

import pytest

from annotators import annotator_noise
from annotators.annotator_noise import NOISE_MODELS
from utils import UserError

CHARSET = "0123456789abcdefghijklmnopqrstuvwxyz"
PRINTABLE = "".join(chr(c) for c in range(33, 127))  # --sensitive's 94 characters
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = list(NOISE_MODELS)
# Hand-made words: look-alikes (o/0, l/1, s/5, rn, cl, vv, m, d, w, u, n), plain words, one
# character, and one with no look-alike in the lowercase charset (jxy).
WORDS = ["hello", "world", "modern", "clock", "vvhat", "m", "d", "w", "o", "summer", "i1l", "z2z", "street",
         "jxy", "ab", "queue", "6b9g", "amount", "rnrn", "cloud", "five5", "8bit", "oslo", "even"]


def words(count, seed=0):
    rng = random.Random(seed)
    return ["".join(rng.choice(CHARSET) for _ in range(rng.randint(1, 12))) for _ in range(count)]


def samples(count, seed=0, relpath="MJ/train"):
    return [((relpath, index), label) for index, label in enumerate(words(count, seed), start=1)]


def hand_made(copies=20):
    """WORDS, each `copies` times under different identities (so that every model shows its kinds)."""
    return [(("hand", k * len(WORDS) + i), word) for k in range(copies) for i, word in enumerate(WORDS)]


def labels_of(wrong):
    return {identity: c.label for identity, c in wrong.items()}


def one_change(clean, noisy):
    """(position, removed, inserted) of the single differing stretch between two strings."""
    start = 0
    while start < min(len(clean), len(noisy)) and clean[start] == noisy[start]:
        start += 1
    end_clean, end_noisy = len(clean), len(noisy)
    while end_clean > start and end_noisy > start and clean[end_clean - 1] == noisy[end_noisy - 1]:
        end_clean, end_noisy = end_clean - 1, end_noisy - 1
    return start, clean[start:end_clean], noisy[start:end_noisy]


# ---------------------------------------------------------------- which labels: every model


@pytest.mark.parametrize("ratio, n, expected", [(0.2, 100, 20), (0.3, 1000, 300), (0.25, 10, 3), (0.15, 10, 2),
                                                (0.05, 10, 1), (0.04, 10, 0), (1.0, 7, 7), (0.0, 50, 0)])
@pytest.mark.parametrize("model", MODELS)
def test_exactly_the_rounded_share_is_corrupted(model, ratio, n, expected):
    # 0.25 x 10 = 2.5 and 0.15 x 10 = 1.5 round up (half up, not to even); 0.04 x 10 = 0.4 -> 0
    wrong = annotator_noise.noisy_labels(samples(n), ratio, CHARSET, seed=1111, model=model)
    assert len(wrong) == expected


@pytest.mark.parametrize("ratio, n, expected", [(0.29, 50, 15), (0.58, 25, 15), (0.35, 90, 32), (0.7, 45, 32)])
def test_a_half_that_doubles_would_put_just_below_rounds_up(ratio, n, expected):
    # 0.29 x 50 = 14.5 exactly, 0.58 x 25 = 14.5, 0.35 x 90 = 31.5, 0.7 x 45 = 31.5: halves, so up; in
    # doubles the products are 14.499999999999998, 14.499999999999998, 31.499999999999996 and
    # 31.499999999999996, which floor(x + 0.5) took down
    assert annotator_noise.corrupted_count(ratio, n) == expected
    assert len(annotator_noise.noisy_labels(samples(n), ratio, CHARSET, seed=1111)) == expected


def test_the_count_takes_exact_ratios_of_every_kind():
    from decimal import Decimal
    from fractions import Fraction

    assert annotator_noise.corrupted_count(Fraction(29, 100), 50) == 15
    assert annotator_noise.corrupted_count(Decimal("0.29"), 50) == 15
    assert annotator_noise.corrupted_count("0.29", 50) == 15
    assert annotator_noise.corrupted_count(1, 50) == 50
    assert annotator_noise.corrupted_count(1.5, 50) == 50  # never more than there are
    assert annotator_noise.corrupted_count(0.289, 50) == 14  # 14.45: below the half


@pytest.mark.parametrize("model", MODELS)
def test_the_share_is_exact_for_every_seed_unlike_a_per_sample_coin(model):
    # a per-sample coin at 0.2 gave anywhere from 12 to 32 of the same 100 labels across seeds
    counts = {len(annotator_noise.noisy_labels(samples(100), 0.2, CHARSET, seed, model=model)) for seed in range(20)}
    assert counts == {20}


@pytest.mark.parametrize("model", MODELS)
def test_repeatable_seed_dependent_and_nested_across_ratios(model):
    data = samples(300, seed=2)
    at = {ratio: annotator_noise.noisy_labels(data, ratio, CHARSET, 7, max_length=12, model=model)
          for ratio in (0.2, 0.4, 0.6)}
    assert [len(at[r]) for r in (0.2, 0.4, 0.6)] == [60, 120, 180]
    assert at[0.4] == annotator_noise.noisy_labels(list(reversed(data)), 0.4, CHARSET, 7, max_length=12, model=model)
    assert set(at[0.4]) != set(annotator_noise.noisy_labels(data, 0.4, CHARSET, 8, max_length=12, model=model))
    for small, large in ((0.2, 0.4), (0.4, 0.6)):
        assert set(at[small]) <= set(at[large])
        assert all(at[large][k] == v for k, v in at[small].items())  # the same wrong label and kind at both


@pytest.mark.parametrize("model", MODELS)
def test_wrong_labels_stay_in_the_charset_within_the_bound_and_differ(model):
    for charset, bound in ((CHARSET, 6), (PRINTABLE, 6), ("abcdefghijklmnopqrstuvwxyz", 5)):
        # the labels a dataset keeps: inside the charset and the bound
        clean = {i: w for i, w in hand_made() if set(w) <= set(charset) and len(w) <= bound}
        wrong = annotator_noise.noisy_labels(clean.items(), 1.0, charset, 3, max_length=bound, model=model)
        assert len(wrong) == len(clean)  # every hand-made word can change, whatever the model
        for identity, (noisy, kind) in wrong.items():
            assert noisy != clean[identity] and noisy and len(noisy) <= bound
            assert set(noisy) <= set(charset), (model, clean[identity], noisy, kind)


@pytest.mark.parametrize("model", MODELS)
def test_labels_that_cannot_change_are_passed_over_and_the_count_kept(model):
    wrong = annotator_noise.noisy_labels([(("x", 1), ""), (("x", 2), "aaa")], 1.0, "a", 0, model=model)
    # an empty label is never changed; "aaa" in the charset "a" only gains or loses an "a"
    assert set(wrong) <= {("x", 2)} and all(c.kind in ("insertion", "deletion") for c in wrong.values())
    if model in ("substitute", "confusable"):
        assert wrong == {}
    data = [(("x", 1), ""), (("x", 2), "aaa"), (("x", 3), "ab"), (("x", 4), "ba"), (("x", 5), "abab")]
    # with charset "ab" only the empty label cannot change: 0.8 x 5 = 4 are changed, whatever the order
    for seed in range(10):
        wrong = annotator_noise.noisy_labels(data, 0.8, "ab", seed, model=model)
        assert len(wrong) == 4 and ("x", 1) not in wrong


def test_an_unknown_model_names_the_known_ones():
    with pytest.raises(UserError, match="--noise_model typo: unknown; choose one of substitute, confusable, edit"):
        annotator_noise.noisy_labels(samples(5), 0.5, CHARSET, 1, model="typo")


def test_repeatable_across_processes():
    """Another interpreter, with another string-hash salt, makes the same wrong labels."""
    data = hand_made(copies=3)
    mine = {model: {annotator_noise.identity_text(k): list(v) for k, v in
                    annotator_noise.noisy_labels(data, 0.5, CHARSET, 42, max_length=8, model=model).items()}
            for model in MODELS}
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from annotators import annotator_noise as a; "
            "data = json.loads(sys.argv[2]); data = [(tuple(i), w) for i, w in data]; "
            "print(json.dumps({m: {a.identity_text(k): list(v) for k, v in "
            "a.noisy_labels(data, 0.5, sys.argv[3], 42, max_length=8, model=m).items()} for m in a.NOISE_MODELS}))")
    for salt in ("1", "2"):
        result = subprocess.run([sys.executable, "-c", code, REPO_ROOT, json.dumps(data), CHARSET], capture_output=True,
                                text=True, env={**os.environ, "PYTHONHASHSEED": salt}, timeout=60, check=True)
        assert json.loads(result.stdout) == mine


# ---------------------------------------------------------------- substitute


def original_noisy_labels(samples, noise_ratio, charset, seed, max_length=None):
    """The annotator before noise models existed, verbatim in behaviour: {identity: wrong label}.
    Its count rounded in doubles (0.29 x 50 -> 14, now 15); the ratios and sizes compared below
    (0.1, 0.3, 1.0 of 448) are ones where doubles and exact arithmetic agree."""
    target = min(len(samples), int(math.floor(noise_ratio * len(samples) + 0.5)))
    drawn = []
    for identity, label in samples:
        text = "\t".join(str(p) for p in identity)
        digest = hashlib.blake2b(f"{seed}\n{text}".encode("utf-8"), digest_size=16).digest()
        rng = random.Random(int.from_bytes(digest, "little"))
        drawn.append((rng.random(), text, identity, label, rng))
    drawn.sort(key=lambda item: item[:2])
    wrong = {}
    for _, _, identity, label, rng in drawn:
        if len(wrong) == target:
            break
        noisy = label
        if label:
            position = rng.randrange(len(label))
            choices = [c for c in dict.fromkeys(charset) if c != label[position]]
            if choices:
                noisy = label[:position] + rng.choice(choices) + label[position + 1:]
        noisy = noisy if max_length is None else noisy[:max_length]
        if noisy != label:
            wrong[identity] = noisy
    return wrong


@pytest.mark.parametrize("seed", [1111, 5, 99])
def test_substitute_is_the_original_annotator_draw_for_draw(seed):
    data = samples(400, seed=seed) + hand_made(copies=2)
    for ratio in (0.1, 0.3, 1.0):
        wrong = annotator_noise.noisy_labels(data, ratio, CHARSET, seed, max_length=10)  # the default model
        assert labels_of(wrong) == original_noisy_labels(data, ratio, CHARSET, seed, max_length=10)
        assert {c.kind for c in wrong.values()} == {"substitution"}


def test_substitute_replaces_one_character_by_another_of_the_charset():
    clean = dict(samples(500))
    for identity, (noisy, kind) in annotator_noise.noisy_labels(clean.items(), 0.3, CHARSET, seed=5).items():
        label = clean[identity]
        assert len(noisy) == len(label) and kind == "substitution"
        diff = [i for i, (a, b) in enumerate(zip(label, noisy)) if a != b]
        assert len(diff) == 1 and noisy[diff[0]] in CHARSET


# ---------------------------------------------------------------- confusable


def is_confusion(clean, noisy):
    """True when noisy is clean with one glyph or sequence replaced by a look-alike from the table."""
    for position in range(len(clean)):
        for source, targets in annotator_noise.CONFUSIONS.items():
            if clean.startswith(source, position):
                if any(clean[:position] + t + clean[position + len(source):] == noisy for t in targets):
                    return True
    return False


def test_confusable_swaps_look_alikes_from_its_table():
    clean = dict(hand_made())
    wrong = annotator_noise.noisy_labels(clean.items(), 1.0, PRINTABLE, 11, max_length=10, model="confusable")
    kinds = collections.Counter(c.kind for c in wrong.values())
    # with the 94 printable characters every hand-made word has a look-alike site
    assert kinds == {"confusion": len(clean)}
    changes = set()
    for identity, (noisy, _) in wrong.items():
        assert is_confusion(clean[identity], noisy), (clean[identity], noisy)
        _, removed, inserted = one_change(clean[identity], noisy)
        changes.add((removed, inserted))
    # the sequences and the case flips both occur, and a length changes as a misread rn/m does
    assert {("rn", "m"), ("m", "rn")} & changes and {("cl", "d"), ("d", "cl")} & changes
    assert any(a.swapcase() == b and a.isalpha() for a, b in changes)
    assert any(len(a) != len(b) for a, b in changes)


def test_confusable_with_the_lowercase_charset_never_leaves_it_and_falls_back_to_a_substitution():
    clean = dict(hand_made())
    wrong = annotator_noise.noisy_labels(clean.items(), 1.0, CHARSET, 12, max_length=10, model="confusable")
    for identity, (noisy, kind) in wrong.items():
        word = clean[identity]
        assert set(noisy) <= set(CHARSET)
        if word == "jxy":  # j, x, y have no lowercase look-alike: a plain substitution, recorded as one
            assert kind == "substitution" and len(noisy) == 3
        else:
            assert kind == "confusion" and is_confusion(word, noisy), (word, noisy)
    assert {c.label for i, c in wrong.items() if clean[i] == "o"} <= {"0", "a"}  # O, D, Q are not in it
    assert {c.label for i, c in wrong.items() if clean[i] == "w"} == {"vv"}


def test_confusable_respects_the_length_bound():
    # "m" -> "rn" would make "summer" 7 characters: at a bound of 6 only same-length swaps remain
    data = [(("x", i), "summer") for i in range(200)]
    wrong = annotator_noise.noisy_labels(data, 1.0, CHARSET, 4, max_length=6, model="confusable")
    assert all(len(c.label) <= 6 and c.kind == "confusion" for c in wrong.values())
    assert all(len(c.label) == 6 for c in wrong.values())


# ---------------------------------------------------------------- edit


def test_edit_makes_one_insertion_deletion_or_substitution():
    clean = dict(hand_made(copies=40))
    wrong = annotator_noise.noisy_labels(clean.items(), 1.0, CHARSET, 21, max_length=25, model="edit")
    kinds = collections.Counter(c.kind for c in wrong.values())
    assert set(kinds) == {"insertion", "deletion", "substitution"}
    # drawn evenly, except that the 4 one-character words of 24 cannot lose one: their deletions go
    # to the other two kinds (expected shares 5/18, 13/36, 13/36; 960 draws, a std of 1.5 points)
    expected = {"deletion": 5 / 18, "insertion": 13 / 36, "substitution": 13 / 36}
    assert all(abs(kinds[k] / len(wrong) - share) < 0.05 for k, share in expected.items()), kinds
    inserted_at = set()
    for identity, (noisy, kind) in wrong.items():
        word = clean[identity]
        position, removed, added = one_change(word, noisy)
        if kind == "insertion":
            assert len(noisy) == len(word) + 1 and noisy[:position] + noisy[position + 1:] == word
            # where the inserted character went (a repeated letter makes the place ambiguous: leave those)
            if word[position - 1:position] != noisy[position] and word[position:position + 1] != noisy[position]:
                inserted_at.add("start" if position == 0 else "end" if position == len(word) else "inside")
        elif kind == "deletion":
            assert len(noisy) == len(word) - 1 >= 1 and len(removed) == 1 and not added
        else:
            assert len(noisy) == len(word) and len(removed) == len(added) == 1
    assert inserted_at == {"start", "inside", "end"}


def test_edit_at_the_length_bound_never_inserts_and_never_empties_a_label():
    data = [(("x", i), "abcd") for i in range(200)] + [(("y", i), "a") for i in range(200)]
    wrong = annotator_noise.noisy_labels(data, 1.0, CHARSET, 8, max_length=4, model="edit")
    assert len(wrong) == 400
    long_kinds = collections.Counter(c.kind for i, c in wrong.items() if i[0] == "x")
    short_kinds = collections.Counter(c.kind for i, c in wrong.items() if i[0] == "y")
    assert set(long_kinds) == {"deletion", "substitution"}  # an insertion would make 5 characters
    assert set(short_kinds) == {"insertion", "substitution"}  # a deletion would leave nothing
    assert all(1 <= len(c.label) <= 4 for c in wrong.values())


# ---------------------------------------------------------------- mixed


def test_mixed_draws_every_kind_in_the_documented_shares():
    data = hand_made(copies=100)
    clean = dict(data)
    order = [identity for identity, _ in data]
    wrong = annotator_noise.noisy_labels(data, 1.0, CHARSET, 31, max_length=25, model="mixed")
    assert len(wrong) == len(data)
    kinds = collections.Counter(c.kind for c in wrong.values())
    assert set(kinds) == {"confusion", "insertion", "deletion", "substitution", "truncation", "neighbour"}
    n = len(wrong)
    # 10% slips, half truncations half neighbours (one-character words turn some into edits)
    assert 0.03 * n < kinds["truncation"] < 0.07 * n and 0.03 * n < kinds["neighbour"] < 0.07 * n, kinds
    # confusable 40% (a few of its draws fall back to substitutions), edit's share 40%
    assert 0.33 * n < kinds["confusion"] < 0.43 * n, kinds
    assert 0.22 * n < kinds["insertion"] + kinds["deletion"] < 0.32 * n, kinds
    for identity, (noisy, kind) in wrong.items():
        word = clean[identity]
        if kind == "truncation":
            assert word.startswith(noisy) and 1 <= len(noisy) < len(word)
        elif kind == "neighbour":
            at = order.index(identity)
            assert noisy in {clean[order[p]] for p in (at - 1, at + 1) if 0 <= p < len(order)} and noisy != word


def test_mixed_neighbours_come_from_the_dataset_and_fit_the_bound():
    # one long word among short ones: it is never another sample's wrong label at a bound of 5
    data = [(("x", i), "abcdefgh" if i % 2 else "ab") for i in range(300)]
    wrong = annotator_noise.noisy_labels(data, 1.0, CHARSET, 2, max_length=5, model="mixed")
    neighbours = [(i, c.label) for i, c in wrong.items() if c.kind == "neighbour"]
    assert neighbours and all(label == "ab" and i[1] % 2 == 1 for i, label in neighbours)
    assert all(len(c.label) <= 5 for c in wrong.values())
