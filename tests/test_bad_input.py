"""Bad input and bad surroundings end in one `error:` line and exit status 2, never a traceback:
numbers out of range, a broken opt.yaml beside the model, output paths of the wrong kind, every
image undecodable, and a read-only or full disk under each of the six writers (train.py,
data_sampling.py, test.py, demo.py, create_lmdb_dataset.py, tools/al_report.py).

As root, chmod does not stop a write, so a read-only or full disk is simulated in-process: the
calls that create or write files (open, os.open, os.mkdir, os.replace, lmdb.open) fail for paths
below one folder with the errno the kernel would give."""
import builtins
import errno
import io
import json
import os
import shutil
import subprocess
import sys

import lmdb
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import create_lmdb_dataset
from data_layer import lmdb_writing
import options
import utils
from model import Model, save_weights
from test_eval_scripts import ARCH, ROOT, RUNTIME, load_script


def png(shade):
    buf = io.BytesIO()
    Image.new("L", (24, 10), color=shade).save(buf, format="PNG")
    return buf.getvalue()


def write_set(path, labels, images=None):
    images = images or [png(30 * k % 256) for k in range(len(labels))]
    lmdb_writing.write_lmdb(str(path), [(image, label, None) for image, label in zip(images, labels)])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bad_input")
    opt = type("Opt", (), dict(ARCH, num_class=3))()
    model_dir = root / "models" / "exp"
    model_dir.mkdir(parents=True)
    save_weights(Model(opt), model_dir / "best_accuracy.pth")
    (model_dir / "opt.yaml").write_text(yaml.safe_dump(ARCH))
    for name, content in (("malformed", b"Prediction: [CTC\n"), ("latin1", b"character: \xe9\xe8\n")):
        (root / "models" / name).mkdir()
        shutil.copy(model_dir / "best_accuracy.pth", root / "models" / name / "best_accuracy.pth")
        (root / "models" / name / "opt.yaml").write_bytes(content)

    write_set(root / "eval" / "good", ["a", "b"])
    write_set(root / "broken" / "only", ["a", "b", "ab"], images=[b"not an image"] * 3)
    write_set(root / "train" / "CVPR2016", ["ab"] * 8)
    write_set(root / "train" / "NIPS2014", ["ba"] * 8)
    write_set(root / "valid" / "v", ["a"] * 4)

    (root / "images").mkdir()
    for name in ("img1.png", "img2.png"):
        (root / "images" / name).write_bytes(png(90))
    (root / "tiffs").mkdir()  # they pass Pillow's header check, but 32-bit pixels have no known range
    for name in ("a.tif", "b.tif"):
        Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(root / "tiffs" / name)

    run = root / "al" / "random"
    (run / "models" / "round0").mkdir(parents=True)
    (run / "eval" / "round0").mkdir(parents=True)
    (run / "models" / "round0" / "train_summary.json").write_text(json.dumps({"labelled_total": 16}))
    metrics = {"accuracy": 50.0, "ece": 0.1, "ace": 0.2}
    (run / "eval" / "round0" / "results.json").write_text(json.dumps({"sets": [{"name": "s", **metrics}],
                                                                      "total": metrics}))
    return {"root": root, "model": str(model_dir / "best_accuracy.pth"), "models": root / "models",
            "eval": str(root / "eval"), "broken": str(root / "broken"), "train": root / "train",
            "valid": str(root / "valid"), "images": str(root / "images"), "tiffs": str(root / "tiffs"),
            "run": run}


def error_line(call, capsys):
    """Run `call` (a wrapped main); it must exit 2 with exactly one `error:` line, the last on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("error: ")
    assert sum(line.startswith("error:") for line in lines) == 1
    return lines[-1]


def call_test(args, world, output=None):
    """A call of test.py's wrapped main on `args` (the model and runtime flags added)."""
    script = load_script("test")
    argv = ["--saved_model", world["model"], *RUNTIME, *args]
    if output is not None:
        argv += ["--output", str(output)]
    return lambda: utils.exit_on_user_error(script.main)(options.parse_with_given(script.get_args_parser(), argv))


def demo_py(args, world):
    script = load_script("demo")
    argv = ["--saved_model", world["model"], *RUNTIME, *args]
    return lambda: utils.exit_on_user_error(script.main)(options.parse_with_given(script.get_args_parser(), argv))


# ---------------------------------------------------------------------------------------------
# bad input


def test_every_eval_image_undecodable(world, tmp_path, capsys):
    line = error_line(call_test(["--eval_data", world["broken"]], world, tmp_path), capsys)
    assert line == (f"error: --eval_data {world['broken']}: none of the 3 images decodes; rebuild the LMDBs from "
                    f"readable images (create_lmdb_dataset.py checks them)")
    assert os.listdir(tmp_path) == []  # no report of nothing


