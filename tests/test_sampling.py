"""data_sampling.py: the seed command end to end, what the query sets hold, scoring, errors."""
import io
import json
import math
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from measurement import calibration
import data_sampling
from active_learning import pool_scoring
import dataset
from data_layer import lmdb_format
import options
from active_learning import query_strategies
import utils
from create_lmdb_dataset import create_dataset
from model import Model, save_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHARSET = "0123456789abcdefghijklmnopqrstuvwxyz"
SEED_ARCH = {"Transformation": "TPS", "FeatureExtraction": "ResNet", "SequenceModeling": "BiLSTM",
             "Prediction": "Attn", "num_fiducial": 20, "input_channel": 1, "output_channel": 32, "hidden_size": 16,
             "imgH": 32, "imgW": 100, "rgb": False, "PAD": False, "character": CHARSET, "sensitive": False,
             "character_file": "", "batch_max_length": 25}
CTC_ARCH = dict(SEED_ARCH, Transformation="None", FeatureExtraction="VGG", SequenceModeling="None",
                Prediction="CTC", output_channel=16, hidden_size=8)
USAGE = "0.7"  # labelled share in the in-process runs: a pool of about 70 samples
SEED_COMMAND = ("--train_data train_data_lmdb --valid_data test_data_lmdb --select_data CVPR2016-NIPS2014 "
                "--batch_ratio 0.5-0.5 --saved_model {model} --Transformation TPS --FeatureExtraction ResNet "
                "--SequenceModeling BiLSTM --Prediction Attn --valInterva 200 --lr 0.1 --manualSeed 1111 --alpha 0 "
                "--batch_size 192 --calibrator CE --smooth_tail 0.1 --total_data_usage_ratio 0.1 --mode al "
                "--query random")


def save_model(folder, arch, sharpen=1.0, seed=0):
    """A randomly initialised model with an opt.yaml beside it; `sharpen` scales the output layer so
    that confidences differ from sample to sample."""
    torch.manual_seed(seed)
    opt = types.SimpleNamespace(**arch, num_class=len(arch["character"]) + (1 if arch["Prediction"] == "CTC" else 2))
    model = Model(opt)
    with torch.no_grad():
        for name, param in model.Prediction.named_parameters():
            param.mul_(sharpen)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "best_accuracy.pth")
    save_weights(model, path)
    with open(os.path.join(folder, "opt.yaml"), "w") as f:
        yaml.safe_dump(dict(arch, num_class=opt.num_class, exp_name="tiny"), f)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two cores shared by several runs: one thread is the fastest here
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling_models")
    return types.SimpleNamespace(seed=save_model(str(root / "seed"), SEED_ARCH),
                                 ctc=save_model(str(root / "ctc"), CTC_ARCH, sharpen=300.0))


@pytest.fixture
def work(tiny_data, tmp_path):
    """A private copy of the tiny data laid out as the seed command expects."""
    shutil.copytree(tiny_data.train, tmp_path / "train_data_lmdb")
    shutil.copytree(tiny_data.valid, tmp_path / "test_data_lmdb")
    return tmp_path


def run_main(argv):
    """data_sampling in-process, as its __main__ block runs it (UserError -> SystemExit 2)."""
    opt = options.parse_with_given(data_sampling.get_args_parser(), argv)
    return utils.exit_on_user_error(data_sampling.main)(opt)


def ctc_args(work, model, *extra):
    return ["--train_data", str(work / "train_data_lmdb"), "--valid_data", str(work / "test_data_lmdb"),
            "--select_data", "CVPR2016-NIPS2014", "--saved_model", model, "--total_data_usage_ratio", USAGE,
            "--workers", "0", "--batch_size", "32", "--device", "cpu", "--no_progress", *extra]


def listing(folder):
    return sorted(os.listdir(folder))


