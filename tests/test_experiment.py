"""measurement/comparison.py (statistics and tables against hand-computed numbers) and tools/experiment.py
(checks, and end to end on tiny data: two strategies x two seeds x one round)."""
import csv
import fcntl
import functools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import types

import pytest

from conftest import REPO_ROOT

from measurement import comparison
from tools import experiment

T_975_DF1 = 12.706204736174707  # tan(pi * 0.475): the t quantile with one degree of freedom

ARCH = ("--Transformation None --FeatureExtraction VGG --SequenceModeling BiLSTM --Prediction CTC "
        "--output_channel 32 --hidden_size 16 --adam --lr 0.001")
CELLS = ["random-CE-noise0-seed1111", "random-CE-noise0-seed2222",
         "uncali-CE-noise0-seed1111", "uncali-CE-noise0-seed2222"]


# ---------------------------------------------------------------------------------------------
# statistics


def test_mean_std_is_the_sample_std_and_none_for_one_value():
    mean, std = comparison.mean_std([1, 2, 3, 4])
    assert mean == 2.5 and std == pytest.approx(math.sqrt(5 / 3))
    assert comparison.mean_std([7]) == (7.0, None)
    with pytest.raises(ValueError):
        comparison.mean_std([])


@pytest.mark.parametrize("df, expected", [(1, 12.706), (2, 4.303), (10, 2.228), (30, 2.042)])
def test_t_quantile_matches_the_tables(df, expected):
    assert comparison.t_quantile(0.975, df) == pytest.approx(expected, abs=5e-4)


def test_t_quantile_matches_closed_forms_and_is_symmetric():
    # df = 1 is the Cauchy distribution; df = 2 has t = (2p - 1) / sqrt(2p(1 - p))
    for p in (0.6, 0.9, 0.975, 0.999):
        assert comparison.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
        assert comparison.t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
        assert comparison.t_quantile(1 - p, 7) == pytest.approx(-comparison.t_quantile(p, 7), rel=1e-12)
    assert comparison.t_quantile(0.5, 3) == 0.0
    assert comparison.t_cdf(0.0, 4) == 0.5
    assert comparison.t_cdf(2.228138852, 10) == pytest.approx(0.975, abs=1e-9)
    assert comparison.regularized_incomplete_beta(2, 3, 0.4) == pytest.approx(0.5248, abs=1e-12)  # 1-0.6^4-4*0.4*0.6^3


def test_paired_difference_with_a_t_interval():
    mean, low, high = comparison.paired_difference([31, 42, 53], [30, 40, 50])  # differences 1, 2, 3
    half = 4.302652729749464 * 1.0 / math.sqrt(3)  # t(0.975, 2) * std / sqrt(n), std = 1
    assert mean == 2.0 and low == pytest.approx(2 - half) and high == pytest.approx(2 + half)
    assert comparison.paired_difference([5], [3]) == (2.0, None, None)
    assert comparison.paired_difference([], []) == (None, None, None)
    assert comparison.paired_difference([4, 6], [4, 6]) == (0.0, 0.0, 0.0)


def test_alc_is_the_trapezoid_area_over_the_labelled_span():
    # (100 * (10 + 20) / 2 + 200 * (20 + 40) / 2) / 300 = (1500 + 6000) / 300
    assert comparison.alc([100, 200, 400], [10, 20, 40]) == pytest.approx(25.0)
    assert comparison.alc([400, 100, 200], [40, 10, 20]) == pytest.approx(25.0)  # any order
    assert comparison.alc([100], [33.0]) == 33.0  # no span: the accuracy itself


def test_labels_to_reach_interpolates_the_first_crossing():
    labelled, accuracy = [100, 200, 300], [10, 30, 20]
    assert comparison.labels_to_reach(labelled, accuracy, 20) == pytest.approx(150.0)
    assert comparison.labels_to_reach(labelled, accuracy, 25) == pytest.approx(175.0)  # not the later 20->... one
    assert comparison.labels_to_reach(labelled, accuracy, 30) == 200.0
    assert comparison.labels_to_reach(labelled, accuracy, 5) == 100.0  # the first point already reaches it
    assert comparison.labels_to_reach(labelled, accuracy, 10) == 100.0
    assert comparison.labels_to_reach(labelled, accuracy, 30.5) is None


def make_records(curves, labelled=(100, 150, 200), calibrator="CE", noise=0.0):
    """{(query, seed): [accuracy per round]} -> records (ece = accuracy / 1000)."""
    return [{"query": q, "calibrator": calibrator, "noise": noise, "seed": seed, "round": k,
             "labelled": labelled[k], "accuracy": float(a), "ece": a / 1000}
            for (q, seed), accuracies in curves.items() for k, a in enumerate(accuracies)]


CURVES = {("random", 1): [10, 20, 30], ("random", 2): [12, 18, 26],
          ("uncali", 1): [10, 25, 40], ("uncali", 2): [12, 24, 38],
          ("margin", 1): [10, 15, 20], ("margin", 2): [12, 17, 24],
          ("entropy", 1): [10, 21, 33], ("entropy", 2): [12, 19]}  # seed 2 of entropy is a round behind


def test_aggregate_by_hand():
    rows = comparison.aggregate(make_records(CURVES))
    assert [(r["query"], r["round"]) for r in rows][:4] == [("random", 0), ("random", 1), ("random", 2), ("uncali", 0)]
    random2 = rows[2]
    assert random2["seeds"] == 2 and random2["labelled"] == 200
    assert random2["accuracy_mean"] == 28 and random2["accuracy_std"] == pytest.approx(math.sqrt(8))
    assert random2["ece_mean"] == pytest.approx(0.028) and random2["ece_std"] == pytest.approx(math.sqrt(8) / 1000)
    entropy2 = [r for r in rows if r["query"] == "entropy" and r["round"] == 2][0]
    assert entropy2["seeds"] == 1 and entropy2["accuracy_mean"] == 33 and entropy2["accuracy_std"] is None


def test_summarize_by_hand():
    rows = {r["query"]: r for r in comparison.summarize(make_records(CURVES))}
    uncali = rows["uncali"]
    assert uncali["seeds"] == 2
    assert uncali["final_accuracy_mean"] == 39 and uncali["final_accuracy_std"] == pytest.approx(math.sqrt(2))
    # ALC seed 1: (50 * 35/2 + 50 * 65/2) / 100 = 25; seed 2: (50 * 36/2 + 50 * 62/2) / 100 = 24.5
    assert uncali["alc_mean"] == pytest.approx(24.75)
    assert uncali["labels_saved_vs_random"] is None  # random's mean curve (11, 19, 28) never reaches 39
    # the other way round: uncali's mean curve (11, 24.5, 39) reaches random's final 28 at
    # 150 + (28 - 24.5) / (39 - 24.5) * 50 labelled, that many fewer than random's 200
    assert uncali["labels_saved_at_random_final"] == pytest.approx(200 - (150 + 3.5 / 14.5 * 50))
    # paired differences 40-30 = 10 and 38-26 = 12: mean 11, std sqrt(2), se 1
    assert uncali["diff_vs_random_mean"] == pytest.approx(11)
    assert uncali["diff_vs_random_low"] == pytest.approx(11 - T_975_DF1)
    assert uncali["diff_vs_random_high"] == pytest.approx(11 + T_975_DF1)
    margin = rows["margin"]
    # final 22: random's mean curve crosses it between (150, 19) and (200, 28): 150 + 3/9 * 50
    assert margin["labels_saved_vs_random"] == pytest.approx(150 + 50 / 3 - 200)
    assert margin["labels_saved_at_random_final"] is None  # margin's mean curve (11, 16, 22) never reaches 28
    # differences -10 and -2: mean -6, std sqrt(32), se 4
    assert margin["diff_vs_random_mean"] == pytest.approx(-6)
    assert margin["diff_vs_random_low"] == pytest.approx(-6 - 4 * T_975_DF1)
    random = rows["random"]
    assert random["labels_saved_vs_random"] == 0 and random["diff_vs_random_mean"] == 0
    assert random["labels_saved_at_random_final"] == 0
    assert random["diff_vs_random_low"] == 0 and random["alc_mean"] == pytest.approx((20 + 18.5) / 2)
    entropy = rows["entropy"]  # only seed 1 reached round 2: one seed, no std, no interval
    assert entropy["seeds"] == 1 and entropy["final_accuracy_mean"] == 33 and entropy["final_accuracy_std"] is None
    assert entropy["alc_mean"] == pytest.approx((50 * 31 / 2 + 50 * 54 / 2) / 100)
    assert entropy["diff_vs_random_mean"] == 3 and entropy["diff_vs_random_low"] is None
    # random's mean curve reaches 33 never
    assert entropy["labels_saved_vs_random"] is None


