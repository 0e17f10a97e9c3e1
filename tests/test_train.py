"""train.py: the seed's commands, learning, resume, outputs and error exits."""
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import types

import pytest
import torch
import yaml

import calibrators
import dataset
from data_layer import lmdb_format
from data_layer import lmdb_writing
import options
import train
import utils
from conftest import REPO_ROOT, build_opt
from model import Model, load_weights, save_weights

SMALL_ARCH = ["--Transformation", "None", "--FeatureExtraction", "VGG", "--SequenceModeling", "BiLSTM",
              "--Prediction", "CTC", "--output_channel", "32", "--hidden_size", "16"]


def strict_json(text):
    """json.loads as strict readers do: NaN and Infinity are not JSON."""
    def reject(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=reject)


def run_train(args, cwd=REPO_ROOT, **kwargs):
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "train.py"), *args], cwd=cwd,
                          capture_output=True, text=True, **kwargs)


def small_run(tiny_data, out, *extra, num_iter=4, val=2):
    return run_train(["--train_data", tiny_data.train, "--valid_data", tiny_data.valid,
                      "--select_data", "CVPR2016-NIPS2014", "--batch_ratio", "0.5-0.5", *SMALL_ARCH,
                      "--batch_size", "8", "--workers", "0", "--num_iter", str(num_iter), "--valInterval", str(val),
                      "--total_data_usage_ratio", "0.5", "--adam", "--lr", "0.001",
                      "--output_dir", str(out), "--exp_name", "run", *extra])


def seed_command(tiny_data, mode, extra):
    """The seed README's training command, flag for flag, with the data roots filled in."""
    args = ["--train_data", tiny_data.train, "--valid_data", tiny_data.valid,
            "--select_data", "CVPR2016-NIPS2014" if mode == "base" else "CVPR2016-NIPS2014-random_iter_1",
            "--batch_ratio", "0.5-0.5" if mode == "base" else "0.25-0.25-0.5"]
    if mode == "al":
        args += ["--saved_model", extra.pop("saved_model")]
    args += ["--Transformation", "TPS", "--FeatureExtraction", "ResNet", "--SequenceModeling", "BiLSTM",
             "--Prediction", "Attn", "--valInterva", "200", "--lr", "0.1", "--manualSeed", "1111",
             "--alpha", "0", "--batch_size", "192", "--calibrator", "CE" if mode == "base" else "boost_soft",
             "--smooth_tail", "0.1", "--total_data_usage_ratio", "0.1", "--mode", mode,
             "--patience", "1000000", "--query_iter", "random_iter_0" if mode == "base" else "random_iter_1"]
    if mode == "al":
        args += ["--noise_ratio", "0"]
    return args


def train_root_with_query_set(tiny_data, root, source, indices, meta=None, valid=None):
    """A train root linking the two tiny sets plus a query set `random_iter_1` holding samples
    `indices` of `source` (as data_sampling.py would write it, with `meta` as its query-meta); returns
    an object with `train` and `valid` (`valid`, or the tiny validation root) paths."""
    root.mkdir()
    for name, path in (("CVPR2016", tiny_data.cvpr), ("NIPS2014", tiny_data.nips)):
        os.symlink(path, root / name)
    with lmdb_format.shared_env(str(root / source)).begin() as txn:
        samples = [(txn.get(lmdb_format.image_key(i)), txn.get(lmdb_format.label_key(i)).decode(), (source, i))
                   for i in indices]
    lmdb_writing.write_lmdb(str(root / "random_iter_1"), samples, meta=meta or {"strategy": "random"})
    return types.SimpleNamespace(train=str(root), valid=valid or tiny_data.valid)


def small_valid_root(tiny_data, root, n):
    """A validation root holding the first `n` samples of the tiny validation set, as `synth_eval`."""
    with lmdb_format.shared_env(tiny_data.eval).begin() as txn:
        samples = [(txn.get(lmdb_format.image_key(i)), txn.get(lmdb_format.label_key(i)).decode(), None)
                   for i in range(1, n + 1)]
    lmdb_writing.write_lmdb(str(root / "synth_eval"), samples)
    return str(root)