def read_set(path):
    """[(image bytes, label, origin)] of an LMDB, read with plain lmdb calls."""
    with lmdb_format.shared_env(path).begin() as txn:
        n = int(txn.get(b"num-samples"))
        rows = []
        for i in range(1, n + 1):
            origin = txn.get(b"origin-%09d" % i)
            if origin is not None:
                relpath, index = origin.decode().split("\t")
                origin = (relpath, int(index))
            rows.append((txn.get(b"image-%09d" % i), txn.get(b"label-%09d" % i).decode(), origin))
        meta = txn.get(b"query-meta")
    return rows, None if meta is None else json.loads(meta)


def source_sample(train, origin):
    with lmdb_format.shared_env(os.path.join(train, origin[0])).begin() as txn:
        return txn.get(b"image-%09d" % origin[1]), txn.get(b"label-%09d" % origin[1]).decode()


def expected_pool(train, make_opt, usage, exclude=frozenset()):
    """Unlabelled samples per name worked out from the filtered counts: n - int(n * usage)."""
    opt = make_opt(**CTC_ARCH, total_data_usage_ratio=str(usage))
    total = 0
    for name in ("CVPR2016", "NIPS2014"):
        everything, _ = dataset.hierarchical_dataset(train, opt, [name])
        ids = list(everything.identities)
        labelled = int(len(ids) * usage)
        total += sum(1 for identity in ids[labelled:] if identity not in exclude)
    return total


# ---------------------------------------------------------------------------------------------
# the seed command


def run_seed_command(work, model):
    argv = SEED_COMMAND.format(model=model).split()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "data_sampling.py"), *argv], cwd=work,
                          capture_output=True, text=True, env=env, timeout=300)


def test_seed_command_two_rounds(work, models, make_opt):
    train = str(work / "train_data_lmdb")
    pool_1 = expected_pool(train, make_opt, 0.1)
    first = run_seed_command(work, models.seed)
    assert first.returncode == 0, first.stderr
    assert listing(train) == ["CVPR2016", "NIPS2014", "random_iter_1"]
    summary = json.loads((work / "train_data_lmdb" / "random_iter_1" / "summary.json").read_text())
    picked_1 = math.floor(pool_1 * 0.01)  # the default --ratio
    assert picked_1 >= 1
    assert (summary["pool_size"], summary["num_picked"], summary["temperature"]) == (pool_1, picked_1, None)
    assert summary["next_select_data"] == "CVPR2016-NIPS2014-random_iter_1"
    assert summary["next_batch_ratio"] == "0.25-0.25-0.5"
    assert 0.0 <= summary["accuracy"]["pool"] <= 1.0 and summary["time_s"] > 0
    assert "--select_data CVPR2016-NIPS2014-random_iter_1 --batch_ratio 0.25-0.25-0.5" in first.stdout

    rows_1, meta = read_set(os.path.join(train, "random_iter_1"))
    assert len(rows_1) == picked_1
    assert (meta["strategy"], meta["seed"], meta["num_picked"], meta["select_data"]) == \
        ("random", 1111, picked_1, "CVPR2016-NIPS2014")
    assert meta["model"] == os.path.abspath(work / models.seed) and len(meta["scores"]) == picked_1
    for image, label, origin in rows_1:
        assert (image, label) == source_sample(train, origin)  # the original bytes and raw label

    second = run_seed_command(work, models.seed)
    assert second.returncode == 0, second.stderr
    assert listing(train) == ["CVPR2016", "NIPS2014", "random_iter_1", "random_iter_2"]
    rows_2, _ = read_set(os.path.join(train, "random_iter_2"))
    summary_2 = json.loads((work / "train_data_lmdb" / "random_iter_2" / "summary.json").read_text())
    assert summary_2["pool_size"] == pool_1 - picked_1
    # round 1's set left the pool, so the next training takes it too, though --select_data did not name it
    assert (summary_2["next_select_data"], summary_2["next_batch_ratio"]) == \
        ("CVPR2016-NIPS2014-random_iter_1-random_iter_2", "0.25-0.25-0.25-0.25")
    origins_1 = {o for _, _, o in rows_1}
    assert origins_1.isdisjoint(o for _, _, o in rows_2) and len(rows_2) == math.floor((pool_1 - picked_1) * 0.01)


