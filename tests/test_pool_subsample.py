"""data_sampling.py --pool_subsample: a seeded random part of the pool is scored; the --workers default."""
import math
import os
import subprocess
import sys

import pytest

import data_sampling
from active_learning import pool_scoring
import options
from conftest import REPO_ROOT
from test_sampling import CTC_ARCH, USAGE, ctc_args, expected_pool, listing, pool_confidences, read_set, run_main
from test_sampling import models, one_thread, work  # noqa: F401  (fixtures)

NAMES = ["CVPR2016", "NIPS2014"]


def pool_ids(train, make_opt, subsample, seed=1111, round_name="random_iter_1", queried=(), names=NAMES):
    """(pool, its identities in pool order) as data_sampling builds it for a round."""
    opt = make_opt(**CTC_ARCH, train_data=train, total_data_usage_ratio=USAGE, manualSeed=seed)
    opt.pool_subsample = subsample
    pool, _ = pool_scoring.build_pool(opt, list(names), set(queried), round_name)
    return pool, [(leaf.relpath, int(i)) for leaf in pool.leaves for i in leaf.indices]


def test_subsample_is_repeatable_per_seed_and_round_and_a_part_of_the_pool(tiny_data, make_opt):
    full_pool, full = pool_ids(tiny_data.train, make_opt, None)
    n = expected_pool(tiny_data.train, make_opt, float(USAGE))
    assert len(full) == full_pool.total == n and not full_pool.subsampled

    pool, drawn = pool_ids(tiny_data.train, make_opt, 20)
    assert (len(drawn), len(pool), pool.total, pool.subsampled) == (20, 20, n, True)
    assert drawn == [x for x in full if x in set(drawn)]  # a part of the pool, in pool order
    assert set(drawn) != set(full[:20]) and {r for r, _ in drawn} == set(NAMES)  # spread, not a prefix
    assert pool_ids(tiny_data.train, make_opt, 20)[1] == drawn
    # keyed by identity: the same draw whatever the order the pool is assembled in (every rank alike)
    assert set(pool_ids(tiny_data.train, make_opt, 20, names=NAMES[::-1])[1]) == set(drawn)
    # 20 of about 72: two draws agree by chance with probability 1 / C(72, 20) ~ 1e-18
    assert set(pool_ids(tiny_data.train, make_opt, 20, round_name="random_iter_2")[1]) != set(drawn)
    assert set(pool_ids(tiny_data.train, make_opt, 20, seed=2222)[1]) != set(drawn)


def test_subsample_never_holds_queried_samples(tiny_data, make_opt):
    _, drawn = pool_ids(tiny_data.train, make_opt, 20)
    queried = drawn[::2]  # 10 of the first draw, as if an earlier round had queried them
    pool, again = pool_ids(tiny_data.train, make_opt, 20, queried=queried)
    n = expected_pool(tiny_data.train, make_opt, float(USAGE))
    assert len(again) == 20 and pool.total == n - 10 and set(again).isdisjoint(queried)
    # the 20 smallest keys less 10 of them stay among the 20 smallest of what is left
    assert set(drawn) - set(queried) <= set(again)


def test_a_subsample_at_least_the_pool_is_the_whole_pool(tiny_data, make_opt):
    _, full = pool_ids(tiny_data.train, make_opt, None)
    for size in (len(full), len(full) + 1, 10 ** 6):
        pool, ids = pool_ids(tiny_data.train, make_opt, size)
        assert ids == full and not pool.subsampled


def test_two_rounds_score_only_their_subsample(work, models, make_opt, capsys):
    train = str(work / "train_data_lmdb")
    n = expected_pool(train, make_opt, float(USAGE))
    drawn = set(pool_ids(train, make_opt, 20, round_name="uncali_iter_1")[1])
    summary = run_main(ctc_args(work, models.ctc, "--query", "uncali", "--ratio", "0.2", "--pool_subsample", "20"))
    count = math.floor(n * 0.2)  # --ratio stays a share of the whole pool
    assert count < 20
    assert (summary["pool_size"], summary["pool_subsample"], summary["subsampled"], summary["subsample_size"],
            summary["scored"], summary["num_picked"]) == (n, 20, True, 20, 20, count)
    assert f"pool: {n} samples, of which a random 20 were scored (--pool_subsample 20)" in capsys.readouterr().out
    rows, meta = read_set(os.path.join(train, "uncali_iter_1"))
    first = [origin for _, _, origin in rows]
    assert (meta["pool_size"], meta["pool_subsample"], meta["subsample_size"]) == (n, 20, 20)
    # uncali took the least confident of the 20 drawn, whatever the rest of the pool scores
    confidences = pool_confidences(train, make_opt, models.ctc)
    ranked = sorted(drawn, key=confidences.get)
    assert set(first) == set(ranked[:count]) and set(first) != set(sorted(confidences, key=confidences.get)[:count])

    drawn_2 = set(pool_ids(train, make_opt, 20, round_name="uncali_iter_2", queried=first)[1])
    summary = run_main(ctc_args(work, models.ctc, "--query", "uncali", "--num_query", "5", "--pool_subsample", "20"))
    assert (summary["query_set"], summary["pool_size"], summary["scored"]) == ("uncali_iter_2", n - count, 20)
    second = {origin for _, _, origin in read_set(os.path.join(train, "uncali_iter_2"))[0]}
    assert drawn_2.isdisjoint(first) and second <= drawn_2 and len(second) == 5


