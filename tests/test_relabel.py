"""data_sampling.py --relabel_ratio (active_learning/relabel.py) and relabel sets in the data layer: the budget split,
which labels are re-annotated (the lowest label qualities, each sample once), the relabel set's
labels over the earlier ones in training (later sets winning, no batch share), and the simulated
annotator's fresh draw on them."""
import os
import types

import numpy as np
import pytest

from annotators import annotator_noise
import data_sampling
import dataset
from data_layer import lmdb_format
from data_layer import lmdb_writing
from data_layer import set_records
import find_label_errors
import options
from active_learning import relabel
import utils
from conftest import build_opt
from test_label_errors import CHARSET, CTC_ARCH, SEED, WORDS, one_thread, png, render, tiny  # noqa: F401 (fixtures)

# base holds the 24 numbers; at --total_data_usage_ratio 0.5 its labelled part is samples 1-12. The query
# set q_iter_1 holds copies of base 9-16, so training reads base 1-8 and q_iter_1 1-8 (16 labels) and the
# pool is base 17-24. 25% noise on all of them corrupts round(0.25 x 8) = 2 labels of each: 4 wrong labels.
USAGE = "0.5"
NOISE = ["--noise_ratio", "0.25", "--noise_scope", "all", "--manualSeed", str(SEED)]
WRONG = 4


def write_base(root):
    images = [png(render(word)) for word in WORDS]
    lmdb_writing.write_lmdb(os.path.join(root, "base"), ((image, word, None) for image, word in zip(images, WORDS)))
    meta = {"name": "q_iter_1", "strategy": "random", "total_data_usage_ratio": float(USAGE)}
    lmdb_writing.write_lmdb(os.path.join(root, "q_iter_1"),
                            ((images[i - 1], WORDS[i - 1], ("base", i)) for i in range(9, 17)), meta=meta)
    return images


def sampling_args(root, model, *extra):
    return ["--saved_model", model, "--train_data", root, "--select_data", "base", "--batch_ratio", "1",
            "--total_data_usage_ratio", USAGE, "--workers", "0", "--batch_size", "8", "--device", "cpu",
            "--no_progress", "--query", "random", *extra]


def run_sampling(argv):
    """data_sampling.py in-process, as its __main__ block runs it (UserError -> SystemExit 2)."""
    opt = options.parse_with_given(data_sampling.get_args_parser(), argv)
    return utils.exit_on_user_error(data_sampling.main)(opt)


def training_view(root, select_data, batch_ratio, noise=0.25):
    """The Batch_Balanced_Dataset train.py --mode al builds: {identity: label} (a query set's sample
    by its origin) and the dataset itself."""
    opt = build_opt(**CTC_ARCH, train_data=root, select_data=select_data, batch_ratio=batch_ratio,
                    total_data_usage_ratio=USAGE, noise_ratio=noise, noise_scope="all", manualSeed=SEED, batch_size=8)
    balanced = dataset.Batch_Balanced_Dataset(opt)
    labels = {}
    for data in balanced.datasets.values():
        for leaf in data.leaves:
            with lmdb_format.shared_env(leaf.root).begin(write=False) as txn:
                for position, index in enumerate(leaf.indices.tolist()):
                    origin = lmdb_format.read_origin(txn, index) if leaf.is_query else None
                    labels[origin or (leaf.relpath, index)] = leaf[position][1]
    return labels, balanced


def relabel_set(path):
    """[(origin, stored label)] of a relabel set, in index order, and its meta."""
    with lmdb_format.shared_env(path).begin(write=False) as txn:
        count = lmdb_format.read_num_samples(txn, path)
        rows = [(lmdb_format.read_origin(txn, i), txn.get(lmdb_format.label_key(i)).decode()) for i in range(1, count + 1)]
        assert txn.get(lmdb_format.QUERY_META_KEY) is None  # not a query set: adds no sample
    return rows, set_records.read_relabel_meta(path)