@pytest.mark.slow
def test_seed_training_commands_run_as_written(tiny_data, tmp_path):
    """Round 0 and round 1 of the seed README on tiny data with the full-size TPS-ResNet-BiLSTM-Attn.
    Appended: --num_iter 1, --workers 0 and --batch_size 8 (the seed's 192 costs minutes per
    iteration on two CPU cores; the flag itself is parsed as written before being overridden); the
    validation root holds 8 images (the full-size model's forward passes were most of this test's
    time, and nothing here depends on how many images validation reads: it only has to run)."""
    short = ["--num_iter", "1", "--workers", "0", "--batch_size", "8"]
    valid = small_valid_root(tiny_data, tmp_path / "valid", 8)
    base_data = types.SimpleNamespace(train=tiny_data.train, valid=valid)
    base = run_train(seed_command(base_data, "base", {}) + short, cwd=tmp_path)
    assert base.returncode == 0, base.stderr
    exp = tmp_path / "saved_models" / "TPS-ResNet-BiLSTM-Attn-Seed1111-random_iter_0-base-CE-alpha0"
    assert (exp / "best_accuracy.pth").is_file() and (exp / "last.pth").is_file()
    saved = yaml.safe_load((exp / "opt.yaml").read_text())
    assert saved["valInterval"] == 200 and saved["lr"] == 0.1 and saved["select_data"] == ["CVPR2016", "NIPS2014"]

    # a query set, as data_sampling.py would write it: 20 samples from the unlabelled part of NIPS2014
    Data = train_root_with_query_set(tiny_data, tmp_path / "train", "NIPS2014", range(100, 120), valid=valid)

    al_args = seed_command(Data, "al", {"saved_model": str(exp / "best_accuracy.pth")})
    al = run_train(al_args + short, cwd=tmp_path)
    assert al.returncode == 0, al.stderr
    al_exp = tmp_path / "saved_models" / "TPS-ResNet-BiLSTM-Attn-Seed1111-random_iter_1-al-boost_soft-alpha0"
    summary = json.loads((al_exp / "train_summary.json").read_text())
    # al mode: the first 10% of each base set (after filtering) plus the whole query set
    opt = build_opt(train_data=Data.train, total_data_usage_ratio="0.1")
    kept = {name: len(dataset.hierarchical_dataset(Data.train, opt, [name])[0]) for name in ("CVPR2016", "NIPS2014")}
    assert summary["labelled_samples"] == {"CVPR2016": int(kept["CVPR2016"] * 0.1),
                                           "NIPS2014": int(kept["NIPS2014"] * 0.1), "random_iter_1": 20}
    assert 100 <= kept["CVPR2016"] <= 120


def test_a_fixed_batch_is_learned(tiny_data):
    torch.manual_seed(0)
    opt = build_opt(train_data=tiny_data.train, output_channel=32, hidden_size=32, batch_size=8,
                    calibrator="CE", alpha=0.0, num_iter=60, grad_clip=5.0, amp=False, channels_last=False)
    converter = utils.make_converter(opt.Prediction, opt.character)
    opt.num_class = len(converter.character)
    batch = dataset.Batch_Balanced_Dataset(opt).get_batch()
    model = Model(opt)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    criterion = calibrators.get_calibrator("CE", opt)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    losses = [train.train_step(model, batch, converter, criterion, optimizer, scaler, opt, torch.device("cpu"), i).item()
              for i in range(60)]
    # well below the untrained loss, and still falling after the first steps' collapse towards
    # all-blank outputs (the ratio to the first loss depends on the labels the loader drew)
    assert losses[-1] < 0.5 * losses[0] and losses[-1] < losses[10]