def test_every_demo_image_undecodable(world, capsys):
    line = error_line(demo_py(["--image_folder", world["tiffs"]], world), capsys)
    assert line == f"error: --image_folder {world['tiffs']}: none of its 2 image file(s) decodes (a.tif, b.tif)"


@pytest.mark.parametrize("flags, start", [
    (["--workers", "-1"], "--workers -1: must be at least 0"),
    (["--hidden_size", "0"], "--hidden_size 0: must be at least 1"),
    (["--bins", "0"], "--bins 0: must be at least 1"),
    (["--imgW", "1"], "--imgW 1: too narrow for --FeatureExtraction VGG, which needs at least 8 pixels"),
    (["--batch_ratio", "nan-0.5"], "--batch_ratio nan-0.5: every share must be a positive finite number"),
    (["--batch_ratio", "inf-0.5"], "--batch_ratio inf-0.5: every share must be a positive finite number"),
])
def test_numbers_out_of_range(world, tmp_path, capsys, flags, start):
    line = error_line(call_test(["--eval_data", world["eval"], *flags], world, tmp_path), capsys)
    assert line.startswith(f"error: {start}")


@pytest.mark.parametrize("script", ["test", "demo"])
@pytest.mark.parametrize("model, problem", [
    ("malformed", "not valid YAML (expected ',' or ']', but got '<stream end>' at line 2)"),
    ("latin1", "not UTF-8 text (line 1)"),
])
def test_broken_opt_yaml_beside_the_model(world, tmp_path, capsys, script, model, problem):
    path = world["models"] / model / "best_accuracy.pth"
    args = (["--eval_data", world["eval"], "--output", str(tmp_path)] if script == "test"
            else ["--image_folder", world["images"]])
    call = (call_test if script == "test" else demo_py)(args + ["--saved_model", str(path)], world)
    line = error_line(call, capsys)
    assert line.startswith(f"error: {path.parent / 'opt.yaml'}: {problem}; fix or delete it")


@pytest.mark.parametrize("case", ["json_is_a_folder", "output_is_a_file", "csv_is_a_folder"])
def test_output_path_of_the_wrong_kind_fails_before_any_work(world, tmp_path, capsys, case):
    taken = tmp_path / "taken.txt"
    taken.write_text("x")
    call, expected = {
        "json_is_a_folder": (call_test(["--eval_data", world["eval"], "--output_json", str(tmp_path)], world),
                             f"error: --output_json {tmp_path}: a folder; give the path of the file to write, "
                             f"e.g. {tmp_path / 'results.json'}"),
        "output_is_a_file": (call_test(["--eval_data", world["eval"]], world, output=taken),
                             f"error: --output {taken}: a file, not a folder; give a folder (it is made when "
                             f"missing)"),
        "csv_is_a_folder": (demo_py(["--image_folder", world["images"], "--csv", str(tmp_path)], world),
                            f"error: --csv {tmp_path}: a folder; give the path of the file to write, e.g. "
                            f"{tmp_path / 'predictions.csv'}"),
    }[case]
    assert error_line(call, capsys) == expected
    assert sorted(os.listdir(tmp_path)) == ["taken.txt"]


def test_as_a_command_the_error_is_one_line(world, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "demo.py"), "--image_folder", world["images"],
                           "--saved_model", world["model"], "--csv", str(tmp_path), *RUNTIME],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"error: --csv {tmp_path}: a folder; give the path of the file to write, "
                                        f"e.g. {tmp_path / 'predictions.csv'}"]


# ---------------------------------------------------------------------------------------------
# read-only and full disks


def below(path, folder):
    try:
        path = os.path.abspath(os.fsdecode(path))
    except TypeError:  # a file descriptor
        return False
    return path == folder or path.startswith(folder + os.sep)


class FullFile:
    """A file on a full disk: opening works, every write fails as the kernel's ENOSPC does (no name)."""

    def __init__(self, real):
        self.real = real

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()