@pytest.fixture(scope="module")
def round2(tiny, tmp_path_factory):  # noqa: F811 (the imported fixture)
    """One round with --relabel_ratio 0.5 of a budget of 8 under 25% noise, by the model overfit to
    the clean labels: (root, summary, the training view before the round)."""
    root = str(tmp_path_factory.mktemp("relabel") / "data")
    write_base(root)
    before, _ = training_view(root, "base-q_iter_1", "0.5-0.5")
    summary = run_sampling(sampling_args(root, tiny.ctc, "--num_query", "8", "--relabel_ratio", "0.5",
                                         "--out_name", "q_iter_2", *NOISE))
    return root, summary, before


def test_the_budget_splits_into_rounded_relabels_and_new_queries():
    assert relabel.split_budget(8, 0.5, 100) == (4, 4)
    assert relabel.split_budget(10, 0.25, 100) == (3, 7)  # 2.5 rounds up
    assert relabel.split_budget(10, 0.24, 100) == (2, 8)
    assert relabel.split_budget(8, 1.0, 3) == (3, 5)  # no more than there are labelled samples
    assert relabel.split_budget(8, 0.0, 100) == (0, 8)
    assert relabel.split_budget(8, 1.0, 100) == (8, 0)
    # halves in exact arithmetic (doubles put 0.29 x 50 and 0.35 x 90 just below 14.5 and 31.5)
    assert relabel.split_budget(50, 0.29, 100) == (15, 35)
    assert relabel.split_budget(90, 0.35, 100) == (32, 58)


def test_a_sample_is_chosen_once_lowest_quality_first():
    columns = {"relpath": ["q", "base", "base", "base"], "index": np.array([1, 9, 3, 4]),
               "log_quality": np.array([-5.0, -4.0, -3.0, -0.5])}
    identities = [("base", 9), ("base", 9), ("base", 3), ("base", 4)]  # q:1 is a copy of base 9
    assert relabel.choose(columns, 2, identities) == [0, 2]
    assert relabel.choose(columns, 5, identities) == [0, 2, 3]


def test_the_round_re_annotates_the_lowest_label_qualities(round2, tiny, tmp_path):  # noqa: F811
    root, summary, before = round2
    rows, meta = relabel_set(os.path.join(root, "q_iter_2_relabel"))
    origins = [origin for origin, _ in rows]
    wrong = {identity for identity, label in before.items() if label != WORDS[identity[1] - 1]}
    assert len(wrong) == WRONG
    # 4 relabels (round(0.5 x 8)), each sample once: exactly the 4 wrong labels, which the overfit model
    # believes least; 4 new samples from the pool (base 17-24)
    assert len(origins) == len(set(origins)) == 4
    assert set(origins) == wrong
    query_origins = set_records.read_query_origins(os.path.join(root, "q_iter_2"))
    assert len(query_origins) == 4 and all(rel == "base" and 17 <= i <= 24 for rel, i in query_origins)
    # the same order as find_label_errors.py's ranking of the same labels (the shared score)
    opt = options.parse_with_given(find_label_errors.get_args_parser(),
                                   ["--saved_model", tiny.ctc, "--train_data", root, "--select_data", "base-q_iter_1",
                                    "--total_data_usage_ratio", USAGE, "--out", str(tmp_path / "errors"),
                                    "--workers", "0", "--device", "cpu", "--no_progress", *NOISE])
    find_label_errors.main(opt)
    ranked = [line.split(",") for line in (tmp_path / "errors" / "label_errors.csv").read_text().splitlines()[1:5]]
    first = [tuple(r[3].split(":")) if r[3] else (r[1], r[2]) for r in ranked]
    assert sorted((rel, int(i)) for rel, i in first) == sorted(origins)
    # the relabel set stores the clean labels (the oracle's); its meta marks the round and the query set
    assert all(label == WORDS[index - 1] for (_, index), label in rows)
    assert meta["round"] == 2 and meta["query_set"] == "q_iter_2" and meta["num_relabelled"] == 4
    part = summary["relabel"]
    assert part["num_relabelled"] == 4 and part["labelled"] == 16 and summary["num_picked"] == 4
    assert summary["next_select_data"] == "base-q_iter_1-q_iter_2-q_iter_2_relabel"
    assert summary["next_batch_ratio"] == "0.5-0.25-0.25-0"