def test_a_query_larger_than_the_subsample_stops_before_scoring(work, models, make_opt, capsys):
    train = str(work / "train_data_lmdb")
    n = expected_pool(train, make_opt, float(USAGE))
    with pytest.raises(SystemExit) as exit_info:
        run_main(ctc_args(work, models.ctc, "--ratio", "0.5", "--pool_subsample", "20"))
    assert exit_info.value.code == 2
    wanted = math.floor(n * 0.5)
    assert (f"error: --pool_subsample 20: the round queries {wanted} samples (--ratio 0.5 of the pool of {n}), "
            f"more than it scores; give --pool_subsample {wanted} or more") in capsys.readouterr().err
    assert listing(train) == NAMES


def test_a_subsample_larger_than_the_pool_scores_everything(work, models, make_opt):
    n = expected_pool(str(work / "train_data_lmdb"), make_opt, float(USAGE))
    summary = run_main(ctc_args(work, models.ctc, "--num_query", "3", "--pool_subsample", str(n + 1)))
    assert (summary["pool_size"], summary["subsample_size"], summary["scored"], summary["subsampled"]) == \
        (n, n, n, False)


@pytest.mark.parametrize("value, message", [
    ("0", "error: --pool_subsample 0: must be at least 1"),
    ("-3", "error: --pool_subsample -3: must be at least 1"),
    ("many", "argument --pool_subsample: invalid int value: 'many'"),
])
def test_bad_pool_subsample_exits_2(work, value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(ctc_args(work, "none.pth", "--dry_run", "--pool_subsample", value))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("cores, workers", [(1, 1), (2, 2), (4, 4), (64, 4)])
def test_workers_default_is_the_smaller_of_4_and_the_usable_cores(monkeypatch, cores, workers):
    monkeypatch.setattr(options.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(options.os, "cpu_count", lambda: 128)  # the affinity counts, not the machine
    assert options.default_workers() == workers
    assert data_sampling.get_args_parser().parse_args([]).workers == workers


def test_workers_and_pool_subsample_are_documented():
    text = " ".join(data_sampling.get_args_parser().format_help().split())
    assert "unless given, the smaller of 4 and the cores this process may use" in text
    assert "--pool_subsample N score a random N of the pool instead of all of it" in text


def test_workers_default_without_affinity_counts_the_cpus(monkeypatch):
    monkeypatch.delattr(options.os, "sched_getaffinity", raising=False)  # not Linux
    monkeypatch.setattr(options.os, "cpu_count", lambda: 3)
    assert options.default_workers() == 3
    monkeypatch.setattr(options.os, "cpu_count", lambda: None)
    assert options.default_workers() == 1


def run_loop(tiny_data, out, *extra):
    return subprocess.run(["bash", os.path.join(REPO_ROOT, "scripts", "al_loop.sh"),
                           "--train_data", tiny_data.train, "--valid_data", tiny_data.valid, "--label_ratio", "0.5",
                           "--rounds", "1", "--arch", "--Transformation None --FeatureExtraction VGG "
                           "--SequenceModeling None --Prediction CTC", "--out", str(out), *extra],
                          cwd=REPO_ROOT, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True)


@pytest.mark.slow
def test_al_loop_checks_and_passes_pool_subsample(tiny_data, tmp_path):
    result = run_loop(tiny_data, tmp_path, "--pool_subsample", "0")
    assert result.returncode == 2 and result.stderr.startswith("error: --pool_subsample 0: give a whole number")
    # the flag reaches data_sampling.py's dry run, which refuses a query larger than the subsample
    result = run_loop(tiny_data, tmp_path, "--pool_subsample", "5", "--num_query", "15")
    assert result.returncode == 2, result.stderr
    assert "error: --pool_subsample 5: the round queries 15 samples (--num_query 15)" in result.stderr
    assert not os.listdir(tmp_path)  # checked before the run folder is made