def simulate(monkeypatch, folder, kind):
    """Make `folder` behave as on a read-only (`EROFS`) or a full (`ENOSPC`) file system for this test."""
    folder = os.path.abspath(folder)
    real_open, real_os_open, real_mkdir, real_replace, real_lmdb_open = (
        builtins.open, os.open, os.mkdir, os.replace, lmdb.open)

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    def fake_open(file, mode="r", *args, **kwargs):
        if below(file, folder) and any(flag in mode for flag in "wax+"):
            if kind == "EROFS":
                refuse(file)
            return FullFile(real_open(file, mode, *args, **kwargs))
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if kind == "EROFS" and below(path, folder) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    def fake_mkdir(path, mode=0o777, *, dir_fd=None):
        if kind == "EROFS" and below(path, folder) and not os.path.exists(path):  # an existing one: EEXIST
            refuse(path)
        return real_mkdir(path, mode, dir_fd=dir_fd)

    def fake_replace(src, dst, **kwargs):
        if kind == "EROFS" and (below(src, folder) or below(dst, folder)):
            refuse(src)
        return real_replace(src, dst, **kwargs)

    def fake_lmdb_open(path, **kwargs):
        if below(path, folder) and not kwargs.get("readonly"):
            raise lmdb.Error(f"{path}: {os.strerror(errno.EROFS if kind == 'EROFS' else errno.ENOSPC)}")
        return real_lmdb_open(path, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    monkeypatch.setattr(os, "replace", fake_replace)
    monkeypatch.setattr(os, "rename", fake_replace)
    monkeypatch.setattr(lmdb, "open", fake_lmdb_open)


def writer_call(writer, world, tmp_path):
    """`(wrapped main call, the folder it writes into)` for each of the six writers."""
    out = tmp_path / "out"
    out.mkdir()
    if writer == "test.py --output":
        return call_test(["--eval_data", world["eval"]], world, output=out), out
    if writer == "test.py --output_json":
        return call_test(["--eval_data", world["eval"], "--output_json", str(out / "r.json")], world,
                       output=tmp_path / "figures"), out
    if writer == "demo.py --csv":
        return demo_py(["--image_folder", world["images"], "--csv", str(out / "p.csv")], world), out
    if writer == "create_lmdb_dataset.py":
        (tmp_path / "gt.txt").write_text("img1.png\tab\n", encoding="utf-8")
        argv = ["--inputPath", world["images"], "--gtFile", str(tmp_path / "gt.txt"), "--outputPath",
                str(out / "lmdb")]
        return lambda: create_lmdb_dataset.main(argv), out
    if writer == "tools/al_report.py":
        run = shutil.copytree(world["run"], out / "random")
        return lambda: load_script("tools/al_report").main(["--run", str(run)]), out
    if writer == "train.py":
        script = load_script("train")
        argv = ["--train_data", str(world["train"]), "--valid_data", world["valid"], "--select_data",
                "CVPR2016-NIPS2014", "--batch_ratio", "0.5-0.5", "--num_iter", "1", "--valInterval", "1",
                "--output_dir", str(out), "--exp_name", "exp", *RUNTIME, *sum(([f"--{k}", str(v)] for k, v in ARCH.items()
                                                                         if not isinstance(v, bool) and v != ""), [])]
        return lambda: utils.exit_on_user_error(script.main)(script.get_args_parser().parse_args(argv)), out
    if writer == "data_sampling.py":
        script = load_script("data_sampling")
        train = shutil.copytree(world["train"], out / "train")
        argv = ["--train_data", str(train), "--select_data", "CVPR2016-NIPS2014", "--batch_ratio", "0.5-0.5",
                "--total_data_usage_ratio", "0.5", "--saved_model", world["model"], "--query", "random",
                "--ratio", "0.5", *RUNTIME]
        return lambda: utils.exit_on_user_error(script.main)(options.parse_with_given(script.get_args_parser(),
                                                                                       argv)), train
    raise ValueError(writer)


WRITERS = ["train.py", "data_sampling.py", "test.py --output", "test.py --output_json", "demo.py --csv",
           "create_lmdb_dataset.py", "tools/al_report.py"]


@pytest.mark.parametrize("writer", WRITERS)
def test_read_only_output_folder(world, tmp_path, monkeypatch, capsys, writer):
    call, folder = writer_call(writer, world, tmp_path)
    simulate(monkeypatch, folder, "EROFS")
    line = error_line(call, capsys)
    assert str(folder) in line and "read-only file system" in line.lower()
    monkeypatch.undo()
    if writer == "data_sampling.py":
        assert sorted(os.listdir(folder)) == ["CVPR2016", "NIPS2014"]
    else:
        assert os.listdir(folder) in ([], ["random"])


@pytest.mark.parametrize("writer", ["data_sampling.py", "test.py --output_json", "demo.py --csv",
                                    "tools/al_report.py", "create_lmdb_dataset.py"])
def test_full_disk(world, tmp_path, monkeypatch, capsys, writer):
    call, folder = writer_call(writer, world, tmp_path)
    simulate(monkeypatch, folder, "ENOSPC")
    line = error_line(call, capsys)
    assert line.startswith(f"error: {folder}")
    assert "no space left on device" in line.lower() and "free some space" in line
    monkeypatch.undo()
    leftovers = [name for name in os.listdir(folder) if name.startswith(".")]
    for run_folder in [folder / "random"] if writer == "tools/al_report.py" else []:
        leftovers += [name for name in os.listdir(run_folder) if name.startswith(".")]
    assert leftovers == []  # no temporary left behind