def test_training_applies_the_relabel_set_over_the_earlier_labels(round2):
    root, summary, before = round2
    rows, _ = relabel_set(os.path.join(root, "q_iter_2_relabel"))
    after, balanced = training_view(root, summary["next_select_data"], summary["next_batch_ratio"])
    # no sample and no batch share added: base 1-8, q_iter_1 1-8 and the 4 new samples, in two streams
    assert balanced.names == ["base", "q_iter_1", "q_iter_2"] and len(after) == 20
    assert sum(balanced.batch_sizes.values()) == 8
    # the re-annotation is a fresh draw of the 25% annotator on the 4 relabelled labels: exactly
    # round(0.25 x 4) = 1 of them is wrong again, with the relabel stream of round 2
    samples = [(origin, label) for origin, label in rows]
    redrawn = annotator_noise.noisy_labels(samples, 0.25, CHARSET, set_records.relabel_noise_seed(SEED, 2), 25)
    assert len(redrawn) == 1
    for origin, clean in rows:
        assert after[origin] == (redrawn[origin].label if origin in redrawn else clean)
    changed = sum(after[origin] != before[origin] for origin, _ in rows)
    assert summary["relabel"]["changed"] == changed
    assert summary["relabel"]["noise"]["wrong_before"] == 4 and summary["relabel"]["noise"]["wrong_after"] == 1
    # every other label is the one trained on before
    assert all(after[i] == label for i, label in before.items() if i not in dict(rows))
    # noise_log.csv's truth: the relabelled sample's clean label and the label now trained on
    records = {(r["origin_relpath"], r["origin_index"]) if r["origin_relpath"] else (r["relpath"], r["index"]): r
               for r in balanced.noise_records()}
    assert all(r["noisy_label"] == after[i] and r["clean_label"] == WORDS[i[1] - 1] for i, r in records.items())
    assert len(records) == 2 + 2 - 4 + 1 + 1  # the 4 old errors fixed or redrawn, 1 redrawn, 1 of q_iter_2's 4


def test_the_fresh_draw_is_independent_of_the_first_annotation():
    samples = [(("base", i), "word") for i in range(1, 401)]
    first = annotator_noise.noisy_labels(samples, 0.5, CHARSET, SEED, 25)
    again = annotator_noise.noisy_labels(samples, 0.5, CHARSET, set_records.relabel_noise_seed(SEED, 2), 25)
    repeat = annotator_noise.noisy_labels(samples, 0.5, CHARSET, set_records.relabel_noise_seed(SEED, 2), 25)
    other_round = annotator_noise.noisy_labels(samples, 0.5, CHARSET, set_records.relabel_noise_seed(SEED, 3), 25)
    assert again == repeat  # repeatable
    assert len(first) == len(again) == 200
    # independent draws of half the samples each overlap in about 100 (binomial sd ~ 5), not 200 or 0
    for draw in (again, other_round):
        overlap = len(set(first) & set(draw))
        assert 80 < overlap < 120, overlap
    assert 80 < len(set(again) & set(other_round)) < 120


def hand_relabel(root, name, round_number, labels, policy=None):
    """A relabel set written by hand: {identity: label} with the images of base; its meta names
    `policy` when given (none: as a set written before --relabel_policy)."""
    with lmdb_format.shared_env(os.path.join(root, "base")).begin(write=False) as txn:
        samples = [(txn.get(lmdb_format.image_key(i)), label, (rel, i)) for (rel, i), label in labels.items()]
    meta = {"name": name, "round": round_number, **({"policy": policy} if policy else {})}
    lmdb_writing.write_lmdb(os.path.join(root, name), iter(samples), meta=meta, meta_key=lmdb_format.RELABEL_META_KEY)


