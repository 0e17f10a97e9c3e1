"""Batch acquisition on hand-made scores: top-k, the stochastic power/softmax/softrank draws, and
coreset's greedy k-centre on hand-made points."""
import math
import os
import shutil

import numpy as np
import pytest
import torch

import acquisition
import coreset
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


# ------------------------------------------------------------------------------ coreset (k-centre)

# Worked by hand, squared distances: from A (the strategy's first choice) B 100, C 1, D 50, E 82,
# F 36 -> B; nearest centre now: C 1, D min(50, 50) = 50, E min(82, 2) = 2, F min(36, 136) = 36
# -> D; then C 1, E 2, F min(36, 146) = 36 -> F; then E (2), then C (1).
POINTS = np.array([[0, 0], [10, 0], [0, 1], [5, 5], [9, 1], [0, -6]], dtype=np.float16)  # A B C D E F
RANKING = [0, 2, 1, 3, 4, 5]  # A first, then C, B, D, E, F


@pytest.mark.parametrize("chunk", [1, 2, 1024])
def test_k_centre_picks_farthest_first(chunk):
    assert coreset.k_centre(POINTS, RANKING, 6, chunk=chunk).tolist() == [0, 1, 3, 5, 4, 2]
    assert coreset.k_centre(POINTS, RANKING, 3, chunk=chunk).tolist() == [0, 1, 3]
    # among A, C, B only: A, then B (100 against 1), then C
    assert coreset.k_centre(POINTS, [0, 2, 1], 3, chunk=chunk).tolist() == [0, 1, 2]


def test_k_centre_breaks_distance_ties_by_the_ranking():
    # B (3, 4) and C (-3, 4) are both 5 from A: the one the strategy ranks first wins
    points = np.array([[0, 0], [3, 4], [-3, 4]], dtype=np.float16)
    assert coreset.k_centre(points, [0, 2, 1], 2).tolist() == [0, 2]
    assert coreset.k_centre(points, [0, 1, 2], 2).tolist() == [0, 1]
    # duplicates: once the distinct points are taken every distance is 0, and the ranking decides
    twins = np.array([[1, 1], [1, 1], [1, 1], [4, 5]], dtype=np.float16)
    assert coreset.k_centre(twins, [2, 0, 3, 1], 4).tolist() == [2, 3, 0, 1]


def reference_k_centre(points, order, count):
    """The same rule in float64, all distances at once (small data only)."""
    points = points.astype(np.float64)
    position = {row: k for k, row in enumerate(order)}
    candidates = list(order)
    picks = [order[0]]
    nearest = np.full(len(points), np.inf)
    while len(picks) < count:
        nearest = np.minimum(nearest, ((points - points[picks[-1]]) ** 2).sum(1))
        left = [row for row in candidates if row not in picks]
        best = max(nearest[row] for row in left)
        picks.append(min((row for row in left if nearest[row] == best), key=position.get))
    return picks


def test_float16_selection_equals_the_float64_reference():
    rng = np.random.default_rng(5)
    features = torch.from_numpy(rng.normal(0.0, 3.0, (300, 16)))
    embeddings = coreset.to_float16(features)
    assert embeddings.dtype == np.float16 and embeddings.shape == (300, 16)
    order = rng.permutation(300)
    for candidates in (300, 120):
        expected = reference_k_centre(embeddings, order[:candidates], 40)
        assert coreset.k_centre(embeddings, order[:candidates], 40, chunk=64).tolist() == expected


def test_to_float16_keeps_embeddings_finite():
    got = coreset.to_float16(torch.tensor([[float("nan"), 1e6, -1e6, 0.5]]))
    assert got.tolist() == [[0.0, 65504.0, -65504.0, 0.5]]


def test_coreset_acquisition_takes_the_top_candidates_of_the_strategy():
    # uncali ranks by confidence: samples 5, 4, 3, ... first. The embeddings put 5 and 4 together
    # and 0 far away: among all, k-centre goes from 5 to 0; among the top 3 (5, 4, 3), to 3.
    scores = {"confidence": np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1]),
              "embedding": np.array([[100, 0], [50, 0], [40, 0], [20, 0], [1, 0], [0, 0]], dtype=np.float16)}
    keys = query_strategies.identity_keys([("p", i) for i in range(6)], 0)

    def pick(count, candidates=None):
        return acquisition.select("coreset", 1.0, UNCALI, scores, keys, count, 1, "r", candidates=candidates).tolist()

    assert pick(2) == [5, 0]
    assert pick(2, candidates=3) == [5, 3]
    assert pick(3, candidates=3) == [5, 3, 4]
    with pytest.raises(UserError, match=r"^--candidates 2 is fewer than the 3 samples to query; give at least 3"):
        pick(3, candidates=2)