def test_outputs_metrics_and_checkpoints(tiny_data, tmp_path):
    result = small_run(tiny_data, tmp_path, num_iter=4, val=2)
    assert result.returncode == 0, result.stderr
    exp = tmp_path / "run"
    for name in ("opt.yaml", "log_dataset.txt", "log_train.txt", "metrics.jsonl", "best_accuracy.pth",
                 "last.pth", "reliability_latest.png", "reliability_best_accuracy.png", "train_summary.json"):
        assert (exp / name).is_file(), name
    records = [strict_json(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]
    # validation at the first iteration, every --valInterval and at the end
    assert [r["iteration"] for r in records] == [1, 2, 4]
    summary = strict_json((exp / "train_summary.json").read_text())
    if summary["best"]["accuracy"] == 0:
        # no validation read a word, so none could be the best calibrated: no ECE (was Infinity)
        assert summary["best"]["ece"] is None and not (exp / "best_calibration.pth").exists()
    for r in records:
        assert set(r) >= {"iteration", "train_loss", "valid_loss", "accuracy", "norm_ED", "ece", "ace", "mce",
                          "brier", "elapsed"}
        assert 0 <= r["accuracy"] <= 100 and 0 <= r["norm_ED"] <= 1
        assert all(0 <= r[k] <= 1 for k in ("ece", "ace", "mce", "brier"))
        assert r["train_loss"] > 0 and r["valid_loss"] > 0
    opt = build_opt(output_channel=32, hidden_size=16)
    opt.num_class = 37
    state = torch.load(exp / "best_accuracy.pth", map_location="cpu")
    assert all(k.startswith("module.") for k in state)
    load_weights(Model(opt), str(exp / "best_accuracy.pth"), strict=True)
    saved = yaml.safe_load((exp / "opt.yaml").read_text())
    assert saved["num_class"] == 37 and saved["output_channel"] == 32


def test_resume_continues_where_last_left_off(tiny_data, tmp_path):
    full = small_run(tiny_data, tmp_path / "full", num_iter=4, val=2)
    assert full.returncode == 0, full.stderr
    first = small_run(tiny_data, tmp_path / "split", num_iter=2, val=2)
    assert first.returncode == 0, first.stderr
    resumed = small_run(tiny_data, tmp_path / "split", "--resume", num_iter=4, val=2)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "at iteration 2" in resumed.stdout
    a = torch.load(tmp_path / "full" / "run" / "last.pth", weights_only=False)
    b = torch.load(tmp_path / "split" / "run" / "last.pth", weights_only=False)
    assert a["iteration"] == b["iteration"] == 4
    steps_a = [s["step"].item() for s in a["optimizer"]["state"].values()]
    steps_b = [s["step"].item() for s in b["optimizer"]["state"].values()]
    assert steps_a == steps_b and set(steps_a) == {4.0}
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    iterations = [json.loads(x)["iteration"] for x in (tmp_path / "split" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert iterations == [1, 2, 4]


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_saves_last_and_exits_cleanly(tiny_data, tmp_path, signum, status):
    proc = subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, "train.py"), "--train_data", tiny_data.train,
                             "--valid_data", tiny_data.valid, "--select_data", "CVPR2016-NIPS2014",
                             "--batch_ratio", "0.5-0.5", *SMALL_ARCH, "--batch_size", "8", "--workers", "0",
                             "--num_iter", "100000", "--valInterval", "100000", "--total_data_usage_ratio", "0.5",
                             "--output_dir", str(tmp_path), "--exp_name", "run"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 60
    while not metrics.exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == status
    assert "Traceback" not in err and "--resume" in err and f"interrupted ({signal.Signals(signum).name})" in err
    state = torch.load(tmp_path / "run" / "last.pth", weights_only=False)
    assert state["iteration"] >= 1


def test_noise_is_applied_to_queried_labels_and_logged(tiny_data, tmp_path):
    Data = train_root_with_query_set(tiny_data, tmp_path / "train", "CVPR2016", range(61, 121))
    result = run_train(["--train_data", Data.train, "--valid_data", Data.valid,
                        "--select_data", "CVPR2016-NIPS2014-random_iter_1", "--batch_ratio", "0.25-0.25-0.5",
                        *SMALL_ARCH, "--batch_size", "8", "--workers", "0", "--num_iter", "1",
                        "--total_data_usage_ratio", "0.5", "--mode", "al", "--noise_ratio", "1.0",
                        "--output_dir", str(tmp_path), "--exp_name", "noisy"])
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "noisy" / "train_summary.json").read_text())
    # noise ratio 1 on the queried set only: every label it keeps after filtering, none of the base labels
    kept = summary["labelled_samples"]["random_iter_1"]
    assert 50 <= kept <= 60
    assert summary["corrupted_labels"] == kept
    assert f"{kept} labels corrupted" in (tmp_path / "noisy" / "log_train.txt").read_text()


