"""find_label_errors.py and annotators/label_quality.py: the label-quality formula of both heads on hand-made
logits, the detection metrics against hand counts, and the script end to end on a tiny set where a
model was overfit to the clean labels and a known subset is then corrupted."""
import csv
import io
import json
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from PIL import Image, ImageDraw, ImageFont

import dataset
from data_layer import lmdb_writing
from measurement import evaluation
import find_label_errors
from annotators import label_quality
import options
import utils
from conftest import REPO_ROOT, build_opt
from measurement.evaluation import load_model
from model import Model, initialize_weights, save_weights

CHARSET = "0123456789abcdefghijklmnopqrstuvwxyz"
# 24 different numbers, drawn one digit per 16 pixels (4 CTC frames): every digit appears about ten
# times, so a tiny model learns to read them all in a few hundred steps (24 words of 26 letters, each
# letter seen once or twice, often left it stuck short of reading every one)
WORDS = ("021", "129", "322", "364", "415", "562", "930", "0613", "0865", "4814", "5277", "5383", "5858", "7195",
         "7368", "8952", "9070", "9909", "20405", "29313", "36426", "45807", "51454", "72200")
CTC_ARCH = {"Transformation": "None", "FeatureExtraction": "VGG", "SequenceModeling": "None", "Prediction": "CTC",
            "num_fiducial": 20, "input_channel": 1, "output_channel": 32, "hidden_size": 16, "imgH": 32,
            "imgW": 100, "rgb": False, "PAD": False, "character": CHARSET, "sensitive": False,
            "character_file": "", "batch_max_length": 25}
ATTN_ARCH = dict(CTC_ARCH, Prediction="Attn", output_channel=16)
SEED = 4242
NOISE = ["--noise_ratio", "0.25", "--noise_scope", "all", "--manualSeed", str(SEED)]
# base holds the 24 numbers; at --total_data_usage_ratio 0.5 its labelled part is samples 1-12. The query
# set q_iter_1 holds copies of base samples 9-24 (as data_sampling.py writes them, with origins), so
# training reads base 1-8 and q_iter_1 1-16: 24 images, each once. 25% noise on all of them corrupts
# round(0.25 x 8) = 2 base labels and round(0.25 x 16) = 4 query-set labels.
SELECT = "base-q_iter_1"
USAGE = "0.5"
CORRUPTED = 6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: one thread is the fastest here
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# the label quality of both heads, by hand


class BigramAttn(nn.Module):
    """A stand-in Attn model that ignores the image: the distribution of each step depends on the
    previous token alone, `log_probs[previous]` (C x C). Greedy decoding feeds back its argmax;
    teacher forcing feeds the given text (which must be the converter's text[:, :-1])."""

    def __init__(self, log_probs, steps):
        super().__init__()
        self.log_probs = log_probs
        self.steps = steps
        self.calls = []

    def forward(self, images, text, is_train=True):
        self.calls.append((is_train, text.clone()))
        if is_train:
            assert text.shape[1] == self.steps and (text[:, 0] == 0).all()
            return self.log_probs[text]
        previous = torch.zeros(images.size(0), dtype=torch.long)
        steps = []
        for _ in range(self.steps):
            logits = self.log_probs[previous]
            steps.append(logits)
            previous = logits.argmax(-1)
        return torch.stack(steps, 1)