def test_pairs_compare_strategies_that_differ_in_one_setting_by_hand():
    # uncali and random under CE at noise 0, and uncali under boost_soft at noise 0.3 and 0; the two
    # noisy boost_soft loops differ from the rest in two settings or in one
    curves = {("random", 1): [10, 20], ("random", 2): [12, 18], ("uncali", 1): [10, 25], ("uncali", 2): [12, 24]}
    records = (make_records(curves, labelled=(100, 150)) +
               make_records({k: v for k, v in curves.items() if k[0] == "uncali"}, labelled=(100, 150),
                            calibrator="boost_soft", noise=0.3) +
               make_records({("uncali", 1): [10, 26], ("uncali", 2): [12, 23], ("uncali", 3): [9, 30]},
                            labelled=(100, 150), calibrator="boost_soft"))
    rows = comparison.pairs(records)
    found = {(r["axis"], r["calibrator"], r["noise"], r["round"]): r for r in rows}
    # round 0 and round 1 of each pair; random/uncali under boost_soft at 0.3 is no pair (no random there),
    # nor is CE-0 against boost_soft-0.3 (two settings)
    assert sorted(found) == sorted((axis, cal, noise, k) for axis, cal, noise in
                                   (("query", "CE", 0.0), ("calibrator", "boost_soft", 0.0),
                                    ("noise", "boost_soft", 0.3)) for k in (0, 1))
    # uncali - random, round 1: differences 5 and 6 (mean 5.5, std sqrt(0.5), se 0.5); ECE is accuracy/1000
    query = found["query", "CE", 0.0, 1]
    assert (query["query"], query["value"], query["reference"], query["seeds"]) == ("uncali", "uncali", "random", 2)
    assert query["accuracy_diff_mean"] == pytest.approx(5.5)
    assert query["accuracy_diff_low"] == pytest.approx(5.5 - 0.5 * T_975_DF1)
    assert query["accuracy_diff_high"] == pytest.approx(5.5 + 0.5 * T_975_DF1)
    assert query["ece_diff_mean"] == pytest.approx(0.0055)
    # boost_soft - CE (the reference), seeds 1 and 2 only (CE has no seed 3): 26-25, 23-24
    calibrator = found["calibrator", "boost_soft", 0.0, 1]
    assert (calibrator["value"], calibrator["reference"], calibrator["seeds"]) == ("boost_soft", "CE", 2)
    assert calibrator["accuracy_diff_mean"] == pytest.approx(0)
    assert calibrator["accuracy_diff_high"] == pytest.approx(T_975_DF1 * 1.0)  # std sqrt(2), se 1
    # noise 0.3 against noise 0 under boost_soft: 25-26, 24-23
    noise = found["noise", "boost_soft", 0.3, 1]
    assert (noise["value"], noise["reference"], noise["accuracy_diff_mean"]) == (0.3, 0.0, pytest.approx(0))
    # round 0 is the shared base model: no difference, and one seed gives no interval
    assert found["query", "CE", 0.0, 0]["accuracy_diff_mean"] == 0
    one = comparison.pairs([r for r in records if r["seed"] == 1])
    assert all(r["seeds"] == 1 and r["accuracy_diff_low"] is None for r in one)


def test_summarize_without_random_leaves_the_vs_random_columns_empty():
    rows = comparison.summarize(make_records({k: v for k, v in CURVES.items() if k[0] != "random"}))
    for row in rows:
        assert row["labels_saved_vs_random"] is None and row["diff_vs_random_mean"] is None
        assert row["diff_vs_random_low"] is None and row["diff_vs_random_high"] is None


