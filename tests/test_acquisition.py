"""Batch acquisition on hand-made scores: top-k, and the stochastic power/softmax/softrank draws."""
import math
import os

import numpy as np
import pytest

import acquisition
import query_strategies
from test_sampling import models, one_thread, work  # noqa: F401  (fixtures)
from utils import UserError

UNCALI = query_strategies.get_strategy("uncali")


def pool(n, seed=0):
    identities = [("pool", i) for i in range(1, n + 1)]
    keys = query_strategies.identity_keys(identities, seed)
    confidence = np.linspace(0.01, 0.99, n)  # sample i is less informative than sample i - 1
    return {"confidence": confidence}, keys


def draw(name, beta, scores, keys, count, seed=1, round_name="uncali_iter_1", strategy=UNCALI):
    return acquisition.select(name, beta, strategy, scores, keys, count, seed, round_name, threshold=0.5)


def test_topk_is_the_strategy_ranking():
    scores, keys = pool(50)
    assert list(draw("topk", 1.0, scores, keys, 7)) == list(range(7))


@pytest.mark.parametrize("name", ["power", "softmax", "softrank"])
def test_a_huge_beta_is_topk(name):
    scores, keys = pool(50)
    assert sorted(draw(name, 1e6, scores, keys, 7)) == list(range(7))


@pytest.mark.parametrize("name", ["power", "softmax", "softrank"])
def test_draws_are_repeatable_without_repeats_and_change_with_the_round(name):
    scores, keys = pool(200)
    first = draw(name, 2.0, scores, keys, 40)
    assert len(set(first.tolist())) == 40
    assert list(first) == list(draw(name, 2.0, scores, keys, 40))
    assert set(first) != set(draw(name, 2.0, scores, keys, 40, round_name="uncali_iter_2"))
    # the scoring order does not matter: permute the pool and map back
    order = np.random.default_rng(3).permutation(200)
    permuted = draw(name, 2.0, {"confidence": scores["confidence"][order]}, keys[order], 40)
    assert sorted(order[permuted].tolist()) == sorted(first.tolist())


def test_power_never_picks_a_zero_score_while_positive_ones_remain():
    scores, keys = pool(30)
    scores["confidence"][[3, 8, 20]] = 1.0  # informativeness 1 - 1 = 0
    for seed in range(20):
        picked = set(draw("power", 0.5, scores, keys, 27, seed=seed).tolist())
        assert picked.isdisjoint({3, 8, 20})
    assert {3, 8, 20} <= set(draw("power", 0.5, scores, keys, 30).tolist())  # only when nothing else is left


def test_the_draw_follows_the_weights():
    # two samples, weights 3 : 1 under power with beta 1 (informativeness 0.75 and 0.25): over many
    # rounds the first comes first about 3 times in 4
    scores = {"confidence": np.array([0.25, 0.75])}
    keys = query_strategies.identity_keys([("p", 1), ("p", 2)], 0)
    firsts = sum(draw("power", 1.0, scores, keys, 1, round_name=f"r{k}")[0] == 0 for k in range(4000))
    assert abs(firsts / 4000 - 0.75) < 4 * math.sqrt(0.75 * 0.25 / 4000)


def test_beta_zero_is_uniform():
    scores, keys = pool(10)
    counts = np.zeros(10)
    for k in range(3000):
        counts[draw("softrank", 0.0, scores, keys, 1, round_name=f"r{k}")[0]] += 1
    assert counts.min() > 300 - 4 * math.sqrt(300 * 0.9) and counts.max() < 300 + 4 * math.sqrt(300 * 0.9)


def test_errors_name_the_flag():
    with pytest.raises(UserError, match="--acquisition sample: unknown; choose one of topk, power"):
        acquisition.check("sample", 1.0, UNCALI)
    with pytest.raises(UserError, match="--acquisition_beta"):
        acquisition.check("power", float("nan"), UNCALI)
    with pytest.raises(UserError, match="--acquisition power weights by a score, which --query cali"):
        acquisition.check("power", 1.0, query_strategies.get_strategy("cali"))
    acquisition.check("softrank", 1.0, query_strategies.get_strategy("cali"))  # a ranking is enough


def test_data_sampling_draws_the_batch_and_records_how(work, models):
    from test_sampling import ctc_args, read_set, run_main

    train = str(work / "train_data_lmdb")
    run_main(ctc_args(work, models.ctc, "--query", "uncali", "--num_query", "6", "--out_name", "top"))
    run_main(ctc_args(work, models.ctc, "--query", "uncali", "--num_query", "6", "--out_name", "drawn",
                      "--acquisition", "softmax", "--acquisition_beta", "0.5"))
    top_rows, top_meta = read_set(os.path.join(train, "top"))
    drawn_rows, drawn_meta = read_set(os.path.join(train, "drawn"))
    assert (top_meta["acquisition"], top_meta["acquisition_beta"]) == ("topk", None)
    assert (drawn_meta["acquisition"], drawn_meta["acquisition_beta"]) == ("softmax", 0.5)
    # the second round never repeats the first one's samples
    assert not {o for _, _, o in top_rows} & {o for _, _, o in drawn_rows}
    assert len(drawn_rows) == 6