def test_attn_quality_is_the_teacher_forced_label_against_the_greedy_reading():
    # classes: [GO] 0, [s] 1, a 2, b 3, c 4; batch_max_length 3 -> 4 steps
    converter = utils.AttnLabelConverter("abc")
    p = torch.full((5, 5), 1e-9)
    p[0] = torch.tensor([0.0, 0.1, 0.6, 0.3, 0.0])  # after [GO]: a 0.6, b 0.3, [s] 0.1
    p[2] = torch.tensor([0.0, 0.2, 0.1, 0.5, 0.2])  # after a: b 0.5, [s] 0.2, a 0.1, c 0.2
    p[3] = torch.tensor([0.0, 0.7, 0.2, 0.1, 0.0])  # after b: [s] 0.7, a 0.2, b 0.1
    p[4] = torch.tensor([0.0, 0.4, 0.3, 0.3, 0.0])  # after c: [s] 0.4
    p[1] = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])
    model = BigramAttn((p / p.sum(1, keepdim=True)).log(), steps=4)
    opt = types.SimpleNamespace(batch_max_length=3, Prediction="Attn", amp=False)
    images = torch.zeros(4, 1, 32, 100)
    labels = ["ab", "ac", "b", "aba"]
    readings, values = label_quality.score_batch(model, images, labels, converter, opt, "cpu")

    # greedy: [GO] -> a 0.6 -> b 0.5 -> [s] 0.7, so the reading is "ab" with probability 0.21
    assert readings == ["ab"] * 4
    reading = 0.6 * 0.5 * 0.7
    by_hand = {"ab": 0.6 * 0.5 * 0.7,  # the reading itself: quality 1
               "ac": 0.6 * 0.2 * 0.4,  # a after [GO], c after a, [s] after c
               "b": 0.3 * 0.7,  # b after [GO], [s] after b
               "aba": 0.6 * 0.5 * 0.2 * 0.2}  # a, b, a after b, [s] after a
    np.testing.assert_allclose(np.exp(values["reading_log_prob"]), [reading] * 4, rtol=1e-6)
    np.testing.assert_allclose(np.exp(values["label_log_prob"]), [by_hand[label] for label in labels], rtol=1e-6)
    np.testing.assert_allclose(np.exp(values["log_quality"]), [by_hand[label] / reading for label in labels],
                               rtol=1e-6)
    assert values["log_quality"][0] == pytest.approx(0.0, abs=1e-6)
    # one greedy pass, then the teacher-forced one fed [GO] + label (the converter's text[:, :-1])
    (greedy, _), (forced, text) = model.calls
    assert not greedy and forced
    assert text.tolist()[3] == [0, 2, 3, 2] and text.tolist()[2] == [0, 3, 1, 0]


def test_attn_reading_without_end_token_counts_every_step():
    converter = utils.AttnLabelConverter("ab")
    logits = torch.log(torch.tensor([[[0.1, 0.1, 0.8, 0.0 + 1e-12], [0.1, 0.2, 0.1, 0.6]]]))
    # argmax a, then b; no [s]: both steps count
    expected = math.log(0.8) + math.log(0.6)
    assert label_quality.attn_reading_log_prob(logits, converter).item() == pytest.approx(expected, rel=1e-5)
    with_end = torch.log(torch.tensor([[[0.1, 0.1, 0.8, 1e-12], [0.1, 0.7, 0.1, 0.1], [0.5, 0.1, 0.2, 0.2]]]))
    # a, then [s]: the step after [s] does not count
    expected = math.log(0.8) + math.log(0.7)
    assert label_quality.attn_reading_log_prob(with_end, converter).item() == pytest.approx(expected, rel=1e-5)


