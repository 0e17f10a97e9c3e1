"""data_sampling.py never deletes what a user owns, never queries a sample twice (also with two
samplers at once on one training root), and never leaves a query set without its summary."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from data_layer import lmdb_format
from data_layer import lmdb_writing
from data_layer import set_records
from safe_files import locking
from test_sampling import ROOT, ctc_args, listing, models, one_thread, read_set, run_main, work  # noqa: F401


def sampler(work, model, *extra):
    """A data_sampling.py process (not waited for)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "data_sampling.py"), *ctc_args(work, model, *extra)],
                            cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(process, timeout=300):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def error_exit(capsys, argv):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def snapshot(folder):
    """{relative file path: bytes} of everything below folder."""
    files = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


def query_sets(train):
    return {rel: read_set(os.path.join(train, rel)) for rel in lmdb_format.find_lmdbs(train)
            if set_records.is_query_set(os.path.join(train, rel))}


def all_origins(train):
    return [origin for rows, _ in query_sets(train).values() for _, _, origin in rows]


# ---------------------------------------------------------------------------------------------
# --overwrite replaces only what this tool wrote


def test_overwrite_never_replaces_a_base_dataset(work, models, capsys):
    train = str(work / "train_data_lmdb")
    before = snapshot(os.path.join(train, "NIPS2014"))
    message = error_exit(capsys, ctc_args(work, models.ctc, "--query", "random", "--num_query", "10",
                                          "--out_name", "NIPS2014", "--overwrite"))
    assert "not a query set written by data_sampling.py" in message and "NIPS2014" in message
    assert snapshot(os.path.join(train, "NIPS2014")) == before
    assert listing(train) == ["CVPR2016", "NIPS2014"]


def test_overwrite_never_replaces_a_link_or_a_plain_folder(work, models, capsys):
    train = work / "train_data_lmdb"
    # a dataset outside the root: one linked beside its own folder would count twice (refused as such)
    os.symlink(work / "test_data_lmdb" / "synth_eval", train / "linked")
    (train / "notes").mkdir()
    (train / "notes" / "keep.txt").write_text("mine")
    for name in ("linked", "notes"):
        message = error_exit(capsys, ctc_args(work, models.ctc, "--num_query", "5", "--out_name", name, "--overwrite"))
        assert "never replaced" in message
    assert os.path.islink(train / "linked") and (train / "notes" / "keep.txt").read_text() == "mine"


def test_overwrite_replaces_an_earlier_query_set_and_gives_its_samples_back(work, models):
    train = str(work / "train_data_lmdb")
    first = run_main(ctc_args(work, models.ctc, "--query", "random", "--num_query", "10", "--out_name", "mine"))
    again = run_main(ctc_args(work, models.ctc, "--query", "random", "--num_query", "10", "--out_name", "mine",
                              "--overwrite"))
    # the replaced set's samples are back in the pool, so the pool is as large as the first time
    assert again["pool_size"] == first["pool_size"]
    rows, meta = read_set(os.path.join(train, "mine"))
    assert len(rows) == 10 and meta["name"] == "mine"
    assert json.load(open(os.path.join(train, "mine", "summary.json")))["num_picked"] == 10


# ---------------------------------------------------------------------------------------------
# --save_images replaces only an earlier export


def test_save_images_overwrite_never_deletes_a_foreign_folder(work, models, capsys):
    precious = work / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    message = error_exit(capsys, ctc_args(work, models.ctc, "--num_query", "5", "--save_images", str(precious),
                                          "--overwrite"))
    assert "not an export of data_sampling.py" in message and "export.json" in message
    assert listing(precious) == ["thesis.tex"] and (precious / "thesis.tex").read_text() == "years of work"
    assert listing(work / "train_data_lmdb") == ["CVPR2016", "NIPS2014"]  # refused before any writing


def test_save_images_replaces_its_own_export_and_fills_an_empty_folder(work, models):
    export = work / "export"
    export.mkdir()  # empty: nothing to lose, no --overwrite needed
    run_main(ctc_args(work, models.ctc, "--num_query", "4", "--save_images", str(export)))
    marker = json.loads((export / "export.json").read_text())
    assert (marker["written_by"], marker["query_set"], marker["images"]) == ("data_sampling.py", "random_iter_1", 4)
    run_main(ctc_args(work, models.ctc, "--num_query", "3", "--save_images", str(export), "--overwrite"))
    assert json.loads((export / "export.json").read_text())["query_set"] == "random_iter_2"
    assert len((export / "gt.txt").read_text().splitlines()) == 3 and len(listing(export / "images")) == 3


def test_save_images_may_not_overlap_the_query_set(work, models, capsys):
    target = str(work / "train_data_lmdb" / "random_iter_1")
    message = error_exit(capsys, ctc_args(work, models.ctc, "--num_query", "3", "--save_images", target))
    assert "overlaps the query set" in message


# ---------------------------------------------------------------------------------------------
# names the next round can select


@pytest.mark.parametrize("name, words", [(".hidden", "starting with '.'"), ("my-set", "splits names at '-'"),
                                         ("two words", "splits names at '-'"), ("a/b", "plain folder name")])
def test_out_name_that_the_next_round_could_not_select_is_refused(work, models, capsys, name, words):
    message = error_exit(capsys, ctc_args(work, models.ctc, "--num_query", "3", "--out_name", name))
    assert words in message
    assert listing(work / "train_data_lmdb") == ["CVPR2016", "NIPS2014"]