def test_candidates_errors_name_the_flag():
    with pytest.raises(UserError, match="^--candidates 10: only --acquisition coreset picks among candidates"):
        acquisition.check("power", 1.0, UNCALI, 10)
    with pytest.raises(UserError, match="^--candidates 0: give at least 1"):
        acquisition.check("coreset", 1.0, UNCALI, 0)
    acquisition.check("coreset", 1.0, query_strategies.get_strategy("cali"), 10)


def test_embeddings_fill_one_preallocated_array():
    table_rows = coreset.RowStore(capacity=10)
    first, second = np.ones((4, 3), np.float16), 2 * np.ones((5, 3), np.float16)
    table_rows.add(first)
    buffer = table_rows.data
    table_rows.add(second)
    assert table_rows.data is buffer and buffer.shape == (10, 3)  # allocated once, for the capacity
    rows = table_rows.array()
    assert np.shares_memory(rows, buffer) and rows.tolist() == first.tolist() + second.tolist()
    table_rows.add(first[:2])  # past the capacity: doubles, keeping the rows
    assert table_rows.data.shape == (20, 3) and table_rows.array().tolist()[-3:] == [[2, 2, 2], [1, 1, 1], [1, 1, 1]]


@pytest.mark.parametrize("sequence", ["BiLSTM", "None"])
def test_the_embedding_is_the_mean_sequence_feature_of_the_scoring_pass(sequence):
    from test_sampling import CTC_ARCH
    from types import SimpleNamespace
    from model import Model

    torch.manual_seed(0)
    arch = dict(CTC_ARCH, SequenceModeling=sequence, num_class=37)
    model = Model(SimpleNamespace(**arch)).eval()
    images = torch.rand(3, 1, 32, 100) * 2 - 1
    with torch.no_grad():
        sequence_out = model.SequenceModeling(
            model.FeatureExtraction(model.Transformation(images)).mean(dim=2).transpose(1, 2))
        with coreset.capture_embeddings(model) as found:
            model(images, None, is_train=False)
        model(images, None, is_train=False)  # outside the block: nothing more captured
    assert len(found) == 1 and found[0].dtype == np.float16
    assert found[0].shape == (3, arch["hidden_size"] if sequence == "BiLSTM" else arch["output_channel"])
    assert np.array_equal(found[0], sequence_out.mean(dim=1).half().numpy())


def test_data_sampling_coreset_round(work, models, tmp_path_factory):
    from test_sampling import ctc_args, read_set, run_main

    other = tmp_path_factory.mktemp("coreset_copy")
    shutil.copytree(work / "train_data_lmdb", other / "train_data_lmdb")
    shutil.copytree(work / "test_data_lmdb", other / "test_data_lmdb")
    picks = []
    for folder in (work, other):
        summary = run_main(ctc_args(folder, models.ctc, "--query", "uncali", "--num_query", "7", "--out_name", "div",
                                    "--acquisition", "coreset", "--candidates", "30"))
        rows, meta = read_set(os.path.join(str(folder / "train_data_lmdb"), "div"))
        assert len(rows) == summary["num_picked"] == 7
        assert len({origin for _, _, origin in rows}) == 7
        assert (meta["acquisition"], meta["acquisition_beta"], meta["candidates"]) == ("coreset", None, 30)
        picks.append([origin for _, _, origin in rows])
    assert picks[0] == picks[1]


def test_data_sampling_rejects_bad_candidates(work, models, capsys):
    from test_sampling import ctc_args, run_main

    for extra, message in ((["--acquisition", "coreset", "--candidates", "3"],
                            "error: --candidates 3 is fewer than the 6 samples to query"),
                           (["--candidates", "30"], "error: --candidates 30: only --acquisition coreset")):
        with pytest.raises(SystemExit) as info:
            run_main(ctc_args(work, models.ctc, "--query", "uncali", "--num_query", "6", *extra))
        assert info.value.code == 2
        assert message in capsys.readouterr().err
    assert not os.path.exists(work / "train_data_lmdb" / "uncali_iter_1")