def test_ctc_quality_sums_the_alignments_of_the_label_and_of_the_reading():
    # classes: blank 0, a 1, b 2; two frames
    converter = utils.CTCLabelConverter("ab")
    probs = torch.tensor([[[0.3, 0.6, 0.1], [0.5, 0.3, 0.2]]]).repeat(4, 1, 1)
    logits = probs.log()
    # greedy path: a, blank -> "a"; P("a") = aa + a- + -a = 0.6*0.3 + 0.6*0.5 + 0.3*0.3
    p_a = 0.6 * 0.3 + 0.6 * 0.5 + 0.3 * 0.3
    p_by_hand = {"a": p_a, "b": 0.1 * 0.2 + 0.1 * 0.5 + 0.3 * 0.2, "ab": 0.6 * 0.2, "ba": 0.1 * 0.3}
    labels = ["a", "b", "ab", "ba"]
    text, lengths = converter.encode(labels, batch_max_length=2)
    label_lp = label_quality.ctc_log_prob(logits, text, lengths)
    reading_lp = label_quality.ctc_reading_log_prob(logits)
    np.testing.assert_allclose(label_lp.exp().numpy(), [p_by_hand[x] for x in labels], rtol=1e-5)
    np.testing.assert_allclose(reading_lp.exp().numpy(), [p_a] * 4, rtol=1e-5)
    quality = label_quality.log_quality(label_lp, reading_lp).exp().numpy()
    np.testing.assert_allclose(quality, [p_by_hand[x] / p_a for x in labels], rtol=1e-5)

    # "aa" needs three frames (a, blank, a): impossible in two, so its quality is 0 (log -inf), not
    # the 1 that zero_infinity's loss of 0 would give
    text, lengths = converter.encode(["aa"], batch_max_length=2)
    impossible = label_quality.ctc_log_prob(logits[:1], text, lengths)
    assert torch.isneginf(impossible).all()
    assert torch.isneginf(label_quality.log_quality(impossible, reading_lp[:1])).all()


def test_ctc_quality_can_exceed_one_when_the_label_beats_the_best_path():
    # best path: blank, blank -> "" (0.36); but "a" sums three paths: 0.4*0.4 + 0.4*0.6 + 0.6*0.4 = 0.64
    converter = utils.CTCLabelConverter("a")
    logits = torch.tensor([[[0.6, 0.4], [0.6, 0.4]]]).log()
    text, lengths = converter.encode(["a"], batch_max_length=2)
    label_lp = label_quality.ctc_log_prob(logits, text, lengths)
    reading_lp = label_quality.ctc_reading_log_prob(logits)
    assert reading_lp.exp().item() == pytest.approx(0.36, rel=1e-5)
    assert label_quality.log_quality(label_lp, reading_lp).exp().item() == pytest.approx(0.64 / 0.36, rel=1e-5)


