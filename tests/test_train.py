"""train.py: the seed's commands, learning, resume, outputs and error exits."""
import json
import os
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
import train
import utils
from conftest import REPO_ROOT, build_opt
from model import Model, load_weights

SMALL_ARCH = ["--Transformation", "None", "--FeatureExtraction", "VGG", "--SequenceModeling", "BiLSTM",
              "--Prediction", "CTC", "--output_channel", "32", "--hidden_size", "16"]


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


def train_root_with_query_set(tiny_data, root, source, indices):
    """A train root linking the two tiny sets plus a query set `random_iter_1` holding samples
    `indices` of `source` (as data_sampling.py would write it); returns an object with
    `train` and `valid` paths."""
    root.mkdir()
    for name, path in (("CVPR2016", tiny_data.cvpr), ("NIPS2014", tiny_data.nips)):
        os.symlink(path, root / name)
    with dataset.shared_env(str(root / source)).begin() as txn:
        samples = [(txn.get(dataset.image_key(i)), txn.get(dataset.label_key(i)).decode(), (source, i))
                   for i in indices]
    dataset.write_lmdb(str(root / "random_iter_1"), samples, meta={"strategy": "random"})
    return types.SimpleNamespace(train=str(root), valid=tiny_data.valid)


@pytest.mark.slow
def test_seed_training_commands_run_as_written(tiny_data, tmp_path):
    """Round 0 and round 1 of the seed README on tiny data with the full-size TPS-ResNet-BiLSTM-Attn.
    Appended: --num_iter 1, --workers 0 and --batch_size 24 (the seed's 192 costs minutes per
    iteration on two CPU cores; the flag itself is parsed as written before being overridden)."""
    short = ["--num_iter", "1", "--workers", "0", "--batch_size", "24"]
    base = run_train(seed_command(tiny_data, "base", {}) + short, cwd=tmp_path)
    assert base.returncode == 0, base.stderr
    exp = tmp_path / "saved_models" / "TPS-ResNet-BiLSTM-Attn-Seed1111-random_iter_0-base-CE-alpha0"
    assert (exp / "best_accuracy.pth").is_file() and (exp / "last.pth").is_file()
    saved = yaml.safe_load((exp / "opt.yaml").read_text())
    assert saved["valInterval"] == 200 and saved["lr"] == 0.1 and saved["select_data"] == ["CVPR2016", "NIPS2014"]

    # a query set, as data_sampling.py would write it: 20 samples from the unlabelled part of NIPS2014
    Data = train_root_with_query_set(tiny_data, tmp_path / "train", "NIPS2014", range(100, 120))

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
    assert losses[-1] < 0.3 * losses[0]


def test_outputs_metrics_and_checkpoints(tiny_data, tmp_path):
    result = small_run(tiny_data, tmp_path, num_iter=4, val=2)
    assert result.returncode == 0, result.stderr
    exp = tmp_path / "run"
    for name in ("opt.yaml", "log_dataset.txt", "log_train.txt", "metrics.jsonl", "best_accuracy.pth",
                 "last.pth", "reliability_latest.png", "reliability_best_accuracy.png", "train_summary.json"):
        assert (exp / name).is_file(), name
    records = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]
    # validation at the first iteration, every --valInterval and at the end
    assert [r["iteration"] for r in records] == [1, 2, 4]
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


def test_ctrl_c_saves_last_and_exits_cleanly(tiny_data, tmp_path):
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
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err and "--resume" in err
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


@pytest.mark.parametrize("change, message", [
    ({"--train_data": "/nonexistent/folder"}, "--train_data /nonexistent/folder"),
    ({"--calibrator": "nonsense"}, "CE"),
    ({"--FeatureExtraction": "AlexNet"}, "--FeatureExtraction AlexNet"),
    ({"--batch_ratio": "0.5-0.25-0.25"}, "--batch_ratio"),
    ({"--select_data": "CVPR2016-SVT"}, "SVT"),
    ({"--saved_model": "MISSING_CKPT"}, "MISSING_CKPT"),
    ({"--character": "#%"}, "--character"),
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
