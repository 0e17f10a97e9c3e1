"""create_lmdb_dataset.py: gt parsing, skipped-line reasons, byte-exact round trip, CLI exit codes."""
import io
import os
import subprocess
import sys

import lmdb
import numpy as np
import pytest
from PIL import Image

import create_lmdb_dataset as create
import dataset
from data_layer import lmdb_format
from data_layer import lmdb_writing
from conftest import REPO_ROOT
from utils import UserError

SCRIPT = os.path.join(REPO_ROOT, "create_lmdb_dataset.py")


def read_raw(path):
    with lmdb_format.shared_env(str(path)).begin() as txn:
        return dict(txn.cursor())


@pytest.fixture
def images(tmp_path):
    """A folder of word images and a gt file mixing good and bad lines; returns (root, gt, expected)."""
    root = tmp_path / "input"
    (root / "sub").mkdir(parents=True)
    files = {}
    for k, (name, fmt) in enumerate([("a.png", "PNG"), ("sub/b.jpg", "JPEG"), ("c.png", "PNG"), ("d.png", "PNG")]):
        buf = io.BytesIO()
        Image.new("RGB", (40 + k, 16), (30 * k, 100, 200)).save(buf, format=fmt)
        (root / name).write_bytes(buf.getvalue())
        files[name] = buf.getvalue()
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    gt = tmp_path / "gt.txt"
    lines = [
        "a.png\tHello",
        "sub/b.jpg\tNew York",       # a label with a space
        "missing.png\tghost",
        "broken.png\tbroken",
        "c.png\t",                    # empty label
        "just-a-path-no-tab",
        "",                            # blank line: ignored, not a sample
        "c.png\ttab\tinside",         # split on the first tab only
        "d.png\tlast",
    ]
    gt.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")  # with a BOM, as some editors write
    expected = [(files["a.png"], "Hello"), (files["sub/b.jpg"], "New York"), (files["c.png"], "tab\tinside"),
                (files["d.png"], "last")]
    return root, gt, expected


def assert_lmdb_holds(path, expected):
    raw = read_raw(path)
    assert raw[b"num-samples"] == str(len(expected)).encode()
    for k, (image, label) in enumerate(expected, 1):
        assert raw[b"image-%09d" % k] == image  # stored exactly as read, never re-encoded
        assert raw[b"label-%09d" % k] == label.encode("utf-8")


def test_round_trip_and_reasons(images, tmp_path, capsys):
    root, gt, expected = images
    written, report = create.create_dataset(str(root), str(gt), str(tmp_path / "out"))
    assert written == 4
    assert dict(report.by_reason) == {"missing file": 1, "undecodable image": 1, "empty label": 1,
                                      "malformed line": 1}
    err = capsys.readouterr().err
    assert "line 3: missing file" in err and "line 4: undecodable image" in err
    assert "line 5: empty label" in err and "line 6: malformed line" in err
    assert_lmdb_holds(tmp_path / "out", expected)
    assert sorted(os.listdir(tmp_path)) == ["gt.txt", "input", "out"]  # no temporary left behind


def test_output_reads_back_through_the_dataset(images, tmp_path, make_opt):
    root, gt, _ = images
    create.create_dataset(str(root), str(gt), str(tmp_path / "out"))
    ds = dataset.LmdbDataset(str(tmp_path / "out"), make_opt())
    # default charset: "New York" (space) and "tab\tinside" are filtered, "Hello" lower-cased
    assert [ds[i][1] for i in range(len(ds))] == ["hello", "last"]
    assert ds[0][0].size == (40, 16)


def test_check_valid_off_keeps_undecodable_bytes(images, tmp_path):
    root, gt, _ = images
    written, report = create.create_dataset(str(root), str(gt), str(tmp_path / "out"), check_valid=False)
    assert written == 5 and "undecodable image" not in report.by_reason


def test_no_usable_line_is_an_error_and_writes_nothing(tmp_path):
    (tmp_path / "in").mkdir()
    gt = tmp_path / "gt.txt"
    gt.write_text("nothing.png\tx\n", encoding="utf-8")
    with pytest.raises(UserError, match="no usable line"):
        create.create_dataset(str(tmp_path / "in"), str(gt), str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["gt.txt", "in"]


def test_check_valid_flag_forms():
    base = ["--inputPath", "i", "--gtFile", "g", "--outputPath", "o"]
    assert create.parse_args(base).checkValid is True
    assert create.parse_args(base + ["--checkValid"]).checkValid is True
    assert create.parse_args(base + ["--checkValid", "False"]).checkValid is False
    assert create.parse_args(base + ["--checkValid=false"]).checkValid is False
    assert create.parse_args(base + ["--nocheckValid"]).checkValid is False


def run_script(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=120)


def test_script_round_trip_and_errors(images, tmp_path):
    root, gt, expected = images
    out = tmp_path / "lmdb"
    done = run_script("--inputPath", str(root), "--gtFile", str(gt), "--outputPath", str(out))
    assert done.returncode == 0, done.stderr
    assert "Created dataset with 4 samples" in done.stdout
    assert_lmdb_holds(out, expected)

    again = run_script("--inputPath", str(root), "--gtFile", str(gt), "--outputPath", str(out))
    assert again.returncode == 2
    assert again.stderr.strip().startswith("error: output") and "already holds an LMDB" in again.stderr

    missing = run_script("--inputPath", str(tmp_path / "nope"), "--gtFile", str(gt), "--outputPath",
                         str(tmp_path / "x"))
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [f"error: --inputPath {tmp_path / 'nope'}: no such folder"]
    assert not (tmp_path / "x").exists()


def test_script_missing_gt_file(tmp_path):
    done = run_script("--inputPath", str(tmp_path), "--gtFile", str(tmp_path / "gt.txt"), "--outputPath",
                      str(tmp_path / "x"))
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: --gtFile {tmp_path / 'gt.txt'}: no such file"


def test_check_valid_keeps_16_bit_and_refuses_pixels_of_unknown_range(tmp_path):
    def encoded(array, fmt):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format=fmt)
        return buf.getvalue()

    assert create.check_image(encoded(np.array([[0, 65535]], dtype=np.uint16), "PNG")) is None
    assert create.check_image(encoded(np.array([[0, 70000]], dtype=np.int32), "TIFF")) == \
        "unsupported pixel format (mode I)"
    assert create.check_image(encoded(np.array([[0.5]], dtype=np.float32), "TIFF")) == \
        "unsupported pixel format (mode F)"


def test_full_disk_is_one_error_line_and_leaves_nothing(images, tmp_path, monkeypatch, capsys):
    def full(env, items):
        raise lmdb.DiskError("mdb_txn_commit: No space left on device")

    root, gt, _ = images
    monkeypatch.setattr(lmdb_writing, "put_all", full)
    with pytest.raises(SystemExit) as exit_info:
        create.main(["--inputPath", str(root), "--gtFile", str(gt), "--outputPath", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: {tmp_path / 'out'}: writing the LMDB failed (mdb_txn_commit: No space left on "
                       f"device); free some space or choose another output folder")
    assert sorted(os.listdir(tmp_path)) == ["gt.txt", "input"]