def test_ctc_reading_probability_is_decode_predictions_word_confidence():
    torch.manual_seed(0)
    logits = torch.randn(5, 12, 4) * 3
    converter = utils.CTCLabelConverter("abc")
    _, word_conf, _ = utils.decode_predictions(logits, converter)
    np.testing.assert_allclose(label_quality.ctc_reading_log_prob(logits).exp().numpy(), word_conf.numpy(),
                               rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# detection metrics, by hand


def test_precision_recall_and_roc_area_by_hand():
    scores = [0.1, 0.4, 0.35, 0.8, 0.4, 0.05]
    truth = [True, False, True, False, True, False]
    # ascending: 0.05 (right), 0.1 (wrong), 0.35 (wrong), 0.4 (right, position 1), 0.4 (wrong), 0.8 (right)
    assert label_quality.precision_at_k(scores, truth, 3) == pytest.approx(2 / 3)
    assert label_quality.recall_at_k(scores, truth, 3) == pytest.approx(2 / 3)
    assert label_quality.precision_at_k(scores, truth, 4) == pytest.approx(2 / 4)  # the tie keeps input order
    assert label_quality.precision_at_k(scores, truth, 1) == 0.0
    assert label_quality.recall_at_k(scores, truth, 6) == 1.0
    # pairs (wrong, right) where the wrong one scores lower, ties half:
    # 0.1: beats 0.4 and 0.8 -> 2; 0.35: 0.4, 0.8 -> 2; 0.4: ties 0.4 (0.5), beats 0.8 -> 1.5; of 3 x 3
    assert label_quality.roc_auc(scores, truth) == pytest.approx(5.5 / 9)
    metrics = label_quality.detection_metrics(scores, truth)
    assert metrics == {"scored": 6, "corrupted": 3, "k": 3, "precision_at_k": pytest.approx(2 / 3),
                       "recall_at_k": pytest.approx(2 / 3), "roc_auc": pytest.approx(5.5 / 9)}
    below = label_quality.threshold_metrics(scores, truth, 0.38)
    assert below == {"flagged": 3, "precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3)}


def test_metric_edge_cases():
    assert label_quality.roc_auc([0.1, 0.2], [False, False]) is None
    assert label_quality.roc_auc([0.1, 0.2], [True, True]) is None
    assert label_quality.recall_at_k([0.1, 0.2], [False, False], 1) is None
    assert label_quality.precision_at_k([0.1, 0.2], [True, False], 0) is None
    # perfect, reversed, all tied
    assert label_quality.roc_auc([-5, -4, 0, 0], [True, True, False, False]) == 1.0
    assert label_quality.roc_auc([0, 0, -5, -4], [True, True, False, False]) == 0.0
    assert label_quality.roc_auc([1, 1, 1, 1], [True, False, True, False]) == 0.5
    # -inf (an impossible label) is the most suspicious; NaN counts as -inf
    assert label_quality.roc_auc([-math.inf, math.nan, -1.0, 0.0], [True, True, False, False]) == 1.0
    with pytest.raises(ValueError):
        label_quality.roc_auc([0.1, 0.2], [True])


def test_roc_area_matches_the_pair_count_on_random_ties():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 5, size=40).astype(float)
    truth = rng.random(40) < 0.3
    pos, neg = scores[truth], scores[~truth]
    pairs = sum(1.0 if a < b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    assert label_quality.roc_auc(scores, truth) == pytest.approx(pairs / (len(pos) * len(neg)))


def test_worst_first_breaks_ties_by_relpath_then_index():
    columns = {"relpath": ["b", "a", "a", "c"], "index": np.array([1, 2, 1, 9]),
               "log_quality": np.array([0.0, 0.0, 0.0, -1.0])}
    assert label_quality.worst_first(columns).tolist() == [3, 2, 1, 0]


# ---------------------------------------------------------------------------------------------
# the script end to end


def render(word):
    try:
        font = ImageFont.load_default(size=22)
    except TypeError:  # Pillow without FreeType: the small bitmap font
        font = ImageFont.load_default()
    image = Image.new("L", (100, 32), 255)
    draw = ImageDraw.Draw(image)
    for position, char in enumerate(word):
        draw.text((4 + 16 * position, 3), char, fill=0, font=font)
    return image


def png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def train_to_clean_labels(root, arch, steps=400, seeds=(SEED, SEED + 1, SEED + 2)):
    """A tiny model overfit to the clean labels of every base image (Adam, the whole set as one
    batch) until it reads every image right with confidence above 0.9; a start that stalls is
    replaced by one from the next seed. Returns the model in eval mode."""
    opt = build_opt(**arch, train_data=root, select_data="base", batch_ratio="1")
    data, _ = dataset.hierarchical_dataset(root, opt, ["base"])
    collate = dataset.AlignCollate(opt.imgH, opt.imgW, opt.PAD, channels=1)
    images, labels, _ = collate([data[i] for i in range(len(data))])
    converter = utils.make_converter(arch["Prediction"], CHARSET)
    opt.num_class = len(converter.character)
    text, length = converter.encode(labels, batch_max_length=opt.batch_max_length)
    for seed in seeds:
        torch.manual_seed(seed)
        model = Model(opt)
        initialize_weights(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for step in range(1, steps + 1):
            model.train()
            log_probs = model(images, text).log_softmax(2)
            loss = F.ctc_loss(log_probs.transpose(0, 1), text, torch.full((len(labels),), log_probs.size(1)),
                              length, zero_infinity=True)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 25 == 0:
                model.eval()
                with torch.no_grad():
                    readings, confidence, _ = utils.decode_predictions(model(images, text), converter)
                if readings == list(labels) and confidence.min() > 0.9:
                    return model
    pytest.fail(f"the tiny model did not learn to read the {len(labels)} training images")


def save_model(model, folder, arch):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "best_accuracy.pth")
    save_weights(model, path)
    with open(os.path.join(folder, "opt.yaml"), "w") as f:
        yaml.safe_dump(dict(arch, exp_name="tiny"), f)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """root/base (the 24 numbers), root/q_iter_1 (copies of base 9-24 with origins and query-meta), a CTC
    model overfit to the clean labels and a randomly initialised Attn model."""
    root = tmp_path_factory.mktemp("label_errors")
    images = [png(render(word)) for word in WORDS]
    lmdb_writing.write_lmdb(str(root / "data" / "base"), ((image, word, None) for image, word in zip(images, WORDS)))
    meta = {"name": "q_iter_1", "strategy": "random", "total_data_usage_ratio": float(USAGE)}
    lmdb_writing.write_lmdb(str(root / "data" / "q_iter_1"),
                            ((images[i - 1], WORDS[i - 1], ("base", i)) for i in range(9, 25)), meta=meta)
    data = str(root / "data")
    ctc = save_model(train_to_clean_labels(data, CTC_ARCH), str(root / "ctc"), CTC_ARCH)
    torch.manual_seed(SEED)
    attn = Model(types.SimpleNamespace(**ATTN_ARCH, num_class=len(CHARSET) + 2))
    initialize_weights(attn)
    return types.SimpleNamespace(root=root, data=data, ctc=ctc, attn=save_model(attn, str(root / "attn"), ATTN_ARCH))


def args(tiny, model, out, *extra):
    return ["--saved_model", model, "--train_data", tiny.data, "--select_data", SELECT,
            "--total_data_usage_ratio", USAGE, "--out", str(out), "--workers", "0", "--batch_size", "10",
            "--device", "cpu", "--no_progress", *extra]


def run_main(argv):
    """The script in-process, as its __main__ block runs it (UserError -> SystemExit 2)."""
    opt = options.parse_with_given(find_label_errors.get_args_parser(), argv)
    return utils.exit_on_user_error(find_label_errors.main)(opt)


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def training_view(tiny, noise_model="substitute"):
    """{identity: label} of every sample train.py --mode al reads with the same noise flags, and the
    identities it corrupted (from the dataset layer itself, not from the script)."""
    opt = build_opt(**CTC_ARCH, train_data=tiny.data, select_data=SELECT, batch_ratio="0.5-0.5",
                    total_data_usage_ratio=USAGE, noise_ratio=0.25, noise_scope="all", manualSeed=SEED, batch_size=8,
                    noise_model=noise_model)
    balanced = dataset.Batch_Balanced_Dataset(opt)
    labels, wrong = {}, set()
    for data in balanced.datasets.values():
        for i in range(len(data)):
            _, label, identity = data[i]
            labels[identity] = label
        for leaf in data.leaves:
            wrong |= {(leaf.relpath, index) for index in leaf.noisy_labels}
    return labels, wrong


def test_corrupted_labels_rank_first_and_the_metrics_are_right(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    summary = run_main(args(tiny, tiny.ctc, out, *NOISE))
    printed = capsys.readouterr().out
    rows = read_csv(out / "label_errors.csv")
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))

    # the samples training reads, with the labels it reads (noisy ones included), each once
    labels, wrong = training_view(tiny)
    identities = [(row["relpath"], int(row["index"])) for row in rows]
    assert len(rows) == 24 and sorted(identities) == sorted(labels)
    assert sorted(identities) == sorted([("base", i) for i in range(1, 9)] + [("q_iter_1", i) for i in range(1, 17)])
    assert all(row["given_label"] == labels[identity] for row, identity in zip(rows, identities))
    assert [row["rank"] for row in rows] == [str(i) for i in range(1, 25)]
    for row, (relpath, index) in zip(rows, identities):
        assert row["origin"] == ("" if relpath == "base" else f"base:{index + 8}")
        assert row["clean_label"] == WORDS[(index if relpath == "base" else index + 8) - 1]
        assert row["corrupted"] == str(int(row["given_label"] != row["clean_label"]))

    # the known corrupted subset ranks first; the model, overfit to the clean labels, reads them all
    corrupted = {identity for row, identity in zip(rows, identities) if row["corrupted"] == "1"}
    assert corrupted == wrong and len(wrong) == CORRUPTED
    assert set(identities[:CORRUPTED]) == wrong
    assert all(row["reading"] == row["clean_label"] for row in rows)
    assert all(float(row["label_quality"]) < 0.01 for row in rows[:CORRUPTED])
    assert all(float(row["label_quality"]) > 0.5 for row in rows[CORRUPTED:])

    # precision and recall at k and the ROC area, by hand from the CSV and the truth
    scores = [float(row["log_quality"]) for row in rows]
    truth = [row["corrupted"] == "1" for row in rows]
    k = sum(truth)
    hits = sum(truth[:k])  # the CSV is in rank order
    pairs = [(a, b) for a, t in zip(scores, truth) if t for b, u in zip(scores, truth) if not u]
    auc = sum(1.0 if a < b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
    noise = summary["noise"]
    assert (noise["k"], noise["corrupted"], noise["scored"]) == (k, CORRUPTED, 24)
    assert noise["precision_at_k"] == pytest.approx(hits / k, abs=1e-12)
    assert noise["recall_at_k"] == pytest.approx(hits / sum(truth), abs=1e-12)
    assert noise["roc_auc"] == pytest.approx(auc, abs=1e-12)
    assert (noise["precision_at_k"], noise["roc_auc"]) == (1.0, 1.0)
    assert (noise["ratio"], noise["scope"], noise["model"], noise["seed"]) == (0.25, "all", "substitute", SEED)

    # quality columns and the threshold count, by hand
    for row in rows:
        assert float(row["label_quality"]) == pytest.approx(math.exp(float(row["log_quality"])), rel=1e-12)
        assert 0.0 < float(row["reading_confidence"]) <= 1.0
        assert row["issue"] == str(int(float(row["label_quality"]) < 0.1))
    under = sum(float(row["label_quality"]) < 0.1 for row in rows)
    assert summary["under_threshold"] == under == CORRUPTED and summary["issues"] == under
    assert noise["under_threshold"] == {"flagged": under, "precision": 1.0, "recall": 1.0}
    assert (summary["labelled"], summary["scored"], summary["unreadable"]) == (24, 24, 0)
    assert summary["reading_equals_label"] == 24 - CORRUPTED
    assert f"{CORRUPTED} of 24 labels have quality below 0.1" in printed
    assert "precision@k 1.0000, recall@k 1.0000 (k = 6), ROC AUC 1.0000" in printed
    top = printed.split("lowest label qualities")[1]
    assert all(f"{relpath}:{index}" in top for relpath, index in identities[:CORRUPTED])


@pytest.mark.skipif("edit" not in find_label_errors.noise_model_names(), reason="annotator_noise has no edit model")
def test_edit_noise_is_rebuilt_as_training_applies_it(tiny, tmp_path):
    """--noise_model reaches the data layer: insertions and deletions too are found first."""
    out = tmp_path / "out"
    summary = run_main(args(tiny, tiny.ctc, out, *NOISE, "--noise_model", "edit"))
    rows = read_csv(out / "label_errors.csv")
    labels, wrong = training_view(tiny, "edit")
    identities = [(row["relpath"], int(row["index"])) for row in rows]
    assert all(row["given_label"] == labels[identity] for row, identity in zip(rows, identities))
    assert {i for row, i in zip(rows, identities) if row["corrupted"] == "1"} == wrong and len(wrong) == CORRUPTED
    assert set(identities[:CORRUPTED]) == wrong
    # not the substitute model's errors: some wrong labels gained or lost a character
    assert any(len(row["given_label"]) != len(row["clean_label"]) for row in rows[:CORRUPTED])
    assert summary["noise"]["model"] == "edit" and summary["noise"]["roc_auc"] == 1.0


def test_ctc_quality_matches_a_direct_ctc_loss(tiny, tmp_path):
    """The script's log quality is -CTC(label) + CTC(reading), the reading encoded as a label."""
    out = tmp_path / "out"
    run_main(args(tiny, tiny.ctc, out, *NOISE))
    rows = read_csv(out / "label_errors.csv")
    opt = build_opt(**CTC_ARCH, train_data=tiny.data, select_data=SELECT, batch_ratio="1-1",
                    total_data_usage_ratio=USAGE, noise_ratio=0.25, noise_scope="all", manualSeed=SEED,
                    saved_model=tiny.ctc)
    model, converter = load_model(opt, "cpu")
    data, _ = find_label_errors.labelled_samples(opt)
    items = {identity: (image, label) for image, label, identity in (data[i] for i in range(len(data)))}
    order = [(row["relpath"], int(row["index"])) for row in rows]
    images, _, _ = dataset.AlignCollate(32, 100, False, channels=1)([(items[i][0], "", i) for i in order])
    with torch.no_grad():
        log_probs = model(images).float().log_softmax(2).transpose(0, 1)

    def nll(texts):
        text, length = converter.encode(texts, batch_max_length=25)
        return F.ctc_loss(log_probs, text, torch.full((len(texts),), log_probs.size(0)), length, reduction="none")

    expected = (nll([row["reading"] for row in rows]) - nll([items[i][1] for i in order])).double().numpy()
    np.testing.assert_allclose([float(row["log_quality"]) for row in rows], expected, rtol=1e-4, atol=1e-4)


def test_sharded_scoring_ranks_as_one_process(tiny):
    opt = build_opt(**CTC_ARCH, train_data=tiny.data, select_data=SELECT, batch_ratio="1-1",
                    total_data_usage_ratio=USAGE, noise_ratio=0.25, noise_scope="all", manualSeed=SEED,
                    saved_model=tiny.ctc, batch_size=7, no_progress=True)
    model, converter = load_model(opt, "cpu")
    data, _ = find_label_errors.labelled_samples(opt)

    def ranked(parts):
        columns = evaluation.concatenate_columns(parts)
        return label_quality.reorder(columns, label_quality.worst_first(columns))

    whole = ranked([find_label_errors.score_shard(model, data, converter, opt, "cpu", 0)])
    shards = ranked([find_label_errors.score_shard(model, evaluation.rank_share(data, r, 3), converter, opt, "cpu", r)
                     for r in range(3)])
    assert list(zip(whole["relpath"], whole["index"].tolist())) == \
        list(zip(shards["relpath"], shards["index"].tolist()))
    assert whole["label"] == shards["label"] and whole["reading"] == shards["reading"]
    np.testing.assert_allclose(whole["log_quality"], shards["log_quality"], rtol=1e-5, atol=1e-5)


def test_a_sample_two_names_select_is_scored_once(tiny):
    opt = build_opt(**CTC_ARCH, train_data=tiny.data, select_data="base-q_iter_1-base", batch_ratio="1-1-1",
                    total_data_usage_ratio=USAGE, noise_ratio=0.25, noise_scope="all", manualSeed=SEED)
    data, _ = find_label_errors.labelled_samples(opt)
    identities = [data[i][2] for i in range(len(data))]
    assert len(identities) == len(set(identities)) == 24


def test_num_issues_without_noise_and_the_attn_head_with_amp(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ctc"
    summary = run_main(args(tiny, tiny.ctc, out, "--num_issues", "3", "--show", "5"))
    rows = read_csv(out / "label_errors.csv")
    assert "clean_label" not in rows[0] and summary["noise"] is None
    assert [row["issue"] for row in rows] == ["1"] * 3 + ["0"] * 21
    assert (summary["num_issues"], summary["issues"], summary["under_threshold"]) == (3, 3, 0)
    assert "the 5 lowest label qualities of 24" in capsys.readouterr().out

    # the Attn head (two passes per batch) under autocast: every sample scored, the columns consistent
    out = tmp_path / "attn"
    monkeypatch.setenv("ROBUST_AL_CPU_AMP", "1")  # the bf16 path even on a CPU without native bf16
    summary = run_main(args(tiny, tiny.attn, out, "--amp", *NOISE))
    rows = read_csv(out / "label_errors.csv")
    assert summary["prediction"] == "Attn" and summary["amp"] and summary["scored"] == 24
    assert summary["noise"]["corrupted"] == CORRUPTED
    scores = [float(row["log_quality"]) for row in rows]
    assert scores == sorted(scores) and all(math.isfinite(s) for s in scores)
    assert all(row["corrupted"] == str(int(row["given_label"] != row["clean_label"])) for row in rows)


@pytest.mark.parametrize("extra, message", [
    (["--threshold", "0"], "--threshold 0.0: give a label quality in (0, 1]"),
    (["--num_issues", "0"], "--num_issues 0: must be at least 1"),
    (["--noise_model", "typo"], "--noise_model typo: unknown"),
    (["--noise_ratio", "1.5"], "--noise_ratio 1.5: must lie between 0 and 1"),
    (["--select_data", "nothere"], "--select_data nothere: no LMDB below"),
    (["--saved_model", "missing.pth"], "--saved_model missing.pth: no such file"),
    (["--out", "FILE"], "a file, not a folder"),
    (["--out", ""], "--out is required"),
    (["--relabel_policy", "vote"], "--relabel_policy vote: unknown; choose one of replace, agree"),
    (["--export_annotation", "PKG", "--review_name", "a-b"], "--review_name 'a-b': --select_data splits names"),
    (["--export_annotation", "PKG", "--threshold", "1e-300"], "--export_annotation: no label is flagged"),
])
def test_bad_input_is_one_error_line(tiny, tmp_path, capsys, extra, message):
    if extra == ["--out", "FILE"]:
        extra = ["--out", str(tmp_path / "a_file")]
        open(extra[1], "w").close()
    extra = [str(tmp_path / "package") if value == "PKG" else value for value in extra]
    with pytest.raises(SystemExit) as stop:
        run_main(args(tiny, tiny.ctc, tmp_path / "out") + extra)  # the last value of a flag counts
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_torchrun_writes_what_one_process_writes(tiny, tmp_path):
    """Two ranks (gloo on CPU) each score half the samples; rank 0 alone writes, the same rows."""
    def launch(out, nproc):
        launcher = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                                        "--standalone"] if nproc > 1 else [])
        env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        result = subprocess.run(launcher + ["find_label_errors.py", *args(tiny, tiny.ctc, out, *NOISE)], cwd=REPO_ROOT,
                                env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    one, two = tmp_path / "one", tmp_path / "two"
    launch(one, 1)
    result = launch(two, 2)
    assert sorted(os.listdir(two)) == ["label_errors.csv", "summary.json"]
    assert result.stdout.count("labels have quality below") == 1  # rank 0 alone reports
    columns = ("rank", "relpath", "index", "origin", "given_label", "reading", "issue", "clean_label", "corrupted")
    rows_one, rows_two = read_csv(one / "label_errors.csv"), read_csv(two / "label_errors.csv")
    assert [[r[c] for c in columns] for r in rows_one] == [[r[c] for c in columns] for r in rows_two]
    np.testing.assert_allclose([float(r["log_quality"]) for r in rows_one], [float(r["log_quality"]) for r in rows_two],
                               rtol=1e-5, atol=1e-5)
    summary_one = json.loads((one / "summary.json").read_text())
    summary_two = json.loads((two / "summary.json").read_text())
    assert summary_two["processes"] == 2 and summary_two["noise"] == summary_one["noise"]