def test_later_relabel_sets_win_and_take_the_share_zero(tmp_path):
    root = str(tmp_path / "data")
    write_base(root)
    hand_relabel(root, "late", 3, {("base", 1): "111", ("base", 10): "222"})
    hand_relabel(root, "early", 2, {("base", 1): "999", ("base", 2): "888"})
    labels, balanced = training_view(root, "base-q_iter_1-early-late", "0.5-0.5-0-0", noise=0.0)
    assert labels[("base", 1)] == "111" and labels[("base", 2)] == "888"
    assert labels[("base", 10)] == "222"  # a query set's sample, by its origin
    assert len(labels) == 16 and balanced.names == ["base", "q_iter_1"]
    for select, ratio, message in (("base-late", "0.5-0.5", "give it the share 0"),
                                   ("base-q_iter_1", "1-0", "only a relabel set may have")):
        with pytest.raises(utils.UserError, match=message):
            training_view(root, select, ratio, noise=0.0)


@pytest.mark.parametrize("extra, message", [
    (["--relabel_ratio", "1.5"], "--relabel_ratio 1.5: give a share of the budget in [0, 1]"),
    (["--relabel_ratio", "-0.1"], "--relabel_ratio -0.1: give a share of the budget in [0, 1]"),
    (["--relabel_ratio", "nan"], "--relabel_ratio nan: give a share of the budget in [0, 1]"),
    (["--relabel_ratio", "0.5", "--relabel_policy", "vote"], "--relabel_policy vote: unknown; choose one of replace, "
                                                              "agree"),
    (["--select_data", "base-q_iter_1", "--batch_ratio", "1-0"],
     "--batch_ratio: q_iter_1 has the share 0, which only a relabel set may have; give it a positive share"),
])
def test_bad_input_is_one_error_line(tmp_path, capsys, extra, message):
    root = str(tmp_path / "data")
    write_base(root)
    with pytest.raises(SystemExit) as stopped:
        run_sampling(sampling_args(root, str(tmp_path / "none.pth"), "--dry_run", "--Transformation", "None",
                                   "--FeatureExtraction", "VGG", "--SequenceModeling", "None", "--Prediction", "CTC",
                                   *extra))
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]


def test_a_relabel_only_round_leaves_its_empty_query_set_out(round2, tiny):  # noqa: F811
    root, summary, _ = round2
    trained, _ = training_view(root, summary["next_select_data"], summary["next_batch_ratio"])
    # wrong now: the redrawn re-annotation and one of q_iter_2's 4 new labels
    wrong = {identity for identity, label in trained.items() if label != WORDS[identity[1] - 1]}
    assert len(wrong) == 2
    summary3 = run_sampling(sampling_args(root, tiny.ctc, "--num_query", "2", "--relabel_ratio", "1",
                                          "--out_name", "q_iter_3", *NOISE))
    assert summary3["num_picked"] == 0 and summary3["relabel"]["num_relabelled"] == 2
    assert summary3["relabel"]["labelled"] == 20
    rows, _ = relabel_set(os.path.join(root, "q_iter_3_relabel"))
    assert {origin for origin, _ in rows} == wrong
    # q_iter_3 holds no sample: the next round leaves it out and keeps every relabel set, share 0
    assert set_records.read_query_origins(os.path.join(root, "q_iter_3")) == set()
    assert summary3["next_select_data"] == "base-q_iter_1-q_iter_2-q_iter_2_relabel-q_iter_3_relabel"
    assert summary3["next_batch_ratio"] == "0.5-0.25-0.25-0-0"


# --relabel_policy agree: an answer equal to the label trained on keeps it, a different one drops the sample