def test_tables_and_plots_are_written(tmp_path):
    records = make_records(CURVES) + make_records(CURVES, noise=0.3)
    comparison_rows, summary_rows = comparison.write_tables(str(tmp_path), records)
    with open(tmp_path / "comparison.csv", encoding="utf-8") as f:
        table = list(csv.reader(f))
    assert tuple(table[0]) == comparison.COMPARISON_COLUMNS and len(table) == 1 + len(comparison_rows)
    assert table[1] == ["random", "CE", "0", "substitute", "0", "topk", "", "0", "100", "2", "11", "1.414214", "0.011",
                        "0.001414"]
    with open(tmp_path / "summary.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == comparison.SUMMARY_COLUMNS
    entropy = [r for r in rows if r["query"] == "entropy"][0]
    assert entropy["final_accuracy_std"] == "" and entropy["diff_vs_random_low"] == ""
    assert [r["noise"] for r in rows] == ["0"] * 4 + ["0.3"] * 4
    markdown = (tmp_path / "summary.md").read_text().splitlines()
    assert markdown[0].startswith("| query | calibrator | noise | noise_model | relabel_ratio | acquisition | "
                                  "sampling_args | seeds |")
    assert len(markdown) == 2 + 8
    # pairs: per noise ratio the 6 pairs of the 4 queries, and per query the two noise ratios, 3 rounds each
    # (entropy's round 2 has seed 1 alone)
    with open(tmp_path / "pairs.csv", encoding="utf-8") as f:
        pair_rows = list(csv.DictReader(f))
    assert tuple(pair_rows[0]) == comparison.PAIR_COLUMNS and len(pair_rows) == (2 * 6 + 4) * 3
    assert (tmp_path / "pairs.md").read_text().startswith("| axis | value | reference |")
    assert "| uncali | CE | 0 | substitute | 0 | topk |  | 2 | 39 | 1.41 | 24.75 |  | 38 | 11 | -1.71 | 23.71 |" in markdown
    png = b"\x89PNG\r\n\x1a\n"
    assert comparison.plot_learning_curves(comparison_rows, str(tmp_path / "curves.png")) is not None
    assert (tmp_path / "curves.png").read_bytes()[:8] == png
    assert comparison.plot_noise(summary_rows, str(tmp_path / "noise.png")) is not None
    assert (tmp_path / "noise.png").read_bytes()[:8] == png
    assert comparison.plot_noise([r for r in summary_rows if r["noise"] == 0], str(tmp_path / "one.png")) is None
    assert not (tmp_path / "one.png").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries left


# ---------------------------------------------------------------------------------------------
# tools/experiment.py: settings


def base_args(tiny_data, out, *extra):
    return ["--out", str(out), "--queries", "random,uncali", "--calibrators", "CE", "--noise", "0",
            "--seeds", "1111,2222", "--base_calibrator", "CE", "--train_data", tiny_data.train,
            "--valid_data", tiny_data.valid, "--label_ratio", "0.5", "--rounds", "1", "--num_query", "15",
            "--base_iters", "2", "--iters", "2", "--val_interval", "1", "--batch_size", "8", "--workers", "0",
            "--arch", ARCH, *extra]


def error_lines(capsys):
    captured = capsys.readouterr()
    return [line for line in captured.err.splitlines() if line.strip()]


def test_noise_scope_reaches_the_rounds_training_and_sampling_and_is_recorded(tiny_data, tmp_path, monkeypatch,
                                                                             capsys):
    out = tmp_path / "scoped"
    _, settings = experiment.parse(base_args(tiny_data, out, "--noise", "0.3", "--noise_scope", "all"))
    assert settings["noise_scope"] == "all"
    cell = next(c for c in experiment.build_units(str(out), settings)[1] if c.query == "uncali")
    commands = []

    def record(command, log):
        commands.append(command)
        if "data_sampling.py" in command[1]:  # what the query step leaves for the round's training
            os.makedirs(cell.query_set(1), exist_ok=True)
            with open(os.path.join(cell.query_set(1), "summary.json"), "w") as f:
                json.dump({"next_select_data": "CVPR2016-NIPS2014-uncali_iter_1", "next_batch_ratio": "0.3-0.3-0.4"}, f)
        return True

    monkeypatch.setattr(experiment, "run_logged", record)
    experiment.run_round(cell, 1, settings)
    sampling, training = commands[0], commands[1]
    assert "data_sampling.py" in sampling[1] and "train.py" in training[1]
    for command in (sampling, training):
        assert command[command.index("--noise_scope") + 1] == "all"
        assert command[command.index("--noise_ratio") + 1] == "0.3"
    # an experiment.json written before the setting ran the default
    recorded = {k: v for k, v in settings.items() if k != "noise_scope"}
    assert experiment.upgrade_recorded(recorded)["noise_scope"] == "queried"
    assert experiment.main(base_args(tiny_data, tmp_path / "bad", "--noise_scope", "seed")) == 2
    assert "--noise_scope seed: choose from queried, all" in error_lines(capsys)[0]


@pytest.mark.parametrize("extra, message", [
    (["--queries", "random,nosuch"], "--queries nosuch: unknown strategy"),
    (["--queries", ""], "--queries '': give one or more"),
    (["--queries", "random,random"], "'random' appears twice"),
    (["--calibrators", "nonsense"], "--calibrators nonsense: unknown calibrator"),
    (["--calibrators", "CE,CTC", "--arch", ARCH.replace("CTC", "Attn")],
     "--calibrators CTC: has no form for --Prediction Attn"),
    (["--base_calibrator", "nonsense"], "--base_calibrator nonsense"),
    (["--noise", "0,1.5"], "--noise 1.5: give a share in [0, 1]"),
    (["--noise", "nan"], "--noise nan"),
    (["--noise_models", "substitute,typo"], "--noise_models typo: unknown noise model; choose from substitute, "
                                            "confusable, edit, mixed"),
    (["--noise_models", "edit,edit"], "--noise_models edit,edit: 'edit' appears twice"),
    (["--seeds", "1111,abc"], "--seeds abc: give whole numbers"),
    (["--seeds", "1,01"], "--seeds 1,01: a seed appears twice"),
    (["--rounds", "-1"], "--rounds -1: give a whole number"),
    (["--iters", "0"], "--iters 0: give a whole number of at least 1"),
    (["--num_query", "0"], "--num_query 0: give a whole number of at least 1"),
    (["--label_ratio", "1.5"], "--label_ratio 1.5: give a share in (0, 1]"),
    (["--batch_ratio", "0.5-0.3-0.2"], "--batch_ratio 0.5-0.3-0.2"),
    (["--select_data", "CVPR2016-Nope"], "--select_data Nope"),
    (["--valid_data", "/nonexistent/valid"], "--valid_data /nonexistent/valid: no such folder"),
    (["--arch", "--Prediction 'CTC"], "--arch"),
])
def test_bad_settings_are_one_error_line_and_nothing_is_made(tiny_data, tmp_path, capsys, no_runs, extra, message):
    out = tmp_path / "exp"
    assert experiment.main(base_args(tiny_data, out, *extra)) == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and errors[0].startswith("error:") and message in errors[0], errors
    assert not out.exists()


def test_a_grid_file_holds_the_settings_and_flags_override_it(tiny_data, tmp_path, capsys, no_runs):
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"out: {tmp_path / 'from-yaml'}\nqueries: [random, margin]\nnoise: [0, 0.3]\n"
                    f"seeds: 1,2\ntrain_data: {tiny_data.train}\nvalid_data: {tiny_data.valid}\n"
                    f"num_query: 15\narch: {ARCH}\ncalibrators: CE\n")
    out, settings = experiment.parse(["--grid", str(grid), "--seeds", "3"])
    assert out == str(tmp_path / "from-yaml")
    assert settings["queries"] == ["random", "margin"] and settings["noise"] == [0.0, 0.3]
    assert settings["seeds"] == [3] and settings["num_query"] == 15 and settings["query_ratio"] is None
    assert settings["test_data"] == os.path.abspath(tiny_data.valid)  # defaults to --valid_data
    grid.write_text("queries: [random]\nrounds_typo: 3\n")
    assert experiment.main(["--grid", str(grid), "--out", str(tmp_path / "x")]) == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and "unknown setting 'rounds_typo'" in errors[0]
    assert experiment.main(["--grid", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "x")]) == 2
    assert "no such file" in error_lines(capsys)[0]


def test_the_preset_grid_is_valid(tiny_data):
    """configs/compare.yaml (make compare) parses and passes the checks (data paths swapped for
    the tiny data, since the embedded data may not be built)."""
    values = experiment.read_grid_file(os.path.join(REPO_ROOT, "configs", "compare.yaml"))
    raw = {name: default for name, (default, _) in experiment.SETTINGS.items()}
    raw.update(values)
    raw.pop("out", None)
    for name in ("train_data", "valid_data", "test_data"):
        assert values[name].startswith("data/")
    raw.update(train_data=tiny_data.train, valid_data=tiny_data.valid, test_data=tiny_data.valid)
    settings = experiment.resolve_settings(raw)
    assert "random" in settings["queries"] and len(settings["queries"]) >= 2
    assert {"CE", "boost_soft"} <= set(settings["calibrators"]) and len(settings["noise"]) >= 2


def test_noise_models_are_a_grid_axis_that_keeps_the_default_cells_names(tiny_data, tmp_path, no_runs):
    out, settings = experiment.parse(base_args(tiny_data, tmp_path / "exp", "--noise", "0,0.3"))
    assert settings["noise_models"] == ["substitute"]  # the default
    names = [cell.name for cell in experiment.build_units(out, settings)[1]]
    assert names[:4] == ["random-CE-noise0-seed1111", "random-CE-noise0-seed2222", "random-CE-noise0.3-seed1111",
                         "random-CE-noise0.3-seed2222"]
    _, grown = experiment.parse(base_args(tiny_data, tmp_path / "exp", "--noise", "0,0.3",
                                          "--noise_models", "substitute,mixed"))
    cells = experiment.build_units(out, grown)[1]
    # the default model keeps its names; another is named; ratio 0 (no label corrupted) runs once
    assert [c.name for c in cells if c.query == "random" and c.seed == 1111] == [
        "random-CE-noise0-seed1111", "random-CE-noise0.3-seed1111", "random-CE-noise0.3-mixed-seed1111"]
    assert [c.noise_model for c in cells if c.query == "random" and c.seed == 1111] == ["substitute", "substitute",
                                                                                         "mixed"]
    # an experiment.json written before --noise_models ran substitute: it continues and may gain models
    recorded = {k: v for k, v in settings.items() if k != "noise_models"}
    merged = experiment.merge_with_recorded(out, recorded, grown)
    assert merged["noise_models"] == ["substitute", "mixed"]
    assert experiment.merge_with_recorded(out, recorded, settings)["noise_models"] == ["substitute"]
    with pytest.raises(experiment.ConfigError, match=r"--noise_models \(without substitute\)"):
        experiment.merge_with_recorded(out, {**recorded, "noise_models": ["substitute", "mixed"]},
                                       {**grown, "noise_models": ["mixed"]})
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"noise_models: [edit, confusable]\ntrain_data: {tiny_data.train}\nvalid_data: {tiny_data.valid}\n"
                    f"arch: {ARCH}\ncalibrators: CE\nnum_query: 15\n")
    assert experiment.parse(["--grid", str(grid), "--out", str(out)])[1]["noise_models"] == ["edit", "confusable"]