def test_query_set_is_used_in_full_when_training(work, models, make_opt):
    train = str(work / "train_data_lmdb")
    run_main(ctc_args(work, models.ctc, "--query", "uncali", "--num_query", "9"))
    # total_data_usage_ratio 0.1 would take 0 of 9 samples if the query set were split
    opt = make_opt(**CTC_ARCH, total_data_usage_ratio="0.1")
    labelled, _ = dataset.hierarchical_dataset(train, opt, ["uncali_iter_1"], split="labelled")
    rows, _ = read_set(os.path.join(train, "uncali_iter_1"))
    assert len(labelled) == 9
    items = [labelled[i] for i in range(len(labelled))]
    assert [label for _, label, _ in items] == [label.lower() for _, label, _ in rows]
    assert all(image is not None for image, _, _ in items)
    unlabelled, _ = dataset.hierarchical_dataset(train, opt, ["uncali_iter_1"], split="unlabelled")
    assert len(unlabelled) == 0


# ---------------------------------------------------------------------------------------------
# strategies through the real scorer


def pool_confidences(train, make_opt, model_path, exclude=frozenset()):
    """{identity: word confidence} over the pool, each LMDB's pool in one batch."""
    from measurement.evaluation import forward_logits
    from model import load_weights

    opt = make_opt(**CTC_ARCH, total_data_usage_ratio=USAGE)
    opt.num_class = len(CHARSET) + 1
    model = Model(opt)
    load_weights(model, model_path)
    model.eval()
    converter = utils.make_converter("CTC", CHARSET)
    collate = dataset.AlignCollate(opt.imgH, opt.imgW)
    confidences = {}
    for name in ("CVPR2016", "NIPS2014"):
        pool, _ = dataset.hierarchical_dataset(train, opt, [name], split="unlabelled", exclude=set(exclude))
        images, _, ids = collate([pool[i] for i in range(len(pool))])
        with torch.no_grad():
            logits = forward_logits(model, images, opt.batch_max_length, "CTC")
        confidences.update(zip(ids, utils.decode_predictions(logits, converter)[1].tolist()))
    return confidences


def test_uncali_queries_the_least_confident_pool_samples(work, models, make_opt):
    train = str(work / "train_data_lmdb")
    summary = run_main(ctc_args(work, models.ctc, "--query", "uncali", "--num_query", "6"))
    rows, meta = read_set(os.path.join(train, "uncali_iter_1"))
    confidences = pool_confidences(train, make_opt, models.ctc)
    picked = [origin for _, _, origin in rows]
    assert summary["pool_size"] == len(confidences) == expected_pool(train, make_opt, float(USAGE))
    assert np.allclose(meta["scores"], [confidences[o] for o in picked], rtol=1e-4, atol=1e-6)
    others = [c for o, c in confidences.items() if o not in set(picked)]
    assert max(confidences[o] for o in picked) <= min(others) + 1e-6
    assert np.ptp(list(confidences.values())) > 1e-3  # the scores really differ (about 0.88 +- 0.005)
    assert summary["mean_confidence"]["picked"] == pytest.approx(np.mean([confidences[o] for o in picked]), rel=1e-4)
    assert summary["mean_confidence"]["pool"] == pytest.approx(np.mean(list(confidences.values())), rel=1e-4)


