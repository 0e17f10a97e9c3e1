"""Query strategies on hand-made scores: no model, no data."""
import numpy as np
import pytest

from active_learning import query_strategies as qs
from utils import UserError

IDS = [("CVPR2016", i) for i in range(1, 7)]


def pick(name, scores, count, seed=1111, ids=IDS, **params):
    strategy = qs.get_strategy(name)
    return list(strategy.select(scores, qs.identity_keys(ids, seed), count, **params))


@pytest.mark.parametrize("name, quantity, values, count, expected", [
    ("uncali", "confidence", [0.9, 0.1, 0.5, 0.3, 0.8, 0.95], 3, [1, 3, 2]),  # lowest raw confidence first
    ("margin", "margin", [0.2, 0.05, 0.7, 0.01, 0.5, 0.3], 2, [3, 1]),        # smallest margin first
    ("entropy", "entropy", [0.1, 2.0, 0.5, 1.5, 0.0, 0.2], 3, [1, 3, 2]),      # highest entropy first
    ("bald", "mc", [0.3, 0.0, 0.9, 0.1, 0.05, 0.2], 2, [2, 0]),               # highest mutual information first
])
def test_strategy_picks_in_the_order_of_its_quantity(name, quantity, values, count, expected):
    assert pick(name, {quantity: np.array(values)}, count) == expected


def test_cali_least_confident_above_threshold_then_closest_below():
    conf = np.array([0.95, 0.55, 0.2, 0.7, 0.45, 0.05])
    strategy = qs.get_strategy("cali")
    order = list(strategy.rank({"cal_confidence": conf}, qs.identity_keys(IDS, 0), threshold=0.5))
    # above 0.5: 0.55, 0.7, 0.95; then below, closest first: 0.45, 0.2, 0.05
    assert order == [1, 3, 0, 4, 2, 5]
    assert pick("cali", {"cal_confidence": conf}, 2, threshold=0.5) == [1, 3]
    # a higher threshold leaves only 0.95 above it; the rest follow from 0.7 downwards
    assert pick("cali", {"cal_confidence": conf}, 3, threshold=0.8) == [0, 3, 1]


def test_cali_threshold_value_itself_counts_as_above():
    conf = np.array([0.4, 0.5, 0.9])
    assert pick("cali", {"cal_confidence": conf}, 1, ids=IDS[:3], threshold=0.5) == [1]


def test_cali_default_threshold_is_half():
    conf = np.array([0.49, 0.51, 0.99])
    assert pick("cali", {"cal_confidence": conf}, 1, ids=IDS[:3]) == [1]


def test_ties_break_by_seed_deterministically():
    ids = [("a", i) for i in range(1, 41)] + [("b", i) for i in range(1, 41)]
    scores = {"confidence": np.full(80, 0.5)}
    scores["confidence"][17] = 0.1  # a strictly lower score always wins over ties
    first = pick("uncali", scores, 80, seed=1, ids=ids)
    assert first[0] == 17
    assert first == pick("uncali", scores, 80, seed=1, ids=ids)
    assert first != pick("uncali", scores, 80, seed=2, ids=ids)
    assert sorted(first) == list(range(80))


def test_random_depends_on_seed_and_identity_not_on_order():
    ids = [("x/y", i) for i in range(1, 101)]
    picked = {ids[i] for i in pick("random", {}, 10, seed=7, ids=ids)}
    shuffled = [ids[i] for i in np.random.default_rng(0).permutation(100)]
    assert {shuffled[i] for i in pick("random", {}, 10, seed=7, ids=shuffled)} == picked
    assert {ids[i] for i in pick("random", {}, 10, seed=8, ids=ids)} != picked
    assert len(picked) == 10


def test_random_is_roughly_uniform():
    ids = [("pool", i) for i in range(1, 2001)]
    picked = np.array(pick("random", {}, 1000, seed=3, ids=ids))
    # half of the pool drawn: each half of the index range should get about 500 (sd ~ 11)
    assert 440 < np.sum(picked < 1000) < 560


def test_identity_keys_differ_across_relpaths_and_seeds():
    keys = qs.identity_keys([("a", 1), ("b", 1), ("a", 2)], 5)
    assert keys.dtype == np.uint64 and len(set(keys.tolist())) == 3
    assert np.array_equal(keys, qs.identity_keys([("a", 1), ("b", 1), ("a", 2)], 5))
    assert not np.array_equal(keys, qs.identity_keys([("a", 1), ("b", 1), ("a", 2)], 6))
    assert len(qs.identity_keys([], 5)) == 0