def test_noise_log_holds_the_truth_behind_every_corrupted_label(tiny_data, tmp_path):
    Data = train_root_with_query_set(tiny_data, tmp_path / "train", "CVPR2016", range(61, 121))
    args = ["--train_data", Data.train, "--valid_data", Data.valid, "--select_data", "CVPR2016-NIPS2014-random_iter_1",
            "--batch_ratio", "0.25-0.25-0.5", *SMALL_ARCH, "--batch_size", "8", "--workers", "0", "--num_iter", "1",
            "--total_data_usage_ratio", "0.5", "--mode", "al", "--output_dir", str(tmp_path)]
    result = run_train(args + ["--noise_ratio", "0.5", "--noise_model", "mixed", "--exp_name", "noisy"])
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "noisy"
    summary = json.loads(folder.joinpath("train_summary.json").read_text())
    with open(folder / "noise_log.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["relpath", "index", "origin_relpath", "origin_index", "clean_label", "noisy_label", "kind"]
    # round(0.5 x kept) of the query set's labels, one row each, and only those (scope 'queried')
    assert len(rows) == summary["corrupted_labels"] == math.floor(summary["labelled_samples"]["random_iter_1"] * 0.5 + 0.5)
    with lmdb_format.shared_env(tiny_data.cvpr).begin() as txn:
        for row in rows:
            assert row["relpath"] == "random_iter_1" and (row["origin_relpath"], row["kind"] != "") == ("CVPR2016", True)
            # identity: the query set's own index; origin: the source sample, whose label is the clean one
            assert int(row["origin_index"]) == int(row["index"]) + 60
            assert txn.get(lmdb_format.label_key(int(row["origin_index"]))).decode().lower() == row["clean_label"]
            assert row["noisy_label"] != row["clean_label"] and len(row["noisy_label"]) <= 25
    assert yaml.safe_load(folder.joinpath("opt.yaml").read_text())["noise_model"] == "mixed"
    assert "model mixed" in folder.joinpath("log_train.txt").read_text()
    # without noise no log is written, and a rerun in a folder that held one removes it
    result = run_train(args + ["--exp_name", "noisy"])
    assert result.returncode == 0, result.stderr
    assert not (folder / "noise_log.csv").exists() and "noise_log.csv" in result.stderr


def test_resume_counts_the_noise_model_and_reads_an_older_checkpoint_as_substitute():
    names = ["noise_model", "noise_ratio"]
    older = {"noise_ratio": 0.3}  # written before --noise_model existed
    train.check_resume_options(types.SimpleNamespace(noise_model="substitute", noise_ratio=0.3), older, "last.pth",
                               names)
    with pytest.raises(utils.UserError, match="--noise_model 'substitute' -> 'confusable'"):
        train.check_resume_options(types.SimpleNamespace(noise_model="confusable", noise_ratio=0.3), older,
                                   "last.pth", names)
    with pytest.raises(utils.UserError, match="--noise_model 'edit' -> 'mixed'"):
        train.check_resume_options(types.SimpleNamespace(noise_model="mixed", noise_ratio=0.3),
                                   {**older, "noise_model": "edit"}, "last.pth", names)


@pytest.mark.parametrize("change, message", [
    ({"--train_data": "/nonexistent/folder"}, "--train_data /nonexistent/folder"),
    ({"--calibrator": "nonsense"}, "CE"),
    ({"--FeatureExtraction": "AlexNet"}, "--FeatureExtraction AlexNet"),
    ({"--batch_ratio": "0.5-0.25-0.25"}, "--batch_ratio"),
    ({"--select_data": "CVPR2016-SVT"}, "SVT"),
    ({"--saved_model": "MISSING_CKPT"}, "MISSING_CKPT"),
    ({"--character": "#%"}, "--character"),
    ({"--lr": "nan"}, "--lr nan"),
])
def test_bad_input_exits_2_with_one_line(tiny_data, tmp_path, change, message):
    args = ["--train_data", tiny_data.train, "--valid_data", tiny_data.valid, "--select_data", "CVPR2016-NIPS2014",
            "--batch_ratio", "0.5-0.5", *SMALL_ARCH, "--batch_size", "8", "--workers", "0", "--num_iter", "1",
            "--output_dir", str(tmp_path), "--exp_name", "bad"]
    for flag, value in change.items():
        if value == "MISSING_CKPT":
            value = str(tmp_path / "MISSING_CKPT.pth")
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag] if value is None else [flag, value]
    result = run_train(args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    if "--train_data" in change or "--select_data" in change or "--character" in change:
        assert not (tmp_path / "bad").exists()  # nothing written for data that was not found


def test_checkpoint_that_does_not_fit_lists_keys(tiny_data, tmp_path):
    opt = build_opt(output_channel=64, hidden_size=16)
    opt.num_class = 37
    from model import save_weights

    save_weights(Model(opt), str(tmp_path / "wide.pth"))
    result = small_run(tiny_data, tmp_path, "--saved_model", str(tmp_path / "wide.pth"), num_iter=1)
    assert result.returncode == 2
    assert "FeatureExtraction" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------- checks before training (in this process)

def small_args(tiny_data, out, *extra, train_data=None, valid_data=None):
    return ["--train_data", train_data or tiny_data.train, "--valid_data", valid_data or tiny_data.valid,
            "--select_data", "CVPR2016-NIPS2014", "--batch_ratio", "0.5-0.5", *SMALL_ARCH, "--batch_size", "8",
            "--workers", "0", "--num_iter", "1", "--total_data_usage_ratio", "0.5", "--output_dir", str(out),
            "--exp_name", "run", *extra]


def main_with(args):
    """train.main in this process: the checks come before anything is written or trained."""
    return train.main(train.get_args_parser().parse_args(args))


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "nan", "--lr nan: give a positive finite learning rate"),
    ("--lr", "inf", "--lr inf: give a positive finite learning rate"),
    ("--lr", "0", "--lr 0.0: give a positive finite learning rate"),
    ("--grad_clip", "nan", "--grad_clip nan: give a positive finite gradient-norm limit"),
    ("--num_iter", "-5", "--num_iter -5: must be 0 (keep --saved_model as it is, validated) or more"),
    ("--valInterval", "0", "--valInterval 0: must be at least 1"),
    ("--warmup_iters", "-1", "--warmup_iters -1: must be 0"),
    ("--patience", "0", "--patience 0: must be at least 1"),
    ("--eps", "0", "--eps 0.0: give a small positive number"),
    ("--rho", "nan", "--rho nan: must lie between 0 and 1"),
    ("--beta1", "1", "--beta1 1.0: must lie in [0, 1)"),
    ("--beta", "1.5", "--beta 1.5: must lie between 0 and 1"),
    ("--alpha", "inf", "--alpha inf: give a finite number"),
    ("--B", "nan", "--B nan: give a finite number"),
])
def test_train_options_out_of_range_are_one_error(tiny_data, tmp_path, flag, value, message):
    with pytest.raises(utils.UserError) as error:
        main_with(small_args(tiny_data, tmp_path, flag, value))
    assert str(error.value).startswith(message)
    assert not (tmp_path / "run").exists()


