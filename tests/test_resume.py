"""train.py --resume: a run killed (SIGKILL) or interrupted (Ctrl-C) and resumed ends bit for bit where
the uninterrupted run ends; what a resume refuses; metrics.jsonl across restarts."""
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import dataset
import train
import utils
from conftest import REPO_ROOT

ARCH = ["--Transformation", "None", "--FeatureExtraction", "VGG", "--SequenceModeling", "BiLSTM",
        "--Prediction", "CTC", "--output_channel", "32", "--hidden_size", "16"]
# 55 and 57 labelled samples at 4 per batch: 13 and 14 batches per epoch, so 60 iterations cross
# several epoch ends of both streams, at different iterations. Warm-up and the cosine schedule make
# the learning rate depend on the iteration; the BatchNorm layers of VGG count their steps.
NUM_ITER, VAL_INTERVAL = 60, 10
# OMP_NUM_THREADS=1 everywhere: a float sum's bits may depend on the thread count.
ENV = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")


def train_args(tiny_data, out, workers=0, *extra):
    return ["--train_data", tiny_data.train, "--valid_data", tiny_data.valid, "--select_data", "CVPR2016-NIPS2014",
            "--batch_ratio", "0.5-0.5", "--total_data_usage_ratio", "0.5", *ARCH, "--batch_size", "8",
            "--workers", str(workers), "--num_iter", str(NUM_ITER), "--valInterval", str(VAL_INTERVAL),
            "--adam", "--lr", "0.001", "--warmup_iters", "5", "--lr_schedule", "cosine", "--device", "cpu",
            "--no_progress", "--output_dir", str(out), "--exp_name", "run", *extra]


def command(args):
    return [sys.executable, os.path.join(REPO_ROOT, "train.py"), *args]