def test_out_name_that_would_also_select_another_dataset_is_refused(work, models, capsys):
    train = work / "train_data_lmdb"
    os.makedirs(train / "MJ")
    os.replace(train / "CVPR2016", train / "MJ" / "train")
    argv = ctc_args(work, models.ctc, "--select_data", "train-NIPS2014", "--num_query", "3", "--out_name", "MJ")
    message = error_exit(capsys, argv)
    assert "path component of MJ/train" in message


# ---------------------------------------------------------------------------------------------
# the lock on the training root


def test_a_held_lock_stops_a_second_sampler_at_once_or_after_its_timeout(work, models):
    train = str(work / "train_data_lmdb")
    with locking.exclusive(train):
        code, _, err = finish(sampler(work, models.ctc, "--num_query", "5"))
        assert code == 2 and err.strip().splitlines()[-1].startswith("error: --train_data")
        assert f"in use by pid {os.getpid()}" in err and "--lock_timeout" in err
        started = time.monotonic()
        code, _, err = finish(sampler(work, models.ctc, "--num_query", "5", "--lock_timeout", "1"))
        assert code == 2 and "still in use" in err and time.monotonic() - started >= 1.0
    assert listing(train) == ["CVPR2016", "NIPS2014"]  # nothing written, lock file gone


def test_a_waiting_sampler_runs_once_the_lock_is_released(work, models):
    train = str(work / "train_data_lmdb")
    with locking.exclusive(train):
        waiting = sampler(work, models.ctc, "--num_query", "5", "--lock_timeout", "-1")
        # held until the sampler says it waits (however slowly a loaded machine starts it)
        before = []
        for line in waiting.stdout:
            before.append(line)
            if "waiting for --train_data" in line:
                break
        assert waiting.poll() is None and lmdb_format.find_lmdbs(train) == ["CVPR2016", "NIPS2014"], before
    code, out, err = finish(waiting)
    assert code == 0, err
    assert len(query_sets(train)["random_iter_1"][0]) == 5


def test_a_killed_holder_leaves_the_root_usable(work, models):
    train = str(work / "train_data_lmdb")
    holder = subprocess.Popen([sys.executable, "-c", "from safe_files import locking; import sys, time\n"
                               "with locking.exclusive(sys.argv[1]):\n    print('held', flush=True)\n"
                               "    time.sleep(600)", train], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    code, _, err = finish(sampler(work, models.ctc, "--num_query", "5"))
    assert code == 0, err


@pytest.mark.slow
def test_two_samplers_at_once_pick_disjoint_samples_under_distinct_names(work, models):
    train = str(work / "train_data_lmdb")
    runs = [sampler(work, models.ctc, "--query", "random", "--num_query", "30", "--lock_timeout", "-1")
            for _ in range(2)]
    results = [finish(run) for run in runs]
    assert [code for code, _, _ in results] == [0, 0], [err for _, _, err in results]
    sets = query_sets(train)
    assert sorted(sets) == ["random_iter_1", "random_iter_2"]
    origins = all_origins(train)
    assert len(origins) == 60 and len(set(origins)) == 60


# ---------------------------------------------------------------------------------------------
# kills at random moments


@pytest.mark.slow
def test_kills_at_random_moments_never_leave_a_query_set_without_its_summary_or_a_double_pick(work, models):
    train = str(work / "train_data_lmdb")
    rng = random.Random(11)
    for _ in range(4):
        run = sampler(work, models.ctc, "--query", "random", "--num_query", "7")
        time.sleep(rng.uniform(1.5, 5.5))
        run.send_signal(signal.SIGKILL)
        run.wait()
        for rel, (rows, meta) in query_sets(train).items():
            summary = json.load(open(os.path.join(train, rel, "summary.json")))
            assert summary["num_picked"] == len(rows) == meta["num_picked"] == 7
    code, _, err = finish(sampler(work, models.ctc, "--query", "random", "--num_query", "7"))
    assert code == 0, err
    origins = all_origins(train)
    assert len(origins) == 7 * len(query_sets(train)) and len(set(origins)) == len(origins)


def test_the_summary_is_inside_the_folder_before_it_is_published(work, models, monkeypatch):
    seen = []
    rename = lmdb_writing.replace_dir

    def checking_rename(src, dst):
        seen.append(sorted(os.listdir(src)))
        rename(src, dst)

    monkeypatch.setattr(lmdb_writing, "replace_dir", checking_rename)
    run_main(ctc_args(work, models.ctc, "--num_query", "3"))
    assert seen and "summary.json" in seen[0] and "data.mdb" in seen[0]


def test_dry_run_checks_without_a_model_and_writes_nothing(work, models, capsys):
    summary = run_main(ctc_args(work, models.ctc, "--num_query", "6", "--dry_run"))
    assert summary["num_query"] == 6 and summary["query_set"] == "random_iter_1"
    arch = ["--Transformation", "None", "--FeatureExtraction", "VGG", "--SequenceModeling", "None",
            "--Prediction", "CTC"]
    argv = ctc_args(work, str(work / "not_trained_yet.pth"), "--num_query", "6", "--dry_run", *arch)
    assert run_main(argv)["pool_size"] == summary["pool_size"]
    assert listing(work / "train_data_lmdb") == ["CVPR2016", "NIPS2014"]
    message = error_exit(capsys, ctc_args(work, str(work / "missing.pth"), "--query", "nosuch", "--dry_run", *arch))
    assert "nosuch" in message and "random" in message