def write_broken_lmdb(path, n, label="abc"):
    """An LMDB of n samples whose image bytes are no image."""
    lmdb_writing.write_lmdb(str(path), ((b"not an image %d" % i, label, None) for i in range(n)))


def test_training_set_without_a_readable_image_is_refused(tiny_data, tmp_path):
    root = tmp_path / "train"
    root.mkdir()
    os.symlink(tiny_data.cvpr, root / "CVPR2016")
    write_broken_lmdb(root / "broken", 20)
    args = small_args(tiny_data, tmp_path, train_data=str(root))
    args[args.index("--select_data") + 1] = "CVPR2016-broken"
    with pytest.raises(utils.UserError, match=r"--select_data broken: none of its 10 labelled images decodes"):
        main_with(args)
    assert not (tmp_path / "run").exists()


def test_a_batch_that_does_not_decode_is_drawn_again_then_refused(tiny_data, make_opt, monkeypatch):
    opt = make_opt(train_data=tiny_data.train, select_data="NIPS2014", batch_ratio="1", batch_size=8)
    loader = dataset.Batch_Balanced_Dataset(opt)
    real_decode = dataset.decode_image
    calls = []

    def first_eight_fail(buf, rgb):
        calls.append(1)
        return None if len(calls) <= 8 else real_decode(buf, rgb)

    monkeypatch.setattr(dataset, "decode_image", first_eight_fail)
    images, labels, _ = loader.get_batch()
    # the first batch came back empty and was replaced by the next one
    assert images.shape[0] == len(labels) == 8 and loader.skipped_images == 8
    monkeypatch.setattr(dataset, "decode_image", lambda buf, rgb: None)
    with pytest.raises(utils.UserError, match="--select_data NIPS2014: the last 1000 images drawn from it did not"):
        loader.get_batch()
    # 125 empty batches of 8 images, then the error instead of a 126th draw
    assert loader.skipped_images == 8 + 1000