def test_tables_keep_noise_models_apart_and_compare_each_with_its_own_random():
    records = make_records(CURVES) + [{**r, "noise_model": "edit"} for r in make_records(CURVES, noise=0.3)]
    records += [{**r, "noise_model": "mixed", "accuracy": r["accuracy"] - 5}
                for r in make_records(CURVES, noise=0.3)]
    rows = comparison.summarize(records)
    assert [(r["noise"], r["noise_model"]) for r in rows] == [(0.0, "substitute")] * 4 + [(0.3, "edit")] * 4 + [
        (0.3, "mixed")] * 4
    by = {(r["query"], r["noise_model"]): r for r in rows}
    # the same curves 5 points lower, against a random 5 points lower: the same paired difference
    assert by[("uncali", "mixed")]["diff_vs_random_mean"] == pytest.approx(by[("uncali", "edit")]["diff_vs_random_mean"])
    assert by[("uncali", "mixed")]["final_accuracy_mean"] == pytest.approx(by[("uncali", "edit")]["final_accuracy_mean"] - 5)
    assert {r["noise_model"] for r in comparison.aggregate(records)} == {"substitute", "edit", "mixed"}


def test_the_noise_plot_draws_one_line_per_calibrator_and_model(tmp_path):
    records = make_records(CURVES) + [{**r, "noise_model": m} for m in ("edit", "mixed")
                                      for r in make_records(CURVES, noise=0.3)]
    rows = comparison.summarize(records)
    assert comparison.plot_noise(rows, str(tmp_path / "noise.png")) is not None
    assert (tmp_path / "noise.png").read_bytes()[:4] == b"\x89PNG"
    assert comparison.plot_learning_curves(comparison.aggregate(records), str(tmp_path / "curves.png")) is not None


def test_relabel_ratios_and_acquisitions_are_grid_axes_named_only_when_not_the_default(tiny_data, tmp_path, no_runs):
    out, settings = experiment.parse(base_args(tiny_data, tmp_path / "exp"))
    assert settings["relabel_ratios"] == [0.0] and settings["acquisitions"] == ["topk"]
    assert settings["sampling_args"] == ""
    before = [cell.name for cell in experiment.build_units(out, settings)[1]]
    assert before == ["random-CE-noise0-seed1111", "random-CE-noise0-seed2222", "uncali-CE-noise0-seed1111",
                      "uncali-CE-noise0-seed2222"]
    _, grown = experiment.parse(base_args(tiny_data, tmp_path / "exp", "--queries", "random,uncali,cali",
                                          "--relabel_ratios", "0,0.25", "--acquisitions", "topk,softmax",
                                          "--sampling_args", "--acquisition_beta 2"))
    assert grown["relabel_ratios"] == [0.0, 0.25] and grown["sampling_args"] == "--acquisition_beta 2"
    cells = [c for c in experiment.build_units(out, grown)[1] if c.seed == 1111]
    # random: topk alone (the baseline of every acquisition); cali has no score for softmax
    assert [c.name for c in cells] == [
        "random-CE-noise0-seed1111", "random-CE-noise0-relabel0.25-seed1111",
        "uncali-CE-noise0-seed1111", "uncali-CE-noise0-softmax-seed1111",
        "uncali-CE-noise0-relabel0.25-seed1111", "uncali-CE-noise0-relabel0.25-softmax-seed1111",
        "cali-CE-noise0-seed1111", "cali-CE-noise0-relabel0.25-seed1111"]
    # the flags a cell's data_sampling.py call gets
    flags = experiment.sampling_cell_args(grown, "softmax", 0.25, 0.3, "edit")
    assert flags == ["--acquisition", "softmax", "--relabel_ratio", "0.25", "--noise_ratio", "0.3", "--noise_model",
                     "edit", "--noise_scope", "queried", "--acquisition_beta", "2"]
    # an experiment.json written before these settings ran the defaults: it continues and may grow
    recorded = {k: v for k, v in settings.items() if k not in ("relabel_ratios", "acquisitions", "sampling_args")}
    assert experiment.merge_with_recorded(out, recorded, settings) == settings
    merged = experiment.merge_with_recorded(out, recorded, {**settings, "relabel_ratios": [0.0, 0.25],
                                                            "acquisitions": ["topk", "softrank"]})
    assert merged["relabel_ratios"] == [0.0, 0.25] and merged["acquisitions"] == ["topk", "softrank"]
    with pytest.raises(experiment.ConfigError, match="--sampling_args"):
        experiment.merge_with_recorded(out, recorded, grown)


@pytest.mark.parametrize("extra, message", [
    (["--relabel_ratios", "0,1.5"], "--relabel_ratios 1.5: give a share in [0, 1]"),
    (["--relabel_ratios", "0.25,0.250"], "--relabel_ratios 0.25,0.250: a ratio appears twice"),
    (["--acquisitions", "topk,best"], "--acquisitions best: unknown acquisition; choose from topk, "),
    (["--sampling_args", "--relabel_ratio 0.5"], "--relabel_ratio is set by the experiment itself"),
    (["--sampling_args=--acquisition=power"], "--acquisition is set by the experiment itself"),
])
def test_bad_sampling_settings_are_refused(tiny_data, tmp_path, no_runs, extra, message):
    with pytest.raises(experiment.ConfigError) as refused:
        experiment.parse(base_args(tiny_data, tmp_path / "exp", *extra))
    assert message in str(refused.value)


def test_tables_keep_relabel_ratios_and_acquisitions_apart_against_random_of_the_same_relabel_ratio():
    records = make_records(CURVES) + [{**r, "relabel_ratio": 0.25, "accuracy": r["accuracy"] + 2}
                                      for r in make_records(CURVES)]
    records += [{**r, "acquisition": "softmax", "accuracy": r["accuracy"] + 1}
                for r in make_records({k: v for k, v in CURVES.items() if k[0] == "uncali"})]
    rows = comparison.summarize(records)
    by = {(r["query"], r["relabel_ratio"], r["acquisition"]): r for r in rows}
    assert len(rows) == 4 + 4 + 1
    # relabel 0.25: every curve 2 points up, random's too: the same paired difference as at 0
    assert by[("uncali", 0.25, "topk")]["final_accuracy_mean"] == 41
    assert by[("uncali", 0.25, "topk")]["diff_vs_random_mean"] == pytest.approx(11)
    # softmax: 1 point up against random (topk, relabel 0): differences 11 and 13, mean 12
    assert by[("uncali", 0.0, "softmax")]["diff_vs_random_mean"] == pytest.approx(12)
    table = comparison.csv_text(comparison.aggregate(records), comparison.COMPARISON_COLUMNS).splitlines()
    assert table[0].startswith("query,calibrator,noise,noise_model,relabel_ratio,acquisition,sampling_args,round,")
    assert "uncali,CE,0,substitute,0.25,topk,,2,200,2,41," in "\n".join(table)