def test_select_data_naming_a_query_set_pools_only_base_data(work, models, make_opt):
    train = str(work / "train_data_lmdb")
    run_main(ctc_args(work, models.ctc, "--query", "random", "--num_query", "5"))
    first = {o for _, _, o in read_set(os.path.join(train, "random_iter_1"))[0]}
    argv = ctc_args(work, models.ctc, "--query", "margin", "--num_query", "5")
    argv[argv.index("--select_data") + 1] = "CVPR2016-NIPS2014-random_iter_1"
    summary = run_main(argv + ["--batch_ratio", "0.25-0.25-0.5"])
    assert summary["query_set"] == "margin_iter_2"
    assert summary["pool_size"] == expected_pool(train, make_opt, float(USAGE), exclude=first)
    assert (summary["next_select_data"], summary["next_batch_ratio"]) == \
        ("CVPR2016-NIPS2014-random_iter_1-margin_iter_2", "0.25-0.25-0.25-0.25")
    second = {o for _, _, o in read_set(os.path.join(train, "margin_iter_2"))[0]}
    assert first.isdisjoint(second) and len(second) == 5


def test_temperature_auto_reports_the_fitted_value(work, models, capsys):
    summary = run_main(ctc_args(work, models.ctc, "--query", "cali", "--num_query", "3"))
    # The random model reads no validation label right while being confident (about 0.88): the
    # labels' likelihood grows as the distributions flatten, so the fitted temperature exceeds 1
    # and the calibrated confidences fall below the raw ones.
    temperature = summary["temperature"]
    assert temperature > 1.5
    _, meta = read_set(os.path.join(str(work / "train_data_lmdb"), "cali_iter_1"))
    assert meta["temperature"] == temperature
    calibrated, raw = summary["mean_calibrated_confidence"], summary["mean_confidence"]
    assert calibrated["pool"] < raw["pool"] - 0.1
    assert f"temperature: {temperature:.4f} (fitted on --valid_data, token-level)" in capsys.readouterr().out
    assert summary["calibration"] == meta["calibration"] == "token"


def test_temperature_fitted_at_the_word_level(work, models, capsys):
    # No validation word is read right, so the word-level fit lowers every validation confidence c
    # to c ** (1 / T) until all are down at the clamp of its objective (1e-7), and stops there: for
    # confidences about 0.9, T = log 0.9 / log 1e-7, about 0.007.
    summary = run_main(ctc_args(work, models.ctc, "--query", "cali", "--num_query", "3", "--calibration", "word"))
    assert calibration.WORD_TEMPERATURE_BOUNDS[0] < summary["temperature"] < 0.05
    assert summary["mean_calibrated_confidence"]["pool"] < 1e-4
    _, meta = read_set(os.path.join(str(work / "train_data_lmdb"), "cali_iter_1"))
    assert summary["calibration"] == meta["calibration"] == "word"
    assert "(fitted on --valid_data, word-level)" in capsys.readouterr().out
    # margin ranks token probabilities, which a word-level scaling leaves alone
    with pytest.raises(SystemExit) as info:
        run_main(ctc_args(work, models.ctc, "--query", "margin", "--temperature", "auto", "--calibration", "word"))
    assert info.value.code == 2
    assert "error: --calibration word scales the word confidence only" in capsys.readouterr().err


def test_runs_are_reproducible_and_differ_by_seed(work, models, tmp_path_factory):
    other = tmp_path_factory.mktemp("copy")
    shutil.copytree(work / "train_data_lmdb", other / "train_data_lmdb")
    shutil.copytree(work / "test_data_lmdb", other / "test_data_lmdb")
    origins = []
    for folder, seed in ((work, "5"), (other, "5"), (other, "6")):
        run_main(ctc_args(folder, models.ctc, "--query", "random", "--num_query", "8", "--manualSeed", seed,
                          "--out_name", f"r{seed}"))
        origins.append([o for _, _, o in read_set(str(folder / "train_data_lmdb" / f"r{seed}"))[0]])
    assert origins[0] == origins[1]
    assert origins[0] != origins[2]