def test_validation_set_without_a_readable_image_is_refused(tiny_data, tmp_path):
    write_broken_lmdb(tmp_path / "valid" / "broken", 12)
    with pytest.raises(utils.UserError, match=r"--valid_data .*valid: none of its 12 images decodes"):
        main_with(small_args(tiny_data, tmp_path, valid_data=str(tmp_path / "valid")))
    assert not (tmp_path / "run").exists()


def saved_model_with_opt_yaml(folder):
    """An untrained model of SMALL_ARCH's shape and its opt.yaml (the default 36-character set)."""
    opt = build_opt(output_channel=32, hidden_size=16)
    opt.num_class = 37
    folder.mkdir()
    save_weights(Model(opt), str(folder / "best_accuracy.pth"))
    options.save_opt_yaml(opt, str(folder / "opt.yaml"))
    return folder / "best_accuracy.pth"


def test_saved_model_with_another_character_set_is_refused_naming_both(tiny_data, tmp_path, capsys):
    model_path = saved_model_with_opt_yaml(tmp_path / "previous")
    # the same 36 characters in another order: the weights fit, every class would mean another character
    shuffled = "abcdefghijklmnopqrstuvwxyz0123456789"
    args = small_args(tiny_data, tmp_path, "--saved_model", str(model_path), "--character", shuffled)
    with pytest.raises(utils.UserError) as error:
        main_with(args)
    assert "'0123456789abcdefghijklmnopqrstuvwxyz' (its opt.yaml)" in str(error.value)
    assert f"this run uses '{shuffled}'" in str(error.value)
    assert main_with(args + ["--FT", "--dry_run"]) is None
    assert "warning: --saved_model" in capsys.readouterr().err


def test_query_set_drawn_at_another_ratio_is_counted_once_and_warned(tiny_data, tmp_path, make_opt):
    opt = make_opt(train_data=tiny_data.train)
    kept = list(dataset.hierarchical_dataset(tiny_data.train, opt, ["CVPR2016"])[0].identities)
    # filtered positions 60..79: unlabelled when querying at ratio 0.5, labelled at 0.9
    origins = kept[60:80]
    Data = train_root_with_query_set(tiny_data, tmp_path / "train", "CVPR2016", [i for _, i in origins],
                                     meta={"strategy": "random", "total_data_usage_ratio": 0.5})
    opt = make_opt(train_data=Data.train, select_data="CVPR2016-NIPS2014-random_iter_1",
                   batch_ratio="0.25-0.25-0.5", total_data_usage_ratio="0.9")
    loader = dataset.Batch_Balanced_Dataset(opt)
    assert loader.num_samples["CVPR2016"] == int(len(kept) * 0.9) - 20
    assert loader.num_samples["random_iter_1"] == 20
    assert not set(loader.datasets["CVPR2016"].identities) & set(origins)
    assert len(loader.warnings) == 1
    assert ("query set random_iter_1 was drawn with --total_data_usage_ratio 0.5, this run uses 0.9"
            in loader.warnings[0])
    assert "excluded 20 already queried" in loader.log_text