def test_an_output_folder_with_other_files_is_refused(tiny_data, tmp_path, capsys, no_runs):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert experiment.main(base_args(tiny_data, out)) == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and "holds files but no experiment.json" in errors[0]
    assert os.listdir(out) == ["notes.txt"]


# ---------------------------------------------------------------------------------------------
# tools/experiment.py: end to end


def run_tool(args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", "experiment.py"), *args],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def grid(tiny_data, tmp_path_factory):
    """One finished grid: random and uncali x CE x noise 0 x seeds 1111, 2222 x one round, two rounds
    at a time (the tests that run it again run one at a time, and must find the same tables)."""
    out = tmp_path_factory.mktemp("grid") / "exp"
    start = time.time()
    result = run_tool([*base_args(tiny_data, out), "--jobs", "2"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return types.SimpleNamespace(out=out, result=result, seconds=time.time() - start,
                                 args=lambda o: base_args(tiny_data, o))


def read_csv(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def snapshot(folder):
    return {os.path.join(d, n): os.stat(os.path.join(d, n)).st_mtime_ns
            for sub in ("base", "cells") for d, _, names in os.walk(os.path.join(folder, sub)) for n in names}


@pytest.mark.slow
def test_the_grid_writes_one_row_per_round_with_both_seeds(grid):
    rows = read_csv(grid.out / "comparison.csv")
    assert tuple(rows[0]) == comparison.COMPARISON_COLUMNS
    assert [(r["query"], r["calibrator"], r["noise"], r["round"]) for r in rows] == [
        ("random", "CE", "0", "0"), ("random", "CE", "0", "1"), ("uncali", "CE", "0", "0"), ("uncali", "CE", "0", "1")]
    assert all(r["seeds"] == "2" for r in rows)
    assert int(rows[1]["labelled"]) == int(rows[0]["labelled"]) + 15 == int(rows[3]["labelled"])
    for row in rows:
        assert 0 <= float(row["accuracy_mean"]) <= 100 and 0 <= float(row["ece_mean"]) <= 1
        assert row["accuracy_std"] != "" and row["ece_std"] != ""
    summary = read_csv(grid.out / "summary.csv")
    assert tuple(summary[0]) == comparison.SUMMARY_COLUMNS
    assert [(r["query"], r["seeds"]) for r in summary] == [("random", "2"), ("uncali", "2")]
    assert (grid.out / "comparison.md").read_text().startswith("| query | calibrator |")
    assert (grid.out / "summary.md").read_text().startswith("| query | calibrator |")
    assert (grid.out / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not (grid.out / "noise.png").exists()  # one noise ratio
    progress = [line for line in grid.result.stdout.splitlines() if line.startswith("[")]
    # two at a time, so in the order they finished; a cell's round after its seed's base model
    assert [line.split("]")[0] for line in progress] == [f"[{n}/6" for n in range(1, 7)]
    finished = [line.split("] ")[1].split(":")[0] for line in progress]
    assert sorted(finished) == ["base seed1111-CE round 0", "base seed2222-CE round 0"] + [
        f"cell {cell} round 1" for cell in CELLS]
    for cell in CELLS:
        seed = cell.rsplit("seed", 1)[1]
        assert finished.index(f"base seed{seed}-CE round 0") < finished.index(f"cell {cell} round 1")
    assert all(": test accuracy " in line for line in progress)
    assert all("elapsed" in line for line in progress) and progress[-1].endswith("done")
    assert all("left" in line for line in progress[:-1])
    settings = json.loads((grid.out / "experiment.json").read_text())["settings"]
    assert settings["queries"] == ["random", "uncali"] and settings["seeds"] == [1111, 2222]
    print(f"grid of 6 rounds in {grid.seconds:.0f} s")


@pytest.mark.slow
def test_the_round0_model_is_trained_once_per_seed(grid):
    assert sorted(os.listdir(grid.out / "base")) == ["seed1111-CE", "seed2222-CE"]
    assert sorted(os.listdir(grid.out / "cells")) == CELLS
    commands = []
    for folder, _, names in os.walk(grid.out):
        commands += [line for n in names if n.endswith(".log")
                     for line in open(os.path.join(folder, n), encoding="utf-8") if line.startswith("=== ") and " $ " in line]
    base_runs = [c for c in commands if "train.py" in c and "--mode base" in c]
    assert len(base_runs) == 2 and sum("--manualSeed 1111" in c for c in base_runs) == 1
    assert sum("train.py" in c for c in commands) == 2 + 4  # and one training per cell round
    for cell in CELLS:
        seed = cell.rsplit("seed", 1)[1]
        assert not (grid.out / "cells" / cell / "models" / "round0").exists()
        query_log = (grid.out / "cells" / cell / "logs" / "round1-query.log").read_text()
        assert f"--saved_model {grid.out}/base/seed{seed}-CE/models/round0/best_accuracy.pth" in query_log
        train_log = (grid.out / "cells" / cell / "logs" / "round1-train.log").read_text()
        assert "--noise_ratio 0.0" in train_log and "--mode al" in train_log
        assert os.path.islink(grid.out / "cells" / cell / "train_data" / "CVPR2016")


def expected_tables(out):
    """comparison and summary rows recomputed by hand from the per-cell files."""
    def read(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    per = {}  # (query, seed) -> [(labelled, accuracy, ece) for rounds 0, 1]
    for cell in CELLS:
        query, seed = cell.split("-")[0], cell.rsplit("seed", 1)[1]
        base = out / "base" / f"seed{seed}-CE"
        points = []
        for model, results in ((base / "models" / "round0", base / "eval" / "round0"),
                               (out / "cells" / cell / "models" / "round1", out / "cells" / cell / "eval" / "round1")):
            total = read(results / "results.json")["total"]
            points.append((read(model / "train_summary.json")["labelled_total"], total["accuracy"], total["ece"]))
        per[(query, seed)] = points
    comparison_rows, summary_rows = {}, {}
    for query in ("random", "uncali"):
        for k in (0, 1):
            acc = [per[(query, s)][k][1] for s in ("1111", "2222")]
            ece = [per[(query, s)][k][2] for s in ("1111", "2222")]
            comparison_rows[(query, k)] = {"labelled": per[(query, "1111")][k][0], "accuracy_mean": sum(acc) / 2,
                                           "accuracy_std": statistics.stdev(acc), "ece_mean": sum(ece) / 2,
                                           "ece_std": statistics.stdev(ece)}
    random_curve = [(comparison_rows[("random", k)]["labelled"], comparison_rows[("random", k)]["accuracy_mean"])
                    for k in (0, 1)]
    for query in ("random", "uncali"):
        finals = [per[(query, s)][1][1] for s in ("1111", "2222")]
        final_mean = sum(finals) / 2
        alcs = [(per[(query, s)][0][1] + per[(query, s)][1][1]) / 2 for s in ("1111", "2222")]  # two points
        (l0, a0), (l1, a1) = random_curve
        if a0 >= final_mean:
            reach = l0
        elif a1 >= final_mean:
            reach = l0 + (final_mean - a0) / (a1 - a0) * (l1 - l0)
        else:
            reach = None
        own = [(comparison_rows[(query, k)]["labelled"], comparison_rows[(query, k)]["accuracy_mean"]) for k in (0, 1)]
        (m0, b0), (m1, b1) = own
        if b0 >= a1:
            own_reach = m0
        elif b1 >= a1:
            own_reach = m0 + (a1 - b0) / (b1 - b0) * (m1 - m0)
        else:
            own_reach = None
        diffs = [per[(query, s)][1][1] - per[("random", s)][1][1] for s in ("1111", "2222")]
        half = T_975_DF1 * statistics.stdev(diffs) / math.sqrt(2)
        summary_rows[query] = {"final_accuracy_mean": final_mean, "final_accuracy_std": statistics.stdev(finals),
                               "alc_mean": sum(alcs) / 2,
                               "labels_saved_vs_random": None if reach is None else reach - l1,
                               "labels_saved_at_random_final": None if own_reach is None else l1 - own_reach,
                               "diff_vs_random_mean": sum(diffs) / 2, "diff_vs_random_low": sum(diffs) / 2 - half,
                               "diff_vs_random_high": sum(diffs) / 2 + half}
    return comparison_rows, summary_rows


def assert_tables_match(out):
    comparison_expected, summary_expected = expected_tables(out)
    rows = read_csv(out / "comparison.csv")
    assert len(rows) == len(comparison_expected)
    for row in rows:
        for column, value in comparison_expected[(row["query"], int(row["round"]))].items():
            assert float(row[column]) == pytest.approx(value, abs=2e-6), (row, column)
    rows = read_csv(out / "summary.csv")
    assert [r["query"] for r in rows] == ["random", "uncali"]
    for row in rows:
        assert row["seeds"] == "2"
        for column, value in summary_expected[row["query"]].items():
            if value is None:
                assert row[column] == "", (row, column)
            else:
                assert float(row[column]) == pytest.approx(value, abs=2e-6), (row, column)


@pytest.mark.slow
def test_the_summary_is_recomputed_by_hand_from_the_cell_results(grid, tmp_path):
    assert_tables_match(grid.out)
    # The tiny models read (nearly) nothing, so give every evaluation other figures and let a second
    # run rebuild the tables from them: 20/24% after round 0; random 30/26% and uncali 25/26% after round 1.
    out = tmp_path / "exp"
    shutil.copytree(grid.out, out, symlinks=True)
    figures = {("base", "seed1111-CE"): (20.0, 0.10), ("base", "seed2222-CE"): (24.0, 0.14),
               ("cells", CELLS[0]): (30.0, 0.05), ("cells", CELLS[1]): (26.0, 0.07),
               ("cells", CELLS[2]): (25.0, 0.20), ("cells", CELLS[3]): (26.0, 0.30)}
    for (kind, name), (accuracy, ece) in figures.items():
        path = out / kind / name / "eval" / ("round0" if kind == "base" else "round1") / "results.json"
        results = json.loads(path.read_text())
        results["total"].update(accuracy=accuracy, ece=ece)
        path.write_text(json.dumps(results))
    result = run_tool(grid.args(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "6 of 6 rounds finished already" in result.stdout
    assert_tables_match(out)
    summary = {r["query"]: r for r in read_csv(out / "summary.csv")}
    # by hand: random's mean curve goes from (112 labelled, 22%) to (127, 28%); uncali ends at 25.5%,
    # reached by random at 112 + 3.5/6 * 15 = 120.75 labelled, 6.25 fewer than uncali's 127
    labelled = int(read_csv(out / "comparison.csv")[0]["labelled"])
    assert float(summary["uncali"]["labels_saved_vs_random"]) == pytest.approx(3.5 / 6 * 15 - 15)
    assert float(summary["uncali"]["final_accuracy_mean"]) == 25.5
    assert float(summary["uncali"]["alc_mean"]) == pytest.approx(((20 + 25) / 2 + (24 + 26) / 2) / 2)
    assert float(summary["uncali"]["diff_vs_random_mean"]) == -2.5  # (25 - 30 + 26 - 26) / 2
    assert float(summary["uncali"]["diff_vs_random_high"]) == pytest.approx(-2.5 + T_975_DF1 * 2.5)
    assert labelled > 0


@pytest.mark.slow
def test_running_again_does_no_training(grid, capsys, no_runs):
    before = snapshot(grid.out)
    tables = {name: (grid.out / name).read_text() for name in ("comparison.csv", "summary.csv")}
    start = time.time()
    result = run_tool(grid.args(grid.out))
    seconds = time.time() - start
    assert result.returncode == 0, result.stderr[-3000:]
    assert "6 of 6 rounds finished already" in result.stdout
    assert not [line for line in result.stdout.splitlines() if line.startswith("[")]  # no round ran
    assert snapshot(grid.out) == before  # no model, log or result was written
    assert {name: (grid.out / name).read_text() for name in tables} == tables
    assert seconds < 60, seconds
    print(f"second run in {seconds:.1f} s")
    # other fixed settings are refused, naming them; nothing changes
    for extra, named in ((["--iters", "3"], "(--iters)"), (["--queries", "random"], "--queries (without uncali)"),
                         (["--rounds", "0"], "--rounds (fewer than 1)"),
                         (["--arch", ARCH + " --lr 0.01"], "(--arch)")):
        assert experiment.main(grid.args(grid.out) + extra) == 2
        errors = error_lines(capsys)
        assert len(errors) == 1 and "holds an experiment made with other settings" in errors[0], errors
        assert named in errors[0], errors
    assert snapshot(grid.out) == before
    # one run per output folder
    with open(grid.out / ".experiment.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert experiment.main(grid.args(grid.out)) == 2
        errors = error_lines(capsys)
        assert len(errors) == 1 and "another tools/experiment.py" in errors[0], errors


def live_members(group):
    """Processes of a process group that are still running (zombies excluded)."""
    members = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(pid))
    return members


@pytest.mark.slow
def test_a_killed_grid_and_a_failed_cell_finish_with_the_same_tables(grid, tmp_path):
    # Start from the grid with the base models and seed 1111's cells done, as a kill would leave it.
    out = tmp_path / "exp"
    shutil.copytree(grid.out, out, symlinks=True)
    for cell in CELLS:
        if cell.endswith("seed2222"):
            shutil.rmtree(out / "cells" / cell)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, "tools", "experiment.py"),
                                    *grid.args(out)], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    target = out / "cells" / "random-CE-noise0-seed2222" / "models" / "round1"
    deadline = time.time() + 180
    while not target.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert target.exists(), (tmp_path / "first.log").read_text()[-3000:]
    process.send_signal(signal.SIGKILL)  # the tool alone: its running child must die with it
    process.wait()
    deadline = time.time() + 15
    while live_members(process.pid) and time.time() < deadline:
        time.sleep(0.1)
    assert live_members(process.pid) == []
    assert not (out / "cells" / "random-CE-noise0-seed2222" / "eval" / "round1" / "results.json").exists()

    # A step that fails: a file where uncali's query set of seed 2222 goes. That cell is reported with
    # its log; the other one finishes; exit status 1.
    obstacle = out / "cells" / "uncali-CE-noise0-seed2222" / "train_data" / "uncali_iter_1"
    obstacle.parent.mkdir(parents=True)
    obstacle.write_text("in the way")
    result = run_tool(grid.args(out))
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    log = out / "cells" / "uncali-CE-noise0-seed2222" / "logs" / "round1-query.log"
    assert f"cell uncali-CE-noise0-seed2222 failed in round 1: see {log}" in result.stderr
    assert "  | " in result.stderr and "error:" in log.read_text()
    assert "1 of 4 cells failed: uncali-CE-noise0-seed2222" in result.stderr
    assert (out / "cells" / "random-CE-noise0-seed2222" / "eval" / "round1" / "results.json").is_file()
    rows = read_csv(out / "comparison.csv")
    assert [r["seeds"] for r in rows] == ["2", "2", "2", "1"]  # uncali round 1: seed 1111 only

    obstacle.unlink()
    result = run_tool(grid.args(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "5 of 6 rounds finished already" in result.stdout
    for name in ("comparison.csv", "summary.csv", "pairs.csv", "comparison.md", "summary.md", "pairs.md"):
        assert (out / name).read_text() == (grid.out / name).read_text(), name


def test_base_from_links_the_finished_round0_models_and_refuses_other_round0_settings(grid, tmp_path, capsys,
                                                                                       monkeypatch):
    seen = {}

    def record(out, s, jobs):
        seen.update({seed: experiment.Unit(out, seed, "CE").finished(0) for seed in s["seeds"]})
        return [], [], []

    monkeypatch.setattr(experiment, "preflight", lambda *a, **k: None)
    monkeypatch.setattr(experiment, "run_grid", record)
    monkeypatch.setattr(experiment.comparison, "markdown_text", lambda *a: "")
    # a third seed has no base model there: it is left to this grid to train
    out = tmp_path / "more"
    args = grid.args(out)
    args[args.index("--seeds") + 1] = "1111,2222,3333"
    assert experiment.main([*args, "--base_from", str(grid.out)]) == 0
    assert "round 0 of seeds 1111, 2222 linked from" in capsys.readouterr().out
    assert seen == {1111: True, 2222: True, 3333: False}
    for seed in (1111, 2222):
        link = out / "base" / f"seed{seed}-CE"
        assert os.path.islink(link) and os.path.realpath(link) == os.path.realpath(grid.out / "base" / link.name)
    assert not (out / "base" / "seed3333-CE").exists()
    # round 0 trained with other settings cannot be lent; nothing is made
    other = tmp_path / "other"
    args = grid.args(other)
    args[args.index("--base_iters") + 1] = "3"
    assert experiment.main([*args, "--base_from", str(grid.out)]) == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and "its round 0 ran with other settings (--base_iters)" in errors[0], errors
    assert not other.exists()
    assert experiment.main([*grid.args(other), "--base_from", str(tmp_path)]) == 2
    assert "no experiment.json there" in error_lines(capsys)[0]


def _follow_up(grid, folder, accuracies, valid=None, **settings):
    """A follow-up experiment folder as --base_from and a grid with other sampling flags make it:
    grid.out's base models linked, its uncali cells copied, their round-1 test accuracy set to
    `accuracies` (seed -> %) and validation accuracy to `valid` (seed -> %), experiment.json with
    `settings` over grid.out's."""
    record = json.loads((grid.out / "experiment.json").read_text())
    record["settings"].update(queries=["uncali"], **settings)
    os.makedirs(folder / "base")
    (folder / "experiment.json").write_text(json.dumps(record))
    for seed, accuracy in accuracies.items():
        os.symlink(os.path.realpath(grid.out / "base" / f"seed{seed}-CE"), folder / "base" / f"seed{seed}-CE")
        cell = f"uncali-CE-noise0-seed{seed}"
        shutil.copytree(grid.out / "cells" / cell, folder / "cells" / cell, symlinks=True)
        path = folder / "cells" / cell / "eval" / "round1" / "results.json"
        results = json.loads(path.read_text())
        results["total"]["accuracy"] = accuracy
        path.write_text(json.dumps(results))
        if valid:
            path = folder / "cells" / cell / "models" / "round1" / "train_summary.json"
            trained = json.loads(path.read_text())
            trained["best"]["accuracy"] = valid[seed]
            path.write_text(json.dumps(trained))


def test_combine_compares_follow_up_folders_with_one_random_baseline(grid, tmp_path, capsys):
    random_final = {seed: json.loads((grid.out / "cells" / f"random-CE-noise0-seed{seed}" / "eval" / "round1"
                                      / "results.json").read_text())["total"]["accuracy"] for seed in (1111, 2222)}
    random_valid = {seed: json.loads((grid.out / "cells" / f"random-CE-noise0-seed{seed}" / "models" / "round1"
                                      / "train_summary.json").read_text())["best"]["accuracy"] for seed in (1111, 2222)}
    beta = tmp_path / "beta"
    # paired differences +5 and +7 against random: mean 6, std sqrt(2), standard error 1; on the
    # validation data -1 and -3: mean -2
    _follow_up(grid, beta, {1111: random_final[1111] + 5, 2222: random_final[2222] + 7},
               {1111: random_valid[1111] - 1, 2222: random_valid[2222] - 3}, sampling_args="--acquisition_beta 3")
    copy = tmp_path / "copy"  # the same cells without flags again: the first folder's are kept
    _follow_up(grid, copy, {1111: 99.0, 2222: 99.0})
    out = tmp_path / "all"
    assert experiment.main(["--combine", f"{grid.out},{beta},{copy}", "--out", str(out)]) == 0
    assert "| uncali | CE | 0 | substitute | 0 | topk | --acquisition_beta 3 | 2 |" in capsys.readouterr().out
    rows = {(r["query"], r["sampling_args"]): r for r in read_csv(out / "summary.csv")}
    assert sorted(rows) == [("random", ""), ("uncali", ""), ("uncali", "--acquisition_beta 3")]
    own = {r["query"]: r for r in read_csv(grid.out / "summary.csv")}
    assert rows[("uncali", "")]["final_accuracy_mean"] == own["uncali"]["final_accuracy_mean"]
    variant = rows[("uncali", "--acquisition_beta 3")]
    assert float(variant["diff_vs_random_mean"]) == pytest.approx(6)
    assert float(variant["diff_vs_random_low"]) == pytest.approx(6 - T_975_DF1)
    assert float(variant["diff_vs_random_high"]) == pytest.approx(6 + T_975_DF1)
    on_valid = {(r["query"], r["sampling_args"]): r for r in read_csv(out / "summary_valid.csv")}
    assert float(on_valid[("uncali", "--acquisition_beta 3")]["diff_vs_random_mean"]) == pytest.approx(-2)
    assert float(on_valid[("random", "")]["final_accuracy_mean"]) == pytest.approx(statistics.mean(random_valid.values()))
    cells = json.loads((out / "combined.json").read_text())["cells"]
    assert cells["uncali-CE-noise0-seed1111 --acquisition_beta 3"] == str(beta)
    assert cells["uncali-CE-noise0-seed1111"] == cells["random-CE-noise0-seed2222"] == str(grid.out)
    # folders that do not compare: one error line each, nothing written
    other = tmp_path / "iters"
    _follow_up(grid, other, {1111: 1.0}, iters=7)
    unpaired = tmp_path / "unpaired"
    _follow_up(grid, unpaired, {1111: 1.0})
    os.unlink(unpaired / "base" / "seed1111-CE")
    shutil.copytree(grid.out / "base" / "seed1111-CE", unpaired / "base" / "seed1111-CE", symlinks=True)
    with open(unpaired / "base" / "seed1111-CE" / "models" / "round0" / "best_accuracy.pth", "ab") as f:
        f.write(b"another model")
    os.utime(unpaired / "base" / "seed1111-CE" / "eval" / "round0" / "results.json")  # still evaluated after it
    for folders, extra, message in (
            (f"{grid.out},{other}", [], "ran with other settings than"),
            (f"{grid.out},{unpaired}", [], "its round-0 model of seed 1111 is not the one of"),
            (f"{grid.out},{tmp_path}", [], "no experiment.json there"),
            (f"{grid.out},{beta}", ["--queries", "random"], "takes --out only (drop --queries)")):
        target = tmp_path / "refused"
        assert experiment.main(["--combine", folders, "--out", str(target), *extra]) == 2
        errors = error_lines(capsys)
        assert len(errors) == 1 and message in errors[0], errors
        assert not target.exists()


@pytest.mark.slow
def test_fresh_rounds_train_from_random_weights_and_do_not_combine_with_warm_ones(grid, tmp_path, capsys):
    out = tmp_path / "fresh"
    args = grid.args(out)
    args[args.index("--queries") + 1] = "random"
    args[args.index("--seeds") + 1] = "1111"
    result = run_tool([*args, "--al_start", "fresh", "--base_from", str(grid.out)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    cell = out / "cells" / "random-CE-noise0-seed1111"
    query_log = (cell / "logs" / "round1-query.log").read_text()
    train_log = (cell / "logs" / "round1-train.log").read_text()
    # the round is still picked with the round-0 model (linked from grid.out), but trained from
    # random weights on every label
    assert f"--saved_model {out}/base/seed1111-CE/models/round0/best_accuracy.pth" in query_log
    command = next(line for line in train_log.splitlines() if line.startswith("=== ") and " $ " in line)
    assert "--saved_model" not in command and "--mode al" in command
    assert "without --saved_model starts from random weights" in train_log
    recorded = json.loads((out / "experiment.json").read_text())["settings"]
    assert recorded["al_start"] == "fresh"
    # a fresh round is another kind of round: its folder does not combine with warm ones
    target = tmp_path / "refused"
    assert experiment.main(["--combine", f"{grid.out},{out}", "--out", str(target)]) == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and "(--al_start)" in errors[0], errors
    assert experiment.main([*args, "--al_start", "cold"]) == 2
    assert "--al_start cold: choose from warm, fresh" in error_lines(capsys)[0]


# ---------------------------------------------------------------------------------------------
# tools/experiment.py --jobs: the scheduler, with stand-in rounds


def scheduler_settings(rounds=2):
    return {"seeds": [1111, 2222], "base_calibrator": "CE", "queries": ["random", "uncali"], "calibrators": ["CE"],
            "noise": [0.0], "noise_models": ["substitute"], "relabel_ratios": [0.0], "acquisitions": ["topk"],
            "rounds": rounds}


@pytest.fixture
def stand_in_rounds(monkeypatch):
    """run_round replaced by one that takes `seconds`, writes the files that mark a round finished and
    logs (label, round, start, end); `fail` names units whose round fails."""
    state = types.SimpleNamespace(log=[], fail=set(), seconds=0.15, lock=threading.Lock())

    def run_round(unit, k, s):
        start = time.monotonic()
        time.sleep(state.seconds)
        if unit.name in state.fail:
            raise experiment.StepFailed("train", unit.log(k, "train"))
        os.makedirs(unit.model_dir(k), exist_ok=True)
        with open(os.path.join(unit.model_dir(k), "train_summary.json"), "w") as f:
            f.write("{}")
        with open(unit.model(k), "w") as f:
            f.write("model")
        os.makedirs(os.path.dirname(unit.results(k)), exist_ok=True)
        with open(unit.results(k), "w") as f:
            json.dump({"total": {"accuracy": 10.0, "ece": 0.1}}, f)
        with state.lock:
            state.log.append((unit.name, k, start, time.monotonic()))

    monkeypatch.setattr(experiment, "run_round", run_round)
    monkeypatch.setattr(experiment, "write_reports", lambda *args: [])
    return state


def test_one_job_keeps_the_work_order_and_two_jobs_run_two_rounds_at_once(tmp_path, stand_in_rounds, capsys):
    s = scheduler_settings()
    bases = ["seed1111-CE", "seed2222-CE"]
    cells = ["random-CE-noise0-seed1111", "random-CE-noise0-seed2222", "uncali-CE-noise0-seed1111",
             "uncali-CE-noise0-seed2222"]
    failed, _, _ = experiment.run_grid(str(tmp_path / "one"), s, jobs=1)
    assert failed == []
    assert [(name, k) for name, k, _, _ in stand_in_rounds.log] == (
        [(b, 0) for b in bases] + [(c, 1) for c in cells] + [(c, 2) for c in cells])
    assert "[10/10]" in capsys.readouterr().out

    stand_in_rounds.log.clear()
    failed, _, _ = experiment.run_grid(str(tmp_path / "two"), s, jobs=2)
    assert failed == []
    log = stand_in_rounds.log
    assert len(log) == 10
    spans = {(name, k): (start, end) for name, k, start, end in log}
    # never more than two at once, and two at once at some point
    events = sorted([(start, 1) for _, _, start, _ in log] + [(end, -1) for _, _, _, end in log])
    in_flight, most = 0, 0
    for _, change in events:
        in_flight += change
        most = max(most, in_flight)
    assert most == 2
    # each round after the one it continues: round 1 after the seed's base model, round 2 after round 1
    for cell in cells:
        seed = cell.rsplit("seed", 1)[1]
        assert spans[(cell, 1)][0] >= spans[(f"seed{seed}-CE", 0)][1]
        assert spans[(cell, 2)][0] >= spans[(cell, 1)][1]
    # running it again finds everything finished and runs nothing
    log.clear()
    assert experiment.run_grid(str(tmp_path / "two"), s, jobs=2)[0] == []
    assert log == []


def test_a_failed_base_model_fails_its_cells_and_the_other_seed_goes_on(tmp_path, stand_in_rounds, capsys):
    stand_in_rounds.fail = {"seed2222-CE"}
    failed, _, _ = experiment.run_grid(str(tmp_path / "exp"), scheduler_settings(), jobs=2)
    assert failed == ["random-CE-noise0-seed2222", "uncali-CE-noise0-seed2222"]
    assert sorted((name, k) for name, k, _, _ in stand_in_rounds.log) == [
        ("random-CE-noise0-seed1111", 1), ("random-CE-noise0-seed1111", 2),
        ("seed1111-CE", 0), ("uncali-CE-noise0-seed1111", 1), ("uncali-CE-noise0-seed1111", 2)]
    err = capsys.readouterr().err
    assert "base seed2222-CE failed in round 0" in err
    assert "cell uncali-CE-noise0-seed2222 failed in round 0: see" in err


def test_an_interrupt_stops_every_running_child_and_starts_no_other(tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "stop_child", functools.partial(experiment.stop_child, grace=0.2))
    started = []

    def run_round(unit, k, s):  # a child that would run for a minute
        started.append(unit.name)
        experiment.run_logged([sys.executable, "-c", "import time; time.sleep(60)"], unit.log(k, "train"))

    monkeypatch.setattr(experiment, "run_round", run_round)
    monkeypatch.setattr(experiment, "write_reports", lambda *args: [])

    def interrupt_when_both_run():
        deadline = time.time() + 30
        while len(experiment.CHILDREN.running) < 2 and time.time() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C reaches the tool's main thread

    # Python's own Ctrl-C handler, also where this runs with SIGINT ignored (started with & from a script)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt_when_both_run, daemon=True).start()
        start = time.time()
        with pytest.raises(KeyboardInterrupt):
            experiment.run_grid(str(tmp_path / "exp"), scheduler_settings(), jobs=2)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.time() - start < 20
    assert sorted(started) == ["seed1111-CE", "seed2222-CE"]  # no cell started after the interrupt
    assert experiment.CHILDREN.running == set()
    for seed in (1111, 2222):
        log = (tmp_path / "exp" / "base" / f"seed{seed}-CE" / "logs" / "round0-train.log").read_text()
        assert log.splitlines()[-1].startswith("=== interrupted (exit status ")