def test_agree_keeps_equal_answers_drops_different_ones_and_a_set_without_policy_replaces(tmp_path):
    root = str(tmp_path / "data")
    write_base(root)
    # round 2 (agree): base 1 and 11 answered as stored (WORDS[0], WORDS[10]); base 2 and 10 (q_iter_1's
    # second sample) answered otherwise. Round 3 (no policy in its meta: replace) relabels base 3 and
    # the dropped base 2, which stays out
    hand_relabel(root, "agree2", 2, {("base", 1): "021", ("base", 2): "zzz", ("base", 10): "999",
                                     ("base", 11): "5277"}, policy="agree")
    hand_relabel(root, "late3", 3, {("base", 3): "333", ("base", 2): "444"})
    opt = build_opt(**CTC_ARCH, train_data=root, total_data_usage_ratio=USAGE, manualSeed=SEED)
    relabels = dataset.read_relabels(root, opt, ["late3", "agree2"])
    assert [(e.policy, e.clean_label) for e in relabels[("base", 2)]] == [("agree", "zzz"), ("replace", "444")]
    labels, balanced = training_view(root, "base-q_iter_1-agree2-late3", "0.5-0.5-0-0", noise=0.0)
    # base 1-8 and q_iter_1 (base 9-16) less base 2 and base 10
    assert len(labels) == 14 and ("base", 2) not in labels and ("base", 10) not in labels
    assert labels[("base", 1)] == "021" and labels[("base", 11)] == "5277" and labels[("base", 3)] == "333"
    assert all(label == WORDS[i - 1] for (_, i), label in labels.items() if i != 3)
    assert balanced.dropped == {"base": 1, "q_iter_1": 1} and balanced.num_dropped == 2
    assert balanced.log_text.count("dropped 1 whose re-annotation disagreed") == 2
    assert "agree2 (agree), late3 (replace)" in balanced.log_text
    # what relabel selection and find_label_errors.py read: the same 14 (q_iter_1 2 is base 10)
    data, _ = dataset.labelled_dataset(root, opt, ["base", "q_iter_1", "agree2", "late3"])
    assert sorted(identity for _, _, identity in data) == \
        [("base", i) for i in (1, 3, 4, 5, 6, 7, 8)] + [("q_iter_1", i) for i in (1, 3, 4, 5, 6, 7, 8)]
    # a query set all of whose samples are dropped is skipped with a warning, its share unused
    hand_relabel(root, "agree5", 5, {("base", i): "7" for i in range(9, 17)}, policy="agree")
    labels, balanced = training_view(root, "base-q_iter_1-agree5", "0.5-0.5-0", noise=0.0)
    assert balanced.names == ["base"] and len(labels) == 8 and balanced.dropped == {"base": 0, "q_iter_1": 8}
    assert any("q_iter_1: every labelled sample of it was dropped" in w for w in balanced.warnings)
    hand_relabel(root, "vote4", 4, {("base", 4): "415"}, policy="vote")
    with pytest.raises(utils.UserError, match="vote4: its relabel-meta names the policy 'vote'"):
        training_view(root, "base-q_iter_1-vote4", "0.5-0.5-0", noise=0.0)


def test_agree_compares_with_the_noisy_label_trained_on(tmp_path):
    root = str(tmp_path / "data")
    write_base(root)
    before, balanced = training_view(root, "base-q_iter_1", "0.5-0.5")
    wrong = sorted(i for i, label in before.items() if label != WORDS[i[1] - 1])
    assert len(wrong) == WRONG and len(balanced.noise_records()) == WRONG
    # one-sample sets: the 25% re-annotator errs on round(0.25 x 1) = 0 of each, so the answers are as
    # planted: the first wrong label repeated (kept, still wrong), the clean label of the second (dropped)
    repeated, corrected = wrong[0], wrong[1]
    hand_relabel(root, "agree2", 2, {repeated: before[repeated]}, policy="agree")
    hand_relabel(root, "agree3", 3, {corrected: WORDS[corrected[1] - 1]}, policy="agree")
    after, balanced = training_view(root, "base-q_iter_1-agree2-agree3", "0.5-0.5-0-0")
    assert after == {i: label for i, label in before.items() if i != corrected}
    # noise_log.csv: the kept error with its clean label, the dropped one gone
    records = {(r["origin_relpath"], r["origin_index"]) if r["origin_relpath"] else (r["relpath"], r["index"]): r
               for r in balanced.noise_records()}
    assert set(records) == set(wrong) - {corrected}
    assert records[repeated]["clean_label"] == WORDS[repeated[1] - 1]
    assert records[repeated]["noisy_label"] == before[repeated]