def run_train(args):
    return subprocess.run(command(args), cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def start_train(args):
    # a session of its own, so that a signal can reach the loader workers too, as Ctrl-C in a terminal does
    return subprocess.Popen(command(args), cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def records(exp):
    path = exp / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines[:-1] + ([lines[-1]] if lines and lines[-1].endswith("}") else [])]


def wait_for_record(proc, exp, after, timeout=120):
    """Wait until metrics.jsonl holds a record of an iteration > `after`; the process must still run."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r["iteration"] > after for r in records(exp)):
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)
    pytest.fail(f"no validation after iteration {after} within {timeout} s")


def checkpoint(exp):
    return torch.load(exp / "last.pth", map_location="cpu", weights_only=False)


def without_elapsed(exp):
    # "elapsed" is wall-clock time, the one figure that differs between two runs
    return [{k: v for k, v in r.items() if k != "elapsed"} for r in records(exp)]


def assert_same_run(straight, resumed):
    a, b = checkpoint(straight), checkpoint(resumed)
    assert a["iteration"] == b["iteration"] == NUM_ITER
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    for index in state_a:
        for name in state_a[index]:
            assert torch.equal(state_a[index][name], state_b[index][name]), (index, name)
    assert a["data"] == b["data"]
    assert without_elapsed(straight) == without_elapsed(resumed)
    assert [r["iteration"] for r in records(resumed)] == [1, 10, 20, 30, 40, 50, 60]


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory):
    """The uninterrupted run, with --workers 0."""
    out = tmp_path_factory.mktemp("straight")
    result = run_train(train_args(tiny_data, out))
    assert result.returncode == 0, result.stderr
    return out / "run"


@pytest.mark.slow
def test_sigkill_then_resume_equals_the_straight_run(tiny_data, tmp_path, straight):
    proc = start_train(train_args(tiny_data, tmp_path))
    exp = tmp_path / "run"
    wait_for_record(proc, exp, after=10)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint(exp)["iteration"]
    assert 10 <= killed_at < NUM_ITER
    # A kill between writing a record and saving last.pth leaves records past the checkpoint (and
    # may tear the last line): add both, as such a kill would have left them.
    later = [line for line in (straight / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["iteration"] > killed_at]
    with open(exp / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in later[:-1]) + later[-1][:20])

    resumed = run_train(train_args(tiny_data, tmp_path, 0, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {exp / 'last.pth'} at iteration {killed_at}" in resumed.stdout
    assert_same_run(straight, exp)


@pytest.mark.slow
def test_ctrl_c_then_kill_then_resume_with_workers_equals_the_straight_run(tiny_data, tmp_path, straight):
    """--workers 2: Ctrl-C to the whole process group (loader workers included) at whatever step
    the run is in, resume, SIGKILL after a later checkpoint, resume to the end."""
    exp = tmp_path / "run"
    proc = start_train(train_args(tiny_data, tmp_path, 2))
    wait_for_record(proc, exp, after=0)
    time.sleep(0.3)  # most likely between two validations
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err
    interrupted = checkpoint(exp)
    stopped_at = interrupted["iteration"]
    assert 1 <= stopped_at < NUM_ITER
    # saved between two steps: every BatchNorm layer counted one training batch per iteration
    counters = [v.item() for k, v in interrupted["model"].items() if k.endswith("num_batches_tracked")]
    assert counters and set(counters) == {stopped_at}

    proc = start_train(train_args(tiny_data, tmp_path, 2, "--resume"))
    wait_for_record(proc, exp, after=stopped_at)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert stopped_at <= checkpoint(exp)["iteration"] < NUM_ITER

    resumed = run_train(train_args(tiny_data, tmp_path, 2, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(straight, exp)


def test_streams_continue_from_a_saved_position(tiny_data, make_opt):
    """Batch_Balanced_Dataset.load_state_dict: a fresh loader given the state after 20 batches draws
    what the first draws next, across epoch ends (13 and 14 batches) and for a set drawn with
    replacement (5 labelled samples, batch 8)."""
    opt = make_opt(train_data=tiny_data.train, batch_ratio="0.5-0.5", batch_size=16, total_data_usage_ratio="0.5",
                   workers=1)
    first = dataset.Batch_Balanced_Dataset(opt)
    for _ in range(20):
        first.get_batch()
    state = first.state_dict()
    per_epoch = first.num_samples["CVPR2016"] // 8
    assert 20 % per_epoch  # not at an epoch's end, where the next draw would start the next epoch
    assert (state["streams"][0]["epoch"], state["streams"][0]["batch"]) == (20 // per_epoch, 20 % per_epoch)
    expected = [first.get_batch()[2] for _ in range(10)]
    second = dataset.Batch_Balanced_Dataset(opt)
    second.load_state_dict(state)
    assert [second.get_batch()[2] for _ in range(10)] == expected

    small = make_opt(train_data=tiny_data.train, batch_ratio="0.5-0.5", batch_size=16, total_data_usage_ratio="0.05")
    first = dataset.Batch_Balanced_Dataset(small)
    assert "drawn with replacement" in first.log_text
    for _ in range(3):
        first.get_batch()
    second = dataset.Batch_Balanced_Dataset(small)
    second.load_state_dict(first.state_dict())
    assert [second.get_batch()[2] for _ in range(3)] == [first.get_batch()[2] for _ in range(3)]

    other = dataset.Batch_Balanced_Dataset(make_opt(train_data=tiny_data.train, batch_ratio="0.5-0.5",
                                                    batch_size=8, total_data_usage_ratio="0.5"))
    with pytest.raises(utils.UserError, match="CVPR2016 batch_size 8 -> 4"):
        other.load_state_dict(state)


# ---------------------------------------------------------------- what a resume refuses

def main_with(args):
    """train.main in this process (the checks run before anything is written or trained)."""
    return train.main(train.get_args_parser().parse_args(args))


@pytest.fixture
def copied(straight, tmp_path):
    """A copy of the straight run's folder, as `<tmp>/run`."""
    shutil.copytree(straight, tmp_path / "run")
    return tmp_path / "run"


def test_resume_refuses_changed_options_listing_them(tiny_data, tmp_path, copied, straight):
    args = train_args(tiny_data, tmp_path, 0, "--resume")
    for flag, value in (("--batch_size", "16"), ("--batch_ratio", "0.75-0.25"), ("--hidden_size", "32")):
        args[args.index(flag) + 1] = value
    args += ["--calibrator", "LS", "--alpha", "0.1", "--noise_ratio", "0.2"]
    with pytest.raises(utils.UserError) as error:
        main_with(args)
    message = str(error.value)
    for change in ("--batch_size 8 -> 16", "--batch_ratio 0.5-0.5 -> 0.75-0.25", "--hidden_size 16 -> 32",
                   "--calibrator 'CE' -> 'LS'", "--alpha 0.0 -> 0.1", "--noise_ratio 0.0 -> 0.2"):
        assert change in message
    assert "--num_iter" in message and "\n" not in message
    assert records(copied) == records(straight)  # nothing written


def test_resume_of_an_adam_checkpoint_with_adadelta_names_both(tiny_data, tmp_path, copied):
    args = train_args(tiny_data, tmp_path, 0, "--resume")
    args.remove("--adam")
    with pytest.raises(utils.UserError, match=r"optimizer \(--adam\) Adam -> Adadelta"):
        main_with(args)


def test_num_iter_may_grow_but_not_shrink_below_the_checkpoint(tiny_data, tmp_path, copied, capsys):
    args = train_args(tiny_data, tmp_path, 0, "--resume")
    args[args.index("--num_iter") + 1] = "59"
    with pytest.raises(utils.UserError, match=r"--num_iter 59: below the iteration .* \(60\); give --num_iter 60"):
        main_with(args)
    args[args.index("--num_iter") + 1] = "80"
    assert main_with(args + ["--dry_run", "--workers", "2"]) is None
    assert "iterations: 60 -> 80" in capsys.readouterr().out


class Payload:
    """Unpickling this runs os.system: a checkpoint must be opened without running its code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("kind", ["text", "state_dict", "pickle"])
def test_resume_of_something_else_than_a_last_pth_is_one_error(tiny_data, tmp_path, copied, kind):
    path = tmp_path / "other.pth"
    marker = tmp_path / "code_ran"
    if kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "state_dict":
        shutil.copy(copied / "best_accuracy.pth", path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"model": Payload(marker), "iteration": 3}, f, protocol=2)
    with pytest.raises(utils.UserError, match=re.escape(f"--resume {path}: not a ")):
        main_with(train_args(tiny_data, tmp_path, 0, "--resume", str(path)))
    assert not marker.exists()


def test_restart_without_resume_starts_a_fresh_metrics_file(tiny_data, tmp_path, copied, capsys):
    assert len(records(copied)) == 7
    args = train_args(tiny_data, tmp_path, 0)
    args[args.index("--num_iter") + 1] = "1"
    main_with(args)
    assert [r["iteration"] for r in records(copied)] == [1]
    err = capsys.readouterr().err
    assert f"warning: {copied} holds an earlier run" in err and "metrics.jsonl" in err and "--resume" in err
    assert checkpoint(copied)["iteration"] == 1
