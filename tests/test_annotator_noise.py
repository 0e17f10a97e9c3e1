"""Simulated annotators: the exact share, nesting across ratios, repeatability, one wrong character."""
import random

import pytest

import annotator_noise

CHARSET = "0123456789abcdefghijklmnopqrstuvwxyz"


def words(count, seed=0):
    rng = random.Random(seed)
    return ["".join(rng.choice(CHARSET) for _ in range(rng.randint(1, 12))) for _ in range(count)]


def samples(count, seed=0, relpath="MJ/train"):
    return [((relpath, index), label) for index, label in enumerate(words(count, seed), start=1)]


@pytest.mark.parametrize("ratio, n, expected", [(0.2, 100, 20), (0.3, 1000, 300), (0.25, 10, 3), (0.15, 10, 2),
                                                (0.05, 10, 1), (0.04, 10, 0), (1.0, 7, 7), (0.0, 50, 0)])
def test_exactly_the_rounded_share_is_corrupted(ratio, n, expected):
    # 0.25 x 10 = 2.5 and 0.15 x 10 = 1.5 round up (half up, not to even); 0.04 x 10 = 0.4 -> 0
    wrong = annotator_noise.noisy_labels(samples(n), ratio, CHARSET, seed=1111)
    assert len(wrong) == expected


def test_the_share_is_exact_for_every_seed_unlike_a_per_sample_coin():
    # a per-sample coin at 0.2 gave anywhere from 12 to 32 of the same 100 labels across seeds
    counts = {len(annotator_noise.noisy_labels(samples(100), 0.2, CHARSET, seed)) for seed in range(40)}
    assert counts == {20}


def test_one_character_is_replaced_by_another_of_the_charset():
    clean = dict(samples(500))
    for identity, noisy in annotator_noise.noisy_labels(clean.items(), 0.3, CHARSET, seed=5).items():
        label = clean[identity]
        assert len(noisy) == len(label)
        diff = [i for i, (a, b) in enumerate(zip(label, noisy)) if a != b]
        assert len(diff) == 1 and noisy[diff[0]] in CHARSET


def test_repeatable_seed_dependent_and_nested_across_ratios():
    data = samples(300, seed=2)
    first = annotator_noise.noisy_labels(data, 0.3, CHARSET, 7)
    assert first == annotator_noise.noisy_labels(list(reversed(data)), 0.3, CHARSET, 7)  # order does not matter
    assert set(first) != set(annotator_noise.noisy_labels(data, 0.3, CHARSET, 8))
    larger = annotator_noise.noisy_labels(data, 0.6, CHARSET, 7)
    assert set(first) <= set(larger)
    assert all(larger[k] == v for k, v in first.items())  # the same wrong label at both ratios


def test_labels_that_cannot_change_are_passed_over_and_the_count_kept():
    assert annotator_noise.noisy_labels([(("x", 1), ""), (("x", 2), "aaa")], 1.0, "a", 0) == {}
    data = [(("x", 1), ""), (("x", 2), "aaa"), (("x", 3), "ab"), (("x", 4), "ba"), (("x", 5), "abab")]
    # with charset "ab" only the empty label cannot change: 0.8 x 5 = 4 are changed, whatever the order
    for seed in range(10):
        wrong = annotator_noise.noisy_labels(data, 0.8, "ab", seed)
        assert len(wrong) == 4 and ("x", 1) not in wrong


def test_wrong_labels_fit_the_maximum_length():
    data = [(("x", i), "abcdef") for i in range(20)]
    for noisy in annotator_noise.noisy_labels(data, 1.0, "abcdefz", 3, max_length=4).values():
        assert len(noisy) <= 4 and noisy != "abcdef"
