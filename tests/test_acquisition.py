"""Batch acquisition on hand-made scores: top-k, the stochastic power/softmax/softrank draws, and
coreset's greedy k-centre on hand-made points."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from active_learning import acquisition
from active_learning import coreset
import data_sampling
import dataset
from measurement import evaluation
import options
from active_learning import query_strategies
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


# Points on a line (second coordinate 0): pool A 0, B 2, C 5, D 9, the strategy ranking D first; one
# labelled sample L at 10. top: D (the strategy's first), then the farthest from D: A (81), then C
# (min(25, 16) = 16) over B (min(4, 49) = 4) -> D, A, C. labelled: squared distances to L are A 100,
# B 64, C 25, D 1 -> A; then B min(64, 4) = 4, C min(25, 25) = 25, D min(1, 81) = 1 -> C; then B
# (4) over D (1) -> A, C, B: D, one unit from a labelled sample, comes last instead of first.
LINE = np.array([[0, 0], [2, 0], [5, 0], [9, 0]], dtype=np.float16)  # A B C D
LINE_RANKING = [3, 2, 1, 0]  # D, C, B, A
LABELLED = np.array([[10, 0]], dtype=np.float16)


@pytest.mark.parametrize("chunk", [1, 2, 1024])
def test_k_centre_from_the_labelled_centres(chunk):
    assert coreset.k_centre(LINE, LINE_RANKING, 3, chunk=chunk).tolist() == [3, 0, 2]
    assert coreset.k_centre(LINE, LINE_RANKING, 3, chunk=chunk, labelled=LABELLED).tolist() == [0, 2, 1]
    assert coreset.k_centre(LINE, LINE_RANKING, 4, chunk=chunk, labelled=LABELLED).tolist() == [0, 2, 1, 3]
    # a second labelled sample at 1 (A 1, B 1, C 16, D 64 from it): nearest labelled A 1, B 1, C 16,
    # D 1 -> C; then A min(1, 25) = 1, B min(1, 9) = 1, D min(1, 16) = 1: a tie, by the ranking D, B, A
    two = np.array([[10, 0], [1, 0]], dtype=np.float16)
    assert coreset.k_centre(LINE, LINE_RANKING, 4, chunk=chunk, labelled=two).tolist() == [2, 3, 1, 0]
    # no labelled sample: as top
    empty = np.zeros((0, 0), dtype=np.float16)
    assert coreset.k_centre(LINE, LINE_RANKING, 3, chunk=chunk, labelled=empty).tolist() == [3, 0, 2]


def test_a_candidate_on_a_labelled_sample_comes_last_and_widths_must_agree():
    # C coincides with a labelled sample at 5 (distance 0), and the strategy ranks it first: from 5,
    # A 25, B 9, C 0, D 16 -> A; then B min(9, 4) = 4, D min(16, 81) = 16 -> D; then B; C last
    assert coreset.k_centre(LINE, [2, 0, 1, 3], 4, labelled=np.array([[5, 0]], np.float16)).tolist() == [0, 3, 1, 2]
    with pytest.raises(ValueError, match="width 3 against the pool's 2"):
        coreset.k_centre(LINE, LINE_RANKING, 2, labelled=np.zeros((1, 3), np.float16))


def reference_k_centre_from(points, order, count, labelled):
    """The same rule in float64 with starting centres, all distances at once (small data only)."""
    points, labelled = points.astype(np.float64), labelled.astype(np.float64)
    position = {row: k for k, row in enumerate(order)}
    nearest = ((points[:, None, :] - labelled[None, :, :]) ** 2).sum(2).min(1)
    picks = []
    while len(picks) < count:
        left = [row for row in order if row not in picks]
        best = max(nearest[row] for row in left)
        picks.append(min((row for row in left if nearest[row] == best), key=position.get))
        nearest = np.minimum(nearest, ((points - points[picks[-1]]) ** 2).sum(1))
    return picks


def test_labelled_centres_in_blocks_equal_the_float64_reference():
    rng = np.random.default_rng(7)
    embeddings = coreset.to_float16(torch.from_numpy(rng.normal(0.0, 3.0, (300, 16))))
    labelled = coreset.to_float16(torch.from_numpy(rng.normal(0.0, 3.0, (150, 16))))
    order = rng.permutation(300)
    for candidates in (300, 120):
        expected = reference_k_centre_from(embeddings, order[:candidates], 40, labelled)
        assert coreset.k_centre(embeddings, order[:candidates], 40, chunk=64, labelled=labelled).tolist() == expected


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


def test_coreset_acquisition_starts_from_the_given_centres():
    scores = {"confidence": np.array([0.9, 0.8, 0.7, 0.1]), "embedding": LINE}  # uncali: D, C, B, A
    keys = query_strategies.identity_keys([("p", i) for i in range(4)], 0)
    pick = acquisition.select("coreset", 1.0, UNCALI, scores, keys, 3, 1, "r", centres=LABELLED).tolist()
    assert pick == [0, 2, 1]
    assert acquisition.select("coreset", 1.0, UNCALI, scores, keys, 3, 1, "r").tolist() == [3, 0, 2]


def test_coreset_init_errors_name_the_flag():
    with pytest.raises(UserError, match="^--coreset_init top: only --acquisition coreset starts from centres"):
        acquisition.check("topk", 1.0, UNCALI, None, "top")
    with pytest.raises(UserError, match="^--coreset_init middle: unknown; choose one of labelled, top$"):
        acquisition.check("coreset", 1.0, UNCALI, None, "middle")
    acquisition.check("coreset", 1.0, UNCALI, None, "labelled")


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


def test_data_sampling_coreset_starts_from_the_labelled_set(work, models, tiny_data, monkeypatch, capsys):
    from test_sampling import USAGE, ctc_args, read_set, run_main

    given = []
    k_centre = coreset.k_centre

    def spy(embeddings, order, count, chunk=coreset.CHUNK, labelled=None):
        given.append((embeddings, labelled))
        return k_centre(embeddings, order, count, chunk, labelled)

    monkeypatch.setattr(coreset, "k_centre", spy)
    train = work / "train_data_lmdb"
    summary = run_main(ctc_args(work, models.ctc, "--query", "uncali", "--num_query", "5", "--out_name", "lab",
                                "--acquisition", "coreset"))
    # the labelled samples the next round trains on: the first int(120 x 0.7) = 84 of each base set,
    # less those the charset and length filter drop (7 and 4 of them: the log says labelled 77 and 80)
    labelled = 2 * int(tiny_data.counts["CVPR2016"] * float(USAGE)) - 7 - 4
    pool, centres = given.pop()
    assert centres.dtype == np.float16 and centres.shape == (labelled, pool.shape[1]) and np.isfinite(centres).all()
    assert f"coreset: embedding the {labelled} labelled samples" in capsys.readouterr().out
    _, meta = read_set(str(train / "lab"))
    assert (meta["coreset_init"], meta["coreset_labelled"]) == ("labelled", labelled) and summary["num_picked"] == 5
    # the labelled images embedded as the pool's are: their rows match a scoring pass over them
    opt = options.parse_with_given(data_sampling.get_args_parser(), ctc_args(work, models.ctc))
    options.fill_from_saved(opt, options.given_option_names(opt, data_sampling.get_args_parser()))
    options.resolve_options(opt)
    model, _ = evaluation.load_model(opt, torch.device("cpu"))
    data, _ = dataset.labelled_dataset(str(train), opt, ["CVPR2016", "NIPS2014"])
    with torch.no_grad(), coreset.capture_embeddings(model) as found:
        for images, _, _ in evaluation.eval_loader(data, opt, "cpu"):
            model(images, None, is_train=False)
    assert np.allclose(np.concatenate(found).astype(np.float32), centres.astype(np.float32), rtol=1e-2, atol=1e-2)

    run_main(ctc_args(work, models.ctc, "--query", "uncali", "--num_query", "5", "--out_name", "top",
                      "--acquisition", "coreset", "--coreset_init", "top"))
    assert given.pop()[1] is None
    _, meta = read_set(str(train / "top"))
    assert (meta["coreset_init"], meta["coreset_labelled"]) == ("top", None)
    run_main(ctc_args(work, models.ctc, "--query", "uncali", "--num_query", "5", "--out_name", "plain"))
    _, meta = read_set(str(train / "plain"))
    assert (meta["coreset_init"], meta["coreset_labelled"]) == (None, None)
    with pytest.raises(SystemExit) as info:
        run_main(ctc_args(work, models.ctc, "--query", "uncali", "--num_query", "5", "--coreset_init", "top"))
    assert info.value.code == 2 and "error: --coreset_init top: only --acquisition coreset" in capsys.readouterr().err


def test_a_loop_whose_coreset_rounds_predate_the_choice_continues_from_the_top_pick(work, models, capsys):
    import lmdb

    from test_sampling import ctc_args, read_set, run_main

    train = work / "train_data_lmdb"
    args = ["--query", "uncali", "--num_query", "4", "--acquisition", "coreset"]
    run_main(ctc_args(work, models.ctc, *args, "--out_name", "coreset_iter_1", "--coreset_init", "top"))
    # make it a query set of the version before --coreset_init: its query-meta without the key
    with lmdb.open(str(train / "coreset_iter_1")) as env, env.begin(write=True) as txn:
        meta = json.loads(txn.get(b"query-meta"))
        del meta["coreset_init"], meta["coreset_labelled"]
        txn.put(b"query-meta", json.dumps(meta).encode())
    capsys.readouterr()
    run_main(ctc_args(work, models.ctc, *args, "--out_name", "coreset_iter_2"))
    assert "coreset: coreset_iter_1 was picked from the strategy's first choice" in capsys.readouterr().out
    assert read_set(str(train / "coreset_iter_2"))[1]["coreset_init"] == "top"
    run_main(ctc_args(work, models.ctc, *args, "--out_name", "coreset_iter_3", "--coreset_init", "labelled"))
    assert read_set(str(train / "coreset_iter_3"))[1]["coreset_init"] == "labelled"


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