def test_an_agree_round_drops_every_label_whose_two_answers_differ(tiny, tmp_path):  # noqa: F811
    root = str(tmp_path / "data")
    write_base(root)
    before, _ = training_view(root, "base-q_iter_1", "0.5-0.5")
    wrong = {identity for identity, label in before.items() if label != WORDS[identity[1] - 1]}
    summary = run_sampling(sampling_args(root, tiny.ctc, "--num_query", "8", "--relabel_ratio", "0.5",
                                         "--relabel_policy", "agree", "--out_name", "q_iter_2", *NOISE))
    rows, meta = relabel_set(os.path.join(root, "q_iter_2_relabel"))
    assert meta["policy"] == "agree" and {origin for origin, _ in rows} == wrong  # as with replace
    # the answers: 3 clean labels and round(0.25 x 4) = 1 fresh error, each unlike the wrong label trained on
    redrawn = annotator_noise.noisy_labels(rows, 0.25, CHARSET, set_records.relabel_noise_seed(SEED, 2), 25)
    answers = {origin: redrawn[origin].label if origin in redrawn else clean for origin, clean in rows}
    assert len(redrawn) == 1 and all(answers[origin] != before[origin] for origin in wrong)
    part = summary["relabel"]
    assert part["policy"] == "agree" and part["dropped"] == 4 and part["changed"] == 0
    assert {k: part["noise"][k] for k in ("wrong_before", "wrong_after", "fixed", "made_wrong", "dropped_wrong",
                                          "dropped_right")} == {"wrong_before": 4, "wrong_after": 0, "fixed": 0,
                                                                "made_wrong": 0, "dropped_wrong": 4,
                                                                "dropped_right": 0}
    after, balanced = training_view(root, summary["next_select_data"], summary["next_batch_ratio"])
    # the 16 labelled samples less the 4 dropped, plus the 4 new ones; every kept label as before
    assert len(after) == 16 and not wrong & set(after) and balanced.num_dropped == 4
    assert balanced.dropped == {"base": 2, "q_iter_1": 2, "q_iter_2": 0}
    assert all(after[i] == label for i, label in before.items() if i not in wrong)
    # base: 24 less the 6 kept and the 2 dropped = 16 unlabelled (the 4 of base 9-12 in q_iter_1 included)
    assert "num total samples of base: 6 labelled (total_data_usage_ratio 0.5), 16 unlabelled" in balanced.log_text
    # noise_log.csv: only the one wrong label of q_iter_2's 4 new ones
    assert [r["relpath"] for r in balanced.noise_records()] == ["q_iter_2"]
    # the next round: the dropped are no labelled samples to judge, and the pool stays base 17-24 less
    # q_iter_2's 4 (a dropped sample never returns to it)
    opt = build_opt(**CTC_ARCH, train_data=root, total_data_usage_ratio=USAGE, manualSeed=SEED)
    labelled, _ = dataset.labelled_dataset(root, opt, summary["next_select_data"].split("-"), noise_ratio=0.25,
                                           noise_scope="all")
    assert len(labelled) == 16
    result = run_sampling(sampling_args(root, tiny.ctc, "--dry_run", "--num_query", "2", "--out_name", "q_iter_3",
                                        *NOISE))
    assert result["pool_size"] == 4


def test_re_annotating_without_the_noise_training_used_warns(tmp_path, capsys):
    root = str(tmp_path / "data")
    write_base(root)
    model = tmp_path / "noisy" / "best_accuracy.pth"
    model.parent.mkdir()
    model.write_bytes(b"")  # a dry run loads no model; the options beside it are what counts
    options.save_opt_yaml(types.SimpleNamespace(**CTC_ARCH, noise_ratio=0.3, noise_model="edit", noise_scope="all"),
                          str(model.parent / "opt.yaml"))
    for extra, warned in ((["--relabel_ratio", "0.5"], True),
                          (["--relabel_ratio", "0.5", "--noise_ratio", "0.3", "--noise_model", "edit"], False),
                          ([], False)):
        run_sampling(sampling_args(root, str(model), "--dry_run", "--num_query", "4", *extra))
        warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
        assert warnings == ([
            "warning: --relabel_ratio 0.5 without --noise_ratio, but the model's training used annotator noise "
            "(--noise_ratio 0.3 --noise_model edit --noise_scope all, in the options beside --saved_model): the "
            "labels are judged as clean and the re-annotations simulated as perfect; pass the training's "
            "--noise_ratio 0.3 --noise_model edit --noise_scope all"] if warned else []), extra