def test_two_processes_pick_what_one_process_picks(work, models, tmp_path_factory):
    other = tmp_path_factory.mktemp("distributed")
    shutil.copytree(work / "train_data_lmdb", other / "train_data_lmdb")
    argv = ctc_args(other, models.ctc, "--query", "entropy", "--num_query", "7", "--batch_size", "8")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             os.path.join(ROOT, "data_sampling.py"), *argv], cwd=other, capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("queried 7 of") == 1  # rank 0 alone reports and writes
    summary = run_main(ctc_args(work, models.ctc, "--query", "entropy", "--num_query", "7", "--batch_size", "8"))
    two, meta_two = read_set(str(other / "train_data_lmdb" / "entropy_iter_1"))
    one, meta_one = read_set(str(work / "train_data_lmdb" / "entropy_iter_1"))
    assert [o for _, _, o in two] == [o for _, _, o in one]
    assert np.allclose(meta_two["scores"], meta_one["scores"], atol=1e-5)
    assert meta_two["pool_size"] == summary["pool_size"]


def test_save_images_exports_original_bytes_that_create_lmdb_reads_back(work, models):
    train = str(work / "train_data_lmdb")
    export = work / "export"
    run_main(ctc_args(work, models.ctc, "--query", "entropy", "--num_query", "12", "--save_images", str(export)))
    rows, _ = read_set(os.path.join(train, "entropy_iter_1"))
    lines = (export / "gt.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 12
    for line, (image, label, origin) in zip(lines, rows):
        relpath, gt = line.split("\t", 1)
        assert gt == label and (export / relpath).read_bytes() == image
        fmt = Image.open(io.BytesIO(image)).format
        assert relpath.endswith({"JPEG": ".jpg", "PNG": ".png"}[fmt])
    written, _ = create_dataset(str(export), str(export / "gt.txt"), str(work / "rebuilt"))
    rebuilt, _ = read_set(str(work / "rebuilt"))
    assert written == 12 and [(i, l) for i, l, _ in rebuilt] == [(i, l) for i, l, _ in rows]


@pytest.mark.parametrize("export", [False, True])
def test_interrupted_write_leaves_no_dataset(work, models, monkeypatch, export):
    train = str(work / "train_data_lmdb")
    before, around = listing(train), listing(work)
    real = data_sampling.read_raw_samples
    calls = []

    def interrupted(root, identities):
        calls.append(1)
        for k, sample in enumerate(real(root, identities)):
            if k == 2 and len(calls) == (2 if export else 1):  # with an export: while writing the LMDB
                raise KeyboardInterrupt
            yield sample

    monkeypatch.setattr(data_sampling, "read_raw_samples", interrupted)
    extra = ["--save_images", str(work / "export")] if export else []
    with pytest.raises(SystemExit) as stopped:  # Ctrl-C: one line (test_reliability_third.py), exit 130
        run_main(ctc_args(work, models.ctc, "--query", "random", "--num_query", "6", *extra))
    assert stopped.value.code == 130
    assert listing(train) == before  # nothing, hidden temporary folders included
    assert listing(work) == around   # no export either


# ---------------------------------------------------------------------------------------------
# errors: one line, exit 2, nothing written


def error_cases(work, models):
    base = ctc_args(work, models.ctc)

    def without(flag):
        argv = list(base)
        k = argv.index(flag)
        del argv[k:k + 2]
        return argv

    def replaced(flag, value):
        argv = list(base)
        argv[argv.index(flag) + 1] = value
        return argv

    return {
        "no saved_model": (without("--saved_model"), "--saved_model is required"),
        "missing model": (replaced("--saved_model", str(work / "nope.pth")), "--saved_model"),
        "model does not fit": (base + ["--output_channel", "32"], "FeatureExtraction"),
        "no train_data": (without("--train_data"), "--train_data is required"),
        "ratio picks nothing": (base + ["--ratio", "0.001"], "picks nothing"),
        "everything labelled": (replaced("--total_data_usage_ratio", "1.0"), "the pool is empty"),
        "unknown strategy": (base + ["--query", "coreset"], "random, uncali, uncali_char, margin, entropy, bald, cali"),
        "bad temperature": (base + ["--temperature", "warm"], "--temperature warm"),
        "calibration without auto": (base + ["--calibration", "word"], "--calibration word: it chooses how"),
    }


@pytest.mark.parametrize("case", ["no saved_model", "missing model", "model does not fit", "no train_data",
                                  "ratio picks nothing", "everything labelled", "unknown strategy",
                                  "bad temperature", "calibration without auto"])
def test_errors_exit_2_with_one_line_and_write_nothing(work, models, capsys, case):
    argv, message = error_cases(work, models)[case]
    before = listing(work / "train_data_lmdb")
    with pytest.raises(SystemExit) as exit_info:
        run_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert listing(work / "train_data_lmdb") == before


def test_exhausted_pool_and_existing_output_are_refused(work, models, capsys):
    train = str(work / "train_data_lmdb")
    run_main(ctc_args(work, models.ctc, "--query", "random", "--num_query", "100000"))  # the whole pool
    capsys.readouterr()
    before = listing(train)
    with pytest.raises(SystemExit) as exit_info:
        run_main(ctc_args(work, models.ctc, "--query", "random"))
    assert exit_info.value.code == 2 and "the pool is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_main(ctc_args(work, models.ctc, "--query", "random", "--out_name", "random_iter_1"))
    assert "random_iter_1 already exists" in capsys.readouterr().err
    assert listing(train) == before


def test_cli_error_is_one_line_exit_2(work):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "data_sampling.py"), "--train_data",
                             "train_data_lmdb", "--saved_model", "missing.pth", "--valInterva", "200"],
                            cwd=work, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --saved_model missing.pth: no such file; train a model first"]