def test_mode_base_leaves_query_sets_out(tiny_data, tmp_path, make_opt):
    kept = {name: len(dataset.hierarchical_dataset(tiny_data.train, make_opt(train_data=tiny_data.train), [name])[0])
            for name in ("CVPR2016", "NIPS2014")}
    Data = train_root_with_query_set(tiny_data, tmp_path / "train", "NIPS2014", range(100, 120))
    args = small_args(tiny_data, tmp_path, "--mode", "base", "--dry_run", train_data=Data.train)
    args[args.index("--select_data") + 1] = "CVPR2016-random_iter_1"
    with pytest.raises(utils.UserError, match="--select_data random_iter_1 selects only query sets .* --mode al"):
        main_with(args)
    # a name that selects base datasets and the query set: the query set is left out, and said so
    opt = make_opt(train_data=Data.train, select_data="/", batch_ratio="1", total_data_usage_ratio="0.5")
    loader = dataset.Batch_Balanced_Dataset(opt, query_sets=False)
    assert loader.num_samples == {"/": int((kept["CVPR2016"] + kept["NIPS2014"]) * 0.5)}
    assert {i[0] for i in loader.datasets["/"].identities} == {"CVPR2016", "NIPS2014"}
    assert loader.warnings == ["--mode base leaves out the query set(s) random_iter_1 that --select_data / selects "
                               "(--mode al trains on them)"]
    assert loader.num_samples == dataset.Batch_Balanced_Dataset(opt).num_samples | {"/": loader.num_samples["/"]}


def test_batch_ratio_not_summing_to_one_is_said(tiny_data, make_opt):
    loader = dataset.Batch_Balanced_Dataset(make_opt(train_data=tiny_data.train, batch_ratio="0.5-0.25",
                                                     batch_size=8))
    assert loader.warnings == ["--batch_ratio 0.5-0.25 (sum 0.75) of --batch_size 8 gives batches of 4+2 = 6 "
                               "images, not 8"]
    assert not dataset.Batch_Balanced_Dataset(make_opt(train_data=tiny_data.train, batch_ratio="0.5-0.5",
                                                       batch_size=8)).warnings


@pytest.mark.slow
def test_dry_run_prints_the_plan_and_writes_nothing(tiny_data, tmp_path):
    out = tmp_path / "out"
    args = small_args(tiny_data, out, "--dry_run")
    args[args.index("--batch_ratio") + 1] = "0.5-0.25"
    result = run_train(args)
    assert result.returncode == 0, result.stderr
    assert not out.exists()
    opt = build_opt(train_data=tiny_data.train, total_data_usage_ratio="0.5")
    labelled = {name: len(dataset.hierarchical_dataset(tiny_data.train, opt, [name], split="labelled")[0])
                for name in ("CVPR2016", "NIPS2014")}
    assert f"  CVPR2016: {labelled['CVPR2016']} labelled, 4 per batch" in result.stdout
    assert f"  NIPS2014: {labelled['NIPS2014']} labelled, 2 per batch" in result.stdout
    assert f"  total: {sum(labelled.values())} labelled, 6 per batch" in result.stdout
    assert re.search(r"^iterations: 0 -> 1$", result.stdout, re.M)
    assert result.stderr.splitlines() == ["warning: --batch_ratio 0.5-0.25 (sum 0.75) of --batch_size 8 gives "
                                          "batches of 4+2 = 6 images, not 8"]
