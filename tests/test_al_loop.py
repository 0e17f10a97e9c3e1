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
    result = run_loop(tiny_data, tmp_path, "--base_calibrator", "nonsense")
    assert result.returncode != 0
    assert "--calibrator nonsense" in result.stderr and "round 0 failed" in result.stderr
    assert not (tmp_path / "random" / "rounds.csv").exists()


def test_bad_flags_exit_2(tiny_data, tmp_path):
    result = run_loop(tiny_data, tmp_path, "--rounds_typo", "3")
    assert result.returncode == 2 and "unknown option --rounds_typo" in result.stderr