def test_help_names_the_ignored_training_flags():
    text = data_sampling.get_args_parser().format_help()
    assert "training-only options (accepted and ignored" in text
    for flag in ("--valInterval", "--calibrator", "--smooth_tail", "--mode", "--mc_dropout"):
        assert flag in text


# ---------------------------------------------------------------------------------------------
# scoring pieces


def tiny_model():
    torch.manual_seed(3)
    opt = types.SimpleNamespace(**dict(CTC_ARCH, SequenceModeling="BiLSTM"), num_class=len(CHARSET) + 1)
    model = Model(opt)
    model.eval()
    return model


def mc_opt(samples, dropout):
    return types.SimpleNamespace(mc_samples=samples, mc_dropout=dropout, amp=False, batch_max_length=25,
                                 Prediction="CTC")


def test_mutual_information_properties():
    model = tiny_model()
    images = torch.rand(4, 1, 32, 100) * 2 - 1
    converter = utils.make_converter("CTC", CHARSET)
    device = torch.device("cpu")
    with torch.no_grad():
        logits = model(images)
        mask = utils.token_mask(logits, converter)
        # no dropout: every pass is the same, so nothing is learned from disagreement
        no_dropout = pool_scoring.mutual_information(model, images, mc_opt(3, 0.0), None, mask, device)
        assert torch.allclose(no_dropout, torch.zeros(4), atol=1e-5)
        # one pass falls back to its mean token entropy
        single = pool_scoring.mutual_information(model, images, mc_opt(1, 0.0), None, mask, device)
        assert torch.allclose(single, utils.mean_entropy(logits.softmax(-1), mask), atol=1e-6)
        # with dropout the entropy of the mean exceeds the mean entropy (Jensen)
        torch.manual_seed(0)
        bald = pool_scoring.mutual_information(model, images, mc_opt(6, 0.5), None, mask, device)
    assert torch.all(bald > 0)
    assert model.mc_dropout_p == 0.0  # switched off again


