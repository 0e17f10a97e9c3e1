"""Issue 22, the third reliability pass: each defect it found, as a case that failed before its fix.

Every refusal is one `error:` line naming the flag or file and what would fix it, exit status 2,
and nothing written or lost. The cases that could hang (a FIFO named like an image) run the
script in a subprocess with a timeout, so that a regression fails instead of blocking the suite."""
import builtins
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import lmdb
import pytest
import torch

from safe_files import atomic_io
from data_layer import lmdb_format
from data_layer import lmdb_writing
from safe_files import locking
import options
import utils
from conftest import REPO_ROOT
from test_bad_input import below, png, simulate, world, writer_call  # noqa: F401  (world: a fixture)
from test_eval_scripts import ARCH, RUNTIME, load_script
from test_sampling import CTC_ARCH, ctc_args, listing, models, read_set, run_main, work  # noqa: F401
from test_sampling_safety import snapshot
from tools import experiment

LOOP_ARCH = ("--Transformation None --FeatureExtraction VGG --SequenceModeling BiLSTM --Prediction CTC "
             "--output_channel 32 --hidden_size 16 --adam --lr 0.001")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two cores shared by several runs
    yield
    torch.set_num_threads(threads)


def one_error_line(capsys, call, code=2):
    """Run `call`: it must exit with `code` and print exactly one line on stderr (no traceback)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        call()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == code and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def sampling_error(capsys, argv):
    return one_error_line(capsys, lambda: run_main(argv))


def script_main(name, argv, wrapped=True):
    script = load_script(name)
    main = script.main
    parse = options.parse_with_given if name in ("test", "demo", "find_label_errors", "data_sampling") else None

    def call():
        opt = parse(script.get_args_parser(), argv) if parse else script.get_args_parser().parse_args(argv)
        return (utils.exit_on_user_error(main) if wrapped else main)(opt)

    return call


def train_argv(train, valid, out, *extra):
    arch = sum(([f"--{k}", str(v)] for k, v in CTC_ARCH.items() if not isinstance(v, bool) and v != ""), [])
    return ["--train_data", str(train), "--valid_data", str(valid), "--select_data", "CVPR2016-NIPS2014",
            "--batch_ratio", "0.5-0.5", "--num_iter", "1", "--valInterval", "1", "--output_dir", str(out),
            "--exp_name", "exp", "--device", "cpu", "--workers", "0", "--batch_size", "8", *arch, *extra]


def write_query_set(train, name="random_iter_1", count=3):
    """A query set of `count` samples of CVPR2016 (as data_sampling.py writes one)."""
    source = os.path.join(train, "CVPR2016")
    with lmdb_format.shared_env(source).begin() as txn:
        samples = [(txn.get(lmdb_format.image_key(i)), txn.get(lmdb_format.label_key(i)).decode(), ("CVPR2016", i))
                   for i in range(1, count + 1)]
    meta = {"name": name, "strategy": "random", "seed": 1111, "total_data_usage_ratio": 0.7}
    lmdb_writing.write_lmdb(os.path.join(train, name), samples, meta=meta)
    return os.path.join(train, name)


def put_key(path, key, value):
    env = lmdb.open(path)
    with env.begin(write=True) as txn:
        txn.put(key, value)
    env.close()


# ---------------------------------------------------------------------------------------------
# 2. --cali_threshold outside [0, 1] ranked as uncali, and went unrecorded


@pytest.mark.parametrize("value", ["nan", "2", "-0.5"])
def test_cali_threshold_outside_the_unit_interval_is_refused(work, models, capsys, value):
    train = work / "train_data_lmdb"
    before = snapshot(train)
    line = sampling_error(capsys, ctc_args(work, models.ctc, "--query", "cali", "--cali_threshold", value,
                                           "--dry_run"))
    assert line == f"error: --cali_threshold {float(value)}: must lie in [0, 1] (a calibrated confidence)"
    assert snapshot(train) == before


def test_cali_threshold_is_recorded_in_query_meta(work, models):
    train = work / "train_data_lmdb"
    run_main(ctc_args(work, models.ctc, "--query", "cali", "--cali_threshold", "0.25", "--temperature", "1.5",
                      "--num_query", "4"))
    run_main(ctc_args(work, models.ctc, "--query", "uncali", "--num_query", "4"))
    _, cali = read_set(str(train / "cali_iter_1"))
    _, uncali = read_set(str(train / "uncali_iter_2"))
    assert cali["cali_threshold"] == 0.25 and cali["temperature"] == 1.5
    assert uncali["cali_threshold"] is None  # no threshold in uncali's ranking


# ---------------------------------------------------------------------------------------------
# 3. a dataset reached twice (a link to a query set) trained at double weight


def test_a_query_set_reached_twice_through_a_link_is_refused(work, models, capsys):
    train = work / "train_data_lmdb"
    write_query_set(str(train))
    os.symlink("random_iter_1", train / "linkq")
    before = snapshot(train)
    line = sampling_error(capsys, ctc_args(work, models.ctc, "--query", "random", "--num_query", "2", "--dry_run"))
    assert line == (f"error: {train}: linkq and random_iter_1 are one folder (reached twice through a symbolic "
                    f"link), so its samples would count twice; remove the link {train / 'linkq'}")
    assert snapshot(train) == before and os.path.islink(train / "linkq")


@pytest.mark.parametrize("names, message", [
    ("CVPR2016-CVPR2016", "--select_data names CVPR2016 twice; name each dataset once (and give one --batch_ratio "
                          "share per name)"),
    ("sets-CVPR2016", "--select_data sets and CVPR2016 both select sets/CVPR2016, whose samples would train at "
                      "double weight; name each dataset once"),
])
def test_training_refuses_two_names_that_select_one_dataset(work, tmp_path, capsys, names, message):
    train = work / "train_data_lmdb"
    (train / "sets").mkdir()
    shutil.move(train / "CVPR2016", train / "sets" / "CVPR2016")  # reached by path: as 'sets' and as 'CVPR2016'
    argv = train_argv(train, work / "test_data_lmdb", tmp_path / "models", "--select_data", names,
                      "--batch_ratio", "0.5-0.5", "--dry_run")
    assert one_error_line(capsys, script_main("train", argv)) == f"error: {message}"
    assert not (tmp_path / "models").exists()


def test_find_lmdbs_counts_a_linked_folder_once_and_refuses_a_loop(tmp_path):
    data = tmp_path / "elsewhere" / "set"
    lmdb_writing.write_lmdb(str(data), [(png(10), "ab", None)])
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    os.symlink(data, root / "a" / "linked")  # the only way to it: an ordinary linked dataset
    assert lmdb_format.find_lmdbs(str(root)) == ["a/linked"]
    os.symlink("..", root / "a" / "up")  # a link to an ancestor: every LMDB below would count again
    with pytest.raises(utils.UserError) as info:
        lmdb_format.find_lmdbs(str(root))
    assert str(info.value) == (f"{root}: . and a/up are one folder (reached twice through a symbolic link), so its "
                               f"samples would count twice; remove the link {root / 'a' / 'up'}")


# ---------------------------------------------------------------------------------------------
# 4. a test set without an LMDB failed only after the base round, and could not be corrected


def run_loop(tiny_data, out, *extra, python=sys.executable):
    env = {**os.environ, "PYTHON": python, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", os.path.join(REPO_ROOT, "scripts", "al_loop.sh"),
                           "--train_data", tiny_data.train, "--valid_data", tiny_data.valid,
                           "--label_ratio", "0.5", "--num_query", "15", "--base_iters", "2", "--iters", "2",
                           "--val_interval", "1", "--batch_size", "8", "--workers", "0", "--arch", LOOP_ARCH,
                           "--out", str(out), *extra],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def loop_error(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert "+ " not in result.stdout  # no step ran
    return lines[0]


def test_al_loop_checks_the_test_data_before_the_base_round(tiny_data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "runs"
    line = loop_error(run_loop(tiny_data, out, "--rounds", "0", "--test_data", str(empty)))
    assert line == (f"error: --test_data {empty}: holds no LMDB (no data.mdb below it); give the folder of "
                    f"labelled LMDBs")
    assert not out.exists()


@pytest.fixture
def failing_training(tmp_path):
    """A PYTHON for al_loop.sh that runs every command but a real training (the dry runs pass),
    which exits 1: a run stopped in its base round, before any evaluation."""
    wrapper = tmp_path / "python"
    wrapper.write_text("#!/bin/bash\n"
                       "case \" $* \" in *\" train.py \"*) [[ \" $* \" == *\" --dry_run \"* ]] || exit 1;; esac\n"
                       f"exec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    return str(wrapper)


def test_al_loop_corrects_the_test_data_until_a_round_is_evaluated(tiny_data, tmp_path, failing_training):
    out = tmp_path / "runs"
    other = tmp_path / "other_test"
    shutil.copytree(tiny_data.valid, other)
    settings = out / "random" / "loop_settings.txt"
    first = run_loop(tiny_data, out, "--rounds", "0", python=failing_training)
    assert first.returncode == 1 and f"TEST_DATA={tiny_data.valid}\n" in settings.read_text()

    corrected = run_loop(tiny_data, out, "--rounds", "0", "--test_data", str(other), python=failing_training)
    assert corrected.returncode == 1, corrected.stderr[-2000:]  # on to the (failing) training: accepted
    assert "--test_data corrected: no round was evaluated with the earlier value" in corrected.stdout
    assert f"TEST_DATA={other}\n" in settings.read_text()

    evaluation = out / "random" / "eval" / "round0"
    evaluation.mkdir(parents=True)
    (evaluation / "results.json").write_text("{}")
    recorded = settings.read_text()
    line = loop_error(run_loop(tiny_data, out, "--rounds", "0", python=failing_training))
    assert line == (f"error: {out / 'random'} holds a run made with other settings (--test_data); use the same "
                    f"ones to continue it, or another --out")
    assert settings.read_text() == recorded


def experiment_args(tiny_data, out, *extra):
    return ["--out", str(out), "--queries", "random", "--calibrators", "CE", "--seeds", "1111",
            "--train_data", tiny_data.train, "--valid_data", tiny_data.valid, "--rounds", "1", "--num_query", "15",
            "--arch", LOOP_ARCH, *extra]


def experiment_error(capsys, argv):
    capsys.readouterr()
    assert experiment.main(argv) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
    return lines[0]


def test_experiment_checks_that_the_test_data_holds_an_lmdb(tiny_data, tmp_path, capsys, no_runs):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "exp"
    line = experiment_error(capsys, experiment_args(tiny_data, out, "--test_data", str(empty)))
    assert line == (f"error: --test_data {empty}: holds no LMDB (no data.mdb below it); give the folder of "
                    f"labelled LMDBs")
    assert not out.exists()


def test_experiment_corrects_the_test_data_until_a_round_is_evaluated(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(experiment, "preflight", lambda *args, **kwargs: None)
    out = str(tmp_path / "exp")
    other = str(tmp_path / "other_test")
    shutil.copytree(tiny_data.valid, other)
    _, settings = experiment.parse(experiment_args(tiny_data, out))
    experiment.prepare(out, settings)
    experiment.release_locks()
    _, changed = experiment.parse(experiment_args(tiny_data, out, "--test_data", other))
    assert experiment.prepare(out, changed)["test_data"] == other
    experiment.release_locks()
    assert "--test_data corrected" in capsys.readouterr().out
    with open(os.path.join(out, "experiment.json"), encoding="utf-8") as f:
        assert json.load(f)["settings"]["test_data"] == other

    evaluation = os.path.join(out, "base", "seed1111-CE", "eval", "round0")
    os.makedirs(evaluation)
    with open(os.path.join(evaluation, "results.json"), "w", encoding="utf-8") as f:
        f.write("{}")
    with pytest.raises(experiment.ConfigError) as info:
        experiment.prepare(out, settings)  # the original test data again: round 0 was scored on the other
    experiment.release_locks()
    assert "holds an experiment made with other settings (--test_data)" in str(info.value)
    with open(os.path.join(out, "experiment.json"), encoding="utf-8") as f:
        assert json.load(f)["settings"]["test_data"] == other


# ---------------------------------------------------------------------------------------------
# 5. names used as path components wrote outside --out


@pytest.mark.parametrize("flag, value, message", [
    ("--query", "../../escape", "--query ../../escape: give a plain name (no '/', not starting with '.')"),
    ("--query", "nosuch", "--query nosuch: unknown strategy; choose one of random, uncali, uncali_char, margin, "
                          "entropy, bald, cali"),
    ("--select_data", "../CVPR2016", "--select_data ../CVPR2016: give a plain name (no '/', not starting with '.')"),
])
def test_al_loop_checks_names_before_using_them_as_paths(tiny_data, tmp_path, flag, value, message):
    out = tmp_path / "runs" / "mine"
    line = loop_error(run_loop(tiny_data, out, "--rounds", "0", flag, value))
    assert line == f"error: {message}"
    assert os.listdir(tmp_path) == []  # neither the run folder nor anything beside it


def test_experiment_refuses_a_select_data_name_that_is_a_path(tiny_data, tmp_path, capsys, no_runs):
    out = tmp_path / "exp"
    # ../train exists (the training root itself): its link would land beside a cell's train_data
    line = experiment_error(capsys, experiment_args(tiny_data, out, "--select_data", "../train", "--batch_ratio", "1"))
    assert line == "error: --select_data ../train: give a plain name (no '/', not starting with '.')"
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# 6. test.py wrote its results beside the checkpoint by default


def test_test_py_writes_its_default_results_under_the_working_folder(world, tmp_path, monkeypatch):
    model_dir = os.path.dirname(world["model"])
    before = sorted(os.listdir(model_dir))
    monkeypatch.chdir(tmp_path)
    script = load_script("test")
    argv = ["--saved_model", world["model"], "--eval_data", world["eval"], *RUNTIME]
    utils.exit_on_user_error(script.main)(options.parse_with_given(script.get_args_parser(), argv))
    assert sorted(os.listdir(model_dir)) == before  # nothing beside the model
    results = tmp_path / "test_results" / "exp" / "best_accuracy"
    assert json.loads((results / "results.json").read_text())["sets"][0]["n"] == 2
    assert "test_results/<folder of --saved_model>/<its file name without .pth>/ under the current folder" in \
        " ".join(script.get_args_parser().format_help().split())


# ---------------------------------------------------------------------------------------------
# 7. find_label_errors.py replaced an earlier run's results without --overwrite


def finder_argv(work, model, out, *extra):
    return ["--saved_model", model, "--train_data", str(work / "train_data_lmdb"), "--select_data",
            "CVPR2016-NIPS2014", "--total_data_usage_ratio", "0.1", "--out", str(out), "--workers", "0",
            "--batch_size", "32", "--device", "cpu", "--no_progress", *extra]


def test_find_label_errors_keeps_an_earlier_run_without_overwrite(work, models, tmp_path, capsys):
    out = tmp_path / "errors"
    out.mkdir()
    (out / "label_errors.csv").write_text("mine\n")
    (out / "summary.json").write_text("{}\n")
    call = script_main("find_label_errors", finder_argv(work, models.ctc, out))
    line = one_error_line(capsys, call)
    assert line == (f"error: --out {out}: already holds label_errors.csv and summary.json of an earlier run; "
                    f"choose another --out or pass --overwrite to replace them")
    assert (out / "label_errors.csv").read_text() == "mine\n" and (out / "summary.json").read_text() == "{}\n"

    summary = script_main("find_label_errors", finder_argv(work, models.ctc, out, "--overwrite"))()
    assert (out / "label_errors.csv").read_text().startswith("rank,")
    assert json.loads((out / "summary.json").read_text())["scored"] == summary["scored"] > 0


# ---------------------------------------------------------------------------------------------
# 9. a damaged query set raised ValueError / JSONDecodeError


ORIGIN = (b"origin-000000001", b"garbage", "its key origin-000000001 holds b'garbage', not '<dataset>TAB<index>'")
META = (b"query-meta", b"{not json", "its key query-meta holds b'{not json', not a JSON object")


@pytest.mark.parametrize("script, key, value, shown", [("data_sampling", *ORIGIN), ("train", *ORIGIN),
                                                       ("train", *META)])
def test_a_damaged_query_set_is_one_error_line(work, models, tmp_path, capsys, script, key, value, shown):
    train = work / "train_data_lmdb"
    query = write_query_set(str(train))
    put_key(query, key, value)
    before = snapshot(train)
    if script == "data_sampling":
        call = lambda: run_main(ctc_args(work, models.ctc, "--query", "random", "--num_query", "2",  # noqa: E731
                                         "--dry_run"))
    else:
        argv = train_argv(train, work / "test_data_lmdb", tmp_path / "models", "--mode", "al", "--saved_model",
                          models.ctc, "--select_data", "CVPR2016-NIPS2014-random_iter_1", "--batch_ratio",
                          "0.25-0.25-0.5", "--total_data_usage_ratio", "0.7")
        call = script_main("train", argv)
    line = one_error_line(capsys, call)
    assert line == (f"error: {query}: {shown}; the LMDB is damaged: rebuild it (query and relabel sets: run their "
                    f"round again)")
    assert snapshot(train) == before and not (tmp_path / "models").exists()


# ---------------------------------------------------------------------------------------------
# 10. a full disk while saving a checkpoint, and under --save_images


def test_a_full_disk_while_train_py_saves_a_checkpoint_names_it(world, tmp_path, monkeypatch, capsys):
    call, out = writer_call("train.py", world, tmp_path)
    real_open = builtins.open

    class FullFile:
        """The disk fills up after the first kilobyte: the zip writer has started (a write that
        fails at once reaches the caller as the OSError it is)."""

        def __init__(self, real):
            self.real = real
            self.room = 1024

        def write(self, data):
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as the kernel's: no file name
            self.room -= len(data)
            return self.real.write(data)

        def __getattr__(self, name):
            return getattr(self.real, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.real.close()

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        # only the checkpoints' temporaries: the logs and metrics still write
        if "w" in mode and ".pth." in os.path.basename(os.fsdecode(file)):
            return FullFile(f)
        return f

    monkeypatch.setattr(builtins, "open", fake_open)
    line = one_error_line(capsys, call)
    monkeypatch.undo()
    save_dir = out / "exp"
    assert line == (f"error: {save_dir / 'best_accuracy.pth'}: no space left on device; free some space or choose a "
                    f"folder on another disk")
    assert [name for name in os.listdir(save_dir) if name.startswith(".") or name.endswith(".pth")] == []


def test_a_full_disk_under_save_images_names_the_folder(work, models, tmp_path, monkeypatch, capsys):
    train = work / "train_data_lmdb"
    exports = tmp_path / "exports"
    exports.mkdir()
    before = snapshot(train)
    simulate(monkeypatch, exports, "ENOSPC")
    line = sampling_error(capsys, ctc_args(work, models.ctc, "--query", "random", "--num_query", "3",
                                           "--save_images", str(exports / "picked")))
    monkeypatch.undo()
    assert line == (f"error: {exports / 'picked'}: no space left on device; free some space or choose a folder on "
                    f"another disk")
    assert os.listdir(exports) == [] and snapshot(train) == before


# ---------------------------------------------------------------------------------------------
# 11. files that are not UTF-8


def test_a_character_file_that_is_not_utf8_is_one_error_line(work, tmp_path, capsys):
    charset = tmp_path / "chars.txt"
    charset.write_bytes(b"\xff\xfeab")
    argv = train_argv(work / "train_data_lmdb", work / "test_data_lmdb", tmp_path / "models", "--character_file",
                      str(charset), "--dry_run")
    line = one_error_line(capsys, script_main("train", argv))
    assert line == (f"error: --character_file {charset}: not UTF-8 text (invalid start byte at byte 0); save it as "
                    f"UTF-8")
    assert not (tmp_path / "models").exists()


def test_a_grid_file_that_is_not_utf8_is_one_error_line(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_bytes(b"queries: random\n\xff\xfe\n")
    line = experiment_error(capsys, ["--grid", str(grid), "--out", str(tmp_path / "exp")])
    assert line == f"error: --grid {grid}: not UTF-8 text (invalid start byte at byte 16); save it as UTF-8"
    assert sorted(os.listdir(tmp_path)) == ["grid.yaml"]


# ---------------------------------------------------------------------------------------------
# 12. seeds beyond torch's range


def test_a_seed_out_of_torchs_range_is_one_error_line(work, tmp_path, capsys):
    huge = "99999999999999999999999"
    argv = train_argv(work / "train_data_lmdb", work / "test_data_lmdb", tmp_path / "models", "--manualSeed", huge,
                      "--dry_run")
    line = one_error_line(capsys, script_main("train", argv))
    assert line == (f"error: --manualSeed {huge}: out of range; give a whole number in -2**63 .. 2**64-1 (the "
                    f"range torch accepts)")
    assert not (tmp_path / "models").exists()


def test_the_ends_of_the_seed_range_are_accepted_and_one_past_them_refused(make_opt):
    for seed in (utils.SEED_RANGE[0], utils.SEED_RANGE[1]):
        opt = make_opt(manualSeed=seed)
        utils.set_seed(opt.manualSeed)  # what torch takes, NumPy modulo 2**32
    for seed in (-2 ** 63 - 1, 2 ** 64):
        with pytest.raises(utils.UserError, match="--manualSeed .*: out of range"):
            make_opt(manualSeed=seed)


def test_al_loop_and_experiment_check_the_seed_range(tiny_data, tmp_path, capsys, no_runs):
    huge = "99999999999999999999999"
    line = loop_error(run_loop(tiny_data, tmp_path / "runs", "--rounds", "0", "--seed", huge))
    assert line == (f"error: --seed {huge}: give a whole number in -2**63 .. 2**64-1 (train.py --manualSeed, the "
                    f"range torch accepts)")
    line = experiment_error(capsys, experiment_args(tiny_data, tmp_path / "exp", "--seeds", f"1,{huge}"))
    assert line == f"error: --seeds {huge}: give whole numbers in -2**63 .. 2**64-1 (the range torch accepts)"
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# 13. an output path below an existing file


@pytest.mark.parametrize("case", ["create_lmdb_dataset", "save_images", "train", "make_synth_lmdb"])
def test_an_output_below_a_file_is_one_error_line(work, models, tmp_path, capsys, case):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    train = work / "train_data_lmdb"
    before = snapshot(train)
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(png(90))
    (tmp_path / "gt.txt").write_text("a.png\tab\n")
    flag, call = {
        "create_lmdb_dataset": ("--outputPath", lambda: load_script("create_lmdb_dataset").main(
            ["--inputPath", str(images), "--gtFile", str(tmp_path / "gt.txt"), "--outputPath", str(afile / "sub")])),
        "save_images": ("--save_images", lambda: run_main(ctc_args(work, models.ctc, "--num_query", "2",
                                                                   "--save_images", str(afile / "sub")))),
        "train": ("--output_dir", script_main("train", train_argv(train, work / "test_data_lmdb", afile / "sub",
                                                                  "--dry_run"))),
        "make_synth_lmdb": ("--out", lambda: load_script("tools/make_synth_lmdb").main(
            ["--out", str(afile / "sub"), "--num", "2", "--num_valid", "2", "--num_test", "2", "--workers", "1"])),
    }[case]
    line = one_error_line(capsys, call)
    assert line == f"error: {flag} {afile / 'sub'}: {afile} is a file, not a folder; choose another path"
    assert afile.read_text() == "mine" and snapshot(train) == before


# ---------------------------------------------------------------------------------------------
# 14. Ctrl-C in data_sampling.py


def test_ctrl_c_in_data_sampling_is_one_line_and_leaves_the_root_unlocked(work, models, monkeypatch, capsys):
    from active_learning import pool_scoring

    train = work / "train_data_lmdb"
    before = snapshot(train)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # as Ctrl-C arrives while the pool is scored

    monkeypatch.setattr(pool_scoring, "score_pool", interrupted)
    line = one_error_line(capsys, lambda: run_main(ctc_args(work, models.ctc, "--num_query", "2")), code=130)
    assert line == "interrupted; no output is left half-written (each is written whole or not at all)"
    assert snapshot(train) == before
    with locking.exclusive(str(train), 0):  # released: taken at once
        pass


# ---------------------------------------------------------------------------------------------
# 15. a FIFO named like an image


def run_script(args, cwd, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)


@pytest.fixture
def images_and_a_fifo(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(png(90))
    os.mkfifo(folder / "pipe.png")  # nobody writes to it: reading it would block for ever
    return folder


def test_demo_skips_a_fifo_named_like_an_image(world, images_and_a_fifo, tmp_path):
    result = run_script([os.path.join(REPO_ROOT, "demo.py"), "--image_folder", str(images_and_a_fifo),
                         "--saved_model", world["model"], *RUNTIME], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"skipped {images_and_a_fifo / 'pipe.png'}: not a regular file (a FIFO)" in result.stdout
    assert any(line.split()[:1] == ["a.png"] for line in result.stdout.splitlines())

    (images_and_a_fifo / "a.png").unlink()  # only the FIFO left: nothing to read
    result = run_script([os.path.join(REPO_ROOT, "demo.py"), "--image_folder", str(images_and_a_fifo),
                         "--saved_model", world["model"], *RUNTIME], cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"error: --image_folder {images_and_a_fifo}: holds no readable image (.jpg, .jpeg, .png, .bmp, .gif, "
        f".tif, .tiff, .webp)"], result.stderr


def test_create_lmdb_skips_a_fifo_named_like_an_image(images_and_a_fifo, tmp_path):
    out = tmp_path / "pool"
    result = run_script([os.path.join(REPO_ROOT, "create_lmdb_dataset.py"), "--unlabelled", "--inputPath",
                         str(images_and_a_fifo), "--outputPath", str(out)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"skipped file pipe.png: not a regular file (a FIFO): {images_and_a_fifo / 'pipe.png'}" in result.stderr
    with lmdb_format.shared_env(str(out)).begin() as txn:
        assert int(txn.get(b"num-samples")) == 1 and txn.get(b"path-000000001") == b"a.png"

    gt = tmp_path / "gt.txt"
    gt.write_text("pipe.png\tab\n")
    result = run_script([os.path.join(REPO_ROOT, "create_lmdb_dataset.py"), "--inputPath", str(images_and_a_fifo),
                         "--gtFile", str(gt), "--outputPath", str(tmp_path / "labelled")], cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.splitlines()[-1].startswith("error: no usable line in --gtFile")
    assert "line 1: not a regular file (a FIFO)" in result.stderr and not (tmp_path / "labelled").exists()


# ---------------------------------------------------------------------------------------------
# 16. the temporary of a run killed a second ago survived the rerun


def test_a_temporary_of_a_killed_run_is_removed_by_a_run_started_right_after(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    writer = subprocess.Popen([sys.executable, "-c", "from safe_files import atomic_io; import sys, time\n"
                               "print(atomic_io.make_temp_file(sys.argv[1], 'uncali_iter_1'), flush=True)\n"
                               "time.sleep(60)", str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    temporary = writer.stdout.readline().strip()
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    time.sleep(0.1)  # well under the second that /proc/stat's btime resolves
    rerun = subprocess.run([sys.executable, "-c", "from safe_files import atomic_io; import sys\n"
                            "print(atomic_io.remove_stale_temporaries(sys.argv[1]))", str(folder)],
                           capture_output=True, text=True, env=env, timeout=120)
    assert rerun.stdout.strip() == repr([temporary]) and os.listdir(folder) == []


def test_a_temporary_whose_pid_was_taken_by_another_process_is_stale(tmp_path):
    alive = os.getppid()  # a running process, but not the one that made these temporaries
    ticks = atomic_io.start_ticks(alive)
    host = atomic_io.host_tag()
    long_ago = atomic_io.process_start_time() - 3600
    names = {f".rounds.csv.{alive}-{ticks + 1}.{host}.0123abcd.tmp": "removed",  # same pid, later start: reused
             f".results.json.{alive}-{ticks}.{host}.0123abcd.tmp": "kept",        # its writer still runs
             f".summary.json.{alive}.{host}.0123abcd.tmp": "kept"}                # an older name: pid alone
    for name in names:
        (tmp_path / name).write_text("x")
        os.utime(tmp_path / name, (long_ago, long_ago))
    mine = atomic_io.make_temp_file(str(tmp_path), "mine")
    match = atomic_io.TEMP_NAME.match(os.path.basename(mine))
    assert (int(match["pid"]), int(match["start"])) == (os.getpid(), atomic_io.start_ticks(os.getpid()))
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(mine)]
                                                  + [name for name, fate in names.items() if fate == "kept"])