def test_unknown_strategy_lists_known_ones():
    with pytest.raises(UserError) as err:
        qs.get_strategy("coreset")
    message = str(err.value)
    assert "--query coreset" in message
    for name in ("random", "uncali", "margin", "entropy", "bald", "cali"):
        assert name in message


def test_needs_name_only_known_quantities():
    assert qs.get_strategy("random").needs == ()
    assert qs.get_strategy("bald").needs == ("mc",)
    for strategy in qs.STRATEGIES.values():
        assert set(strategy.needs) <= set(qs.QUANTITIES)
    assert [s.name for s in qs.STRATEGIES.values() if s.calibrated] == ["cali"]


def test_recorded_score_is_the_strategy_quantity():
    scores = {"margin": np.array([0.25, 0.5])}
    keys = qs.identity_keys(IDS[:2], 0)
    assert qs.get_strategy("margin").score(scores, keys).tolist() == [0.25, 0.5]
    random_scores = qs.get_strategy("random").score({}, keys)
    assert np.all((random_scores >= 0) & (random_scores < 1))


def test_query_count_floor_and_limits():
    assert qs.query_count(1000, ratio=0.01) == 10
    assert qs.query_count(199, ratio=0.01) == 1
    assert qs.query_count(100, ratio=0.29) == 29  # 100 * 0.29 is 28.999999999999996 in floats
    assert qs.query_count(50, num_query=7) == 7
    assert qs.query_count(5, num_query=7) == 5
    with pytest.raises(UserError, match="--ratio 0.01 of a pool of 50 samples picks nothing"):
        qs.query_count(50, ratio=0.01)
    with pytest.raises(UserError, match="--ratio"):
        qs.query_count(50, ratio=1.5)
    with pytest.raises(UserError, match="--num_query"):
        qs.query_count(50, num_query=0)


def test_next_round_selection_halves_base_and_shares_queries_equally():
    names, shares = qs.next_round_selection(["CVPR2016", "NIPS2014"], [0.5, 0.5], [], "random_iter_1")
    assert qs.format_selection(names, shares) == ("CVPR2016-NIPS2014-random_iter_1", "0.25-0.25-0.5")
    names, shares = qs.next_round_selection(names, shares, ["random_iter_1"], "random_iter_2")
    assert qs.format_selection(names, shares) == ("CVPR2016-NIPS2014-random_iter_1-random_iter_2",
                                                  "0.25-0.25-0.25-0.25")
    names, shares = qs.next_round_selection(["MJ", "ST"], [0.75, 0.25], [], "cali_iter_1")
    assert shares == [0.375, 0.125, 0.5]
    names, shares = qs.next_round_selection(["q_iter_1"], [1.0], ["q_iter_1"], "q_iter_2")
    assert (names, shares) == (["q_iter_1", "q_iter_2"], [0.5, 0.5])


def test_next_round_selection_adds_query_sets_not_named_in_select_data():
    # every earlier query set left the pool, so the next training round must include it
    names, shares = qs.next_round_selection(["CVPR2016", "NIPS2014"], [0.5, 0.5],
                                            ["random_iter_1", "random_iter_2"], "random_iter_3")
    assert qs.format_selection(names, shares) == (
        "CVPR2016-NIPS2014-random_iter_1-random_iter_2-random_iter_3", "0.25-0.25-0.166667-0.166667-0.166667")
    names, _ = qs.next_round_selection(["A", "x_iter_2"], [0.5, 0.5], ["x_iter_1", "x_iter_2"], "x_iter_3")
    assert names == ["A", "x_iter_2", "x_iter_1", "x_iter_3"]  # named ones keep their place


def test_per_character_confidence_undoes_the_pull_towards_long_words():
    import torch

    from active_learning import pool_scoring

    # 0.9 per character over 10 characters is a word confidence of 0.9**10 = 0.3487; a 2-character
    # word read at 0.5 has 0.5**(1/2) = 0.7071 per character; an empty reading counts as one character
    confidence = torch.tensor([0.9 ** 10, 0.5, 0.25])
    per_char = pool_scoring.per_character(confidence, ["abcdefghij", "ab", ""])
    assert per_char.tolist() == pytest.approx([0.9, 0.5 ** 0.5, 0.25], abs=1e-6)
    scores = {"confidence": confidence.numpy(), "char_confidence": per_char.numpy()}
    ids = IDS[:3]
    # uncali queries the long, fairly well read word before the short doubtful one; uncali_char the other way round
    assert pick("uncali", scores, 2, ids=ids) == [2, 0]
    assert pick("uncali_char", scores, 2, ids=ids) == [2, 1]