def test_score_batch_computes_only_what_the_strategy_needs():
    model = tiny_model()
    images = torch.rand(3, 1, 32, 100) * 2 - 1
    converter = utils.make_converter("CTC", CHARSET)
    opt = mc_opt(2, 0.1)
    device = torch.device("cpu")
    with torch.no_grad():
        for name, expected in (("random", {"confidence"}), ("margin", {"confidence", "margin"}),
                               ("cali", {"confidence", "cal_confidence"}), ("bald", {"confidence", "mc"})):
            texts, values = pool_scoring.score_batch(model, images, converter, opt,
                                                      query_strategies.get_strategy(name).needs, None, device)
            assert set(values) == expected and len(texts) == 3
            assert all(v.shape == (3,) for v in values.values())
        _, scaled = pool_scoring.score_batch(model, images, converter, opt, ("entropy",), 2.0, device)
        probs = (model(images) / 2.0).softmax(-1)
    assert np.allclose(scaled["entropy"], utils.mean_entropy(probs, torch.ones(3, probs.size(1), dtype=torch.bool)),
                       atol=1e-5)


def test_ctc_confidence_is_the_texts_probability_over_alignments_not_a_product_of_maxima():
    # Two frames over (blank, a). Sample 0, p(a) = (0.7, 0.01): reads "a" by the path a-, and
    # P("a") = every path but -- = 1 - 0.3 x 0.99 = 0.703. Sample 1, p(a) = (0.55, 0.55): reads "a"
    # by aa, P("a") = 1 - 0.45 x 0.45 = 0.7975. The emitting frame's maximum (0.7 against 0.55) and
    # the product of the frame maxima (0.693 against 0.3025) both rank them the other way round.
    probs = torch.tensor([[[0.3, 0.7], [0.99, 0.01]], [[0.45, 0.55], [0.45, 0.55]]], dtype=torch.float64)

    class Fixed(torch.nn.Module):
        def forward(self, images, text, is_train=False):
            return probs.log().float()

    converter = utils.make_converter("CTC", "a")
    texts, values = pool_scoring.score_batch(Fixed(), torch.zeros(2, 1, 32, 100), converter, mc_opt(1, 0.0),
                                              query_strategies.get_strategy("uncali").needs, None, torch.device("cpu"))
    assert texts == ["a", "a"]
    assert np.asarray(values["confidence"]).tolist() == pytest.approx([0.703, 0.7975], rel=1e-6)
    uncali = query_strategies.get_strategy("uncali")
    assert list(uncali.select(values, query_strategies.identity_keys([("p", 1), ("p", 2)], 0), 1)) == [0]


def test_merge_puts_sharded_records_back_in_pool_order():
    identities = [("b/NIPS", i) for i in (3, 4, 9)] + [("a/CVPR", i) for i in (1, 2, 5, 7)]
    leaf_order = ["b/NIPS", "a/CVPR"]
    columns = {"relpath": [r for r, _ in identities], "index": np.array([i for _, i in identities]),
               "prediction": [f"p{k}" for k in range(7)], "confidence": np.arange(7, dtype=np.float32)}
    shards = [{k: (v[rank::3] if isinstance(v, np.ndarray) else v[rank::3]) for k, v in columns.items()}
              for rank in range(3)]
    merged = pool_scoring.merge_columns(shards, leaf_order)
    assert merged["relpath"] == columns["relpath"] and merged["prediction"] == columns["prediction"]
    assert np.array_equal(merged["index"], columns["index"])
    assert np.array_equal(merged["confidence"], columns["confidence"])


def test_round_number_follows_the_latest_query_set():
    leaves = {"CVPR2016": False, "NIPS2014": False, "q/cali_iter_3": True, "random_iter_1": True,
              "misc_iter_9": False}
    assert data_sampling.next_round(leaves) == 4  # misc_iter_9 is no query set
    assert data_sampling.next_round({"CVPR2016": False}) == 1
    names = data_sampling.query_set_names(["CVPR2016", "random_iter_1", "cali_iter_3"], leaves, "root")
    assert names == {"random_iter_1", "cali_iter_3"}
    assert data_sampling.unselected_query_sets(leaves, ["CVPR2016", "cali_iter_3"], "root") == ["random_iter_1"]
    assert data_sampling.unselected_query_sets(leaves, ["CVPR2016"], "root") == ["random_iter_1", "cali_iter_3"]
