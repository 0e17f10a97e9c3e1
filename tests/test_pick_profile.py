"""tools/pick_profile.py: what each strategy picked, from what an experiment folder recorded."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from data_layer import lmdb_writing
from tools import pick_profile


def write_labels(path, labels):
    lmdb_writing.write_lmdb(str(path), ((b"not decoded here", label, None) for label in labels))


def write_pick(out, cell, name, labels, picked_accuracy, pool_accuracy, picked_confidence, acquisition=None):
    query_set = out / "cells" / cell / "train_data" / name
    write_labels(query_set, labels)
    summary = {"strategy": name.split("_iter_")[0], "accuracy": {"picked": picked_accuracy, "pool": pool_accuracy},
               "mean_confidence": {"picked": picked_confidence, "pool": 0.5}}
    if acquisition:
        summary["acquisition"] = acquisition
    (query_set / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def folder(tmp_path):
    train = tmp_path / "train"
    write_labels(train / "signage", ["ab", "abcdefghij", "abc", "abcd"])  # lengths 2, 10, 3, 4
    out = tmp_path / "exp"
    out.mkdir()
    (out / "experiment.json").write_text(json.dumps({"settings": {"train_data": str(train), "select_data": "signage"}}))
    write_pick(out, "uncali-CE-noise0-seed1", "uncali_iter_1", ["abcdefghij", "abcdefghijkl"], 0.0, 0.4, 0.01)
    write_pick(out, "uncali-CE-noise0-seed2", "uncali_iter_1", ["ab", "abcdefghij"], 0.5, 0.6, 0.03)
    write_pick(out, "uncali-CE-noise0-power-seed1", "uncali_iter_1", ["abc"], 1.0, 0.4, 0.9, acquisition="power")
    return out


def test_rows_pool_the_seeds_of_a_strategy_and_keep_acquisitions_apart(folder):
    rows = {(row["strategy"], row["round"]): row for row in pick_profile.profile([str(folder)])}
    assert set(rows) == {("uncali", 1), ("uncali (power)", 1)}
    topk = rows[("uncali", 1)]
    assert topk["seeds"] == 2
    assert topk["picked_accuracy"] == pytest.approx(25.0)  # mean of 0% and 50%
    assert topk["pool_accuracy"] == pytest.approx(50.0)
    assert topk["picked_confidence"] == pytest.approx(0.02)
    assert topk["picked_length"] == pytest.approx((10 + 12 + 2 + 10) / 4)
    assert topk["picked_long_share"] == pytest.approx(75.0)
    assert topk["pool_length"] == pytest.approx((2 + 10 + 3 + 4) / 4)
    assert topk["pool_long_share"] == pytest.approx(25.0)
    assert rows[("uncali (power)", 1)]["picked_length"] == 3


def test_a_folder_that_is_no_experiment_is_one_error(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", "pick_profile.py"), "--out",
                             str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --out {tmp_path}: no experiment.json there; name a tools/experiment.py " \
                                    "output folder"


def test_the_csv_holds_the_rows_the_table_prints(folder, tmp_path, capsys):
    target = tmp_path / "profile.csv"
    pick_profile.main(pick_profile.get_args_parser().parse_args(["--out", str(folder), "--csv", str(target)]))
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| uncali")]
    assert table == ["| uncali | 1 | 2 | 25.0 / 50.0 | 0.020 | 8.5 / 4.8 | 75.0 / 25.0 |",
                     "| uncali (power) | 1 | 1 | 100.0 / 40.0 | 0.900 | 3.0 / 4.8 | 0.0 / 25.0 |"]
    lines = target.read_text().splitlines()
    assert lines[0].startswith("strategy,round,seeds,picked_accuracy") and len(lines) == 3
    assert lines[1].startswith("uncali,1,2,25.0,50.0,")
