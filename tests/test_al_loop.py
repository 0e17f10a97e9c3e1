"""scripts/al_loop.sh: two short rounds on tiny data, end to end."""
import csv
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

ARCH = ("--Transformation None --FeatureExtraction VGG --SequenceModeling BiLSTM --Prediction CTC "
        "--output_channel 32 --hidden_size 16 --adam --lr 0.001")


def run_loop(tiny_data, out, *extra):
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", os.path.join(REPO_ROOT, "scripts", "al_loop.sh"),
                           "--train_data", tiny_data.train, "--valid_data", tiny_data.valid,
                           "--label_ratio", "0.5", "--rounds", "1", "--num_query", "15", "--base_iters", "2",
                           "--iters", "2", "--val_interval", "1", "--batch_size", "8", "--workers", "0",
                           "--arch", ARCH, "--out", str(out), *extra],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_two_rounds_write_the_rounds_table_and_learning_curve(tiny_data, tmp_path):
    result = run_loop(tiny_data, tmp_path, "--query", "uncali", "--al_calibrator", "boost_soft")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "uncali"
    with open(run / "rounds.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["round"] for r in rows] == ["0", "1"]
    # round 1 trains on the labelled half of both sets plus the 15 queried samples
    assert int(rows[1]["queried"]) == 15 and rows[0]["queried"] == "0"
    assert int(rows[1]["labelled"]) == int(rows[0]["labelled"]) + 15
    assert 0 <= float(rows[1]["picked_accuracy"]) <= 1 and rows[0]["picked_accuracy"] == ""
    for row in rows:
        assert 0 <= float(row["synth_eval:accuracy"]) <= 100 and 0 <= float(row["total:ece"]) <= 1
        assert int(row["seconds"]) >= 0
    assert (run / "rounds.md").read_text().startswith("| round |")
    png = (tmp_path / "learning_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # the query set lives in the run's own train root, beside links to the base sets
    assert (run / "train_data" / "uncali_iter_1" / "summary.json").is_file()
    assert os.path.islink(run / "train_data" / "CVPR2016")
    assert "rounds:" in result.stdout


def test_a_failing_step_stops_the_loop_with_its_message(tiny_data, tmp_path):
    # a model file that is not a model: caught only when the finished round 0 is evaluated again
    result = run_loop(tiny_data, tmp_path, "--rounds", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    best = tmp_path / "random" / "models" / "round0" / "best_accuracy.pth"
    best.write_bytes(b"not a checkpoint")
    result = run_loop(tiny_data, tmp_path, "--rounds", "1")
    assert result.returncode == 1
    assert "round 0 failed" in result.stderr and "test.py" in result.stderr
    assert not (tmp_path / "random" / "train_data" / "random_iter_1").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--rounds", "abc", "--rounds abc: give a whole number"),
    ("--rounds", "-1", "--rounds -1: give a whole number"),
    ("--num_query", "0", "--num_query 0: give a whole number of at least 1"),
    ("--label_ratio", "1.5", "--label_ratio 1.5: give a share in (0, 1]"),
    ("--noise_ratio", "nan", "--noise_ratio nan"),
    ("--noise_model", "typo", "--noise_model typo: unknown; choose one of substitute, confusable, edit, mixed"),
    ("--noise_scope", "seed", "--noise_scope seed: choose queried or all"),
    ("--relabel_ratio", "1.5", "--relabel_ratio 1.5: give a share of the budget in [0, 1]"),
    ("--relabel_policy", "vote", "--relabel_policy vote: unknown; choose one of replace, agree"),
    ("--query", "nosuch", "nosuch"),
    ("--batch_ratio", "0.5-0.3-0.2", "--batch_ratio"),
    ("--al_calibrator", "nonsense", "--calibrator nonsense"),
])
def test_every_setting_is_checked_before_the_first_command(tiny_data, tmp_path, flag, value, message):
    result = run_loop(tiny_data, tmp_path, flag, value)
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(errors) == 1 and errors[0].startswith("error:"), result.stderr[-2000:]
    assert message in errors[0]
    assert "+ " not in result.stdout  # no step ran
    assert os.listdir(tmp_path) == []  # and no run folder was made


@pytest.mark.slow
def test_the_same_command_again_continues_the_run(tiny_data, tmp_path):
    first = run_loop(tiny_data, tmp_path, "--rounds", "0")
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "random"
    model = run / "models" / "round0" / "best_accuracy.pth"
    stamp = model.stat().st_mtime_ns
    again = run_loop(tiny_data, tmp_path, "--rounds", "1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "round 0: trained already" in again.stdout and "round 0: evaluated already" in again.stdout
    assert model.stat().st_mtime_ns == stamp  # round 0 was not trained again
    with open(run / "rounds.csv", encoding="utf-8") as f:
        assert [r["round"] for r in csv.DictReader(f)] == ["0", "1"]
    assert len((run / "round_times.txt").read_text().splitlines()) == 2
    # a round killed after a checkpoint: no train_summary.json yet, so it resumes from last.pth
    (run / "models" / "round1" / "train_summary.json").unlink()
    resumed = run_loop(tiny_data, tmp_path, "--rounds", "1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "round 1: queried already" in resumed.stdout
    assert f"--resume {run}/models/round1/last.pth" in resumed.stdout
    assert (run / "models" / "round1" / "train_summary.json").is_file()
    changed = run_loop(tiny_data, tmp_path, "--rounds", "1", "--seed", "5")
    assert changed.returncode == 2 and "other settings (--seed)" in changed.stderr
    # the annotator's scope reaches round 1's sampling and training, and is part of the run's settings
    assert again.stdout.count("--noise_scope queried") == 2
    scoped = run_loop(tiny_data, tmp_path, "--rounds", "1", "--noise_scope", "all")
    assert scoped.returncode == 2 and "other settings (--noise_scope)" in scoped.stderr


def test_bad_flags_exit_2(tiny_data, tmp_path):
    result = run_loop(tiny_data, tmp_path, "--rounds_typo", "3")
    assert result.returncode == 2 and "unknown option --rounds_typo" in result.stderr
