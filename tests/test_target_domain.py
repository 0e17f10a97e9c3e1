"""tools/make_synth_lmdb.py target styles: warps worked out by hand, determinism, worker
independence and the `--target` layout."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from data_layer import lmdb_format
from tools import make_synth_lmdb as synth


def read_raw(path):
    with lmdb_format.shared_env(str(path)).begin() as txn:
        return dict(txn.cursor())


def test_perspective_coefficients_of_identity_and_scale():
    corners = [(0, 0), (40, 0), (40, 10), (0, 10)]
    identity = synth.perspective_coefficients(corners, corners)
    assert np.allclose(identity, (1, 0, 0, 0, 1, 0, 0, 0), atol=1e-9)
    # out points twice as far apart as the in points: each out pixel reads the in pixel at half its coordinates
    doubled = [(2 * x, 2 * y) for x, y in corners]
    assert np.allclose(synth.perspective_coefficients(doubled, corners), (0.5, 0, 0, 0, 0.5, 0, 0, 0), atol=1e-9)


def test_perspective_coefficients_map_each_corner():
    out_pts = [(0, 3), (50, 0), (50, 20), (0, 15)]  # the left end farther away: shorter
    in_pts = [(0, 0), (48, 0), (48, 16), (0, 16)]
    a, b, c, d, e, f, g, h = synth.perspective_coefficients(out_pts, in_pts)
    for (x, y), (u, v) in zip(out_pts, in_pts):
        denom = g * x + h * y + 1
        assert (a * x + b * y + c) / denom == pytest.approx(u, abs=1e-9)
        assert (d * x + e * y + f) / denom == pytest.approx(v, abs=1e-9)


def test_bilinear_sample_reads_pixels_midpoints_and_zero_outside():
    array = np.array([[0, 10], [20, 30]], dtype=np.float32)
    xs = np.array([0, 1, 0.5, 0.5, -1, 5], dtype=np.float32)
    ys = np.array([1, 0, 0, 0.5, 0, 0], dtype=np.float32)
    assert np.allclose(synth.bilinear_sample(array, xs, ys), [20, 10, 5, 15, 0, 0])


def test_curve_of_strength_zero_is_the_identity_and_a_bend_keeps_the_ink():
    font = synth.get_font(synth.split_fonts()[0][0], 30)
    mask = synth.text_mask("Bending", font, np.random.default_rng(0))
    flat = synth.curve(mask, np.random.default_rng(1), 0.0)
    original = np.asarray(mask, dtype=np.int32)
    assert flat.width == mask.width and flat.height == mask.height + 1  # one spare row: the ceil of offset 0, plus 1
    assert np.array_equal(np.asarray(flat, dtype=np.int32)[:mask.height], original)
    bent = synth.curve(mask, np.random.default_rng(1), 0.6)
    assert bent.height > mask.height + 1  # the baseline moved
    # a vertical shift with a lean moves ink, it does not add or remove it (up to resampling)
    assert np.asarray(bent, dtype=np.float64).sum() == pytest.approx(original.sum(), rel=0.1)


@pytest.mark.parametrize("style", synth.TARGET_STYLES)
def test_target_styles_render_rgb_words_32_high_and_are_deterministic(style):
    first = list(synth.make_samples(4, style, (5, 1)))
    assert first == list(synth.make_samples(4, style, (5, 1)))
    assert first != list(synth.make_samples(4, style, (6, 1)))
    for image, label in first:
        img = Image.open(io.BytesIO(image))
        assert img.format == "PNG" and img.mode == "RGB" and img.height == 32 and label


def test_target_output_does_not_depend_on_workers():
    # 70 > 64 samples: the parallel path (a process pool) really runs
    serial = list(synth.make_samples(70, "signage", 11, workers=1, fmt="JPEG"))
    parallel = list(synth.make_samples(70, "signage", 11, workers=2, fmt="JPEG"))
    assert serial == parallel
    assert Image.open(io.BytesIO(serial[0][0])).format == "JPEG"


def test_target_layout_sizes_formats_and_fonts(tmp_path, capsys):
    out = tmp_path / "target"
    synth.main(["--target", "signage", "--out", str(out), "--num_pool", "30", "--num_valid", "5",
                "--num_test", "4", "--workers", "1"])
    expected = {"train_data_lmdb/signage": (30, "JPEG"), "valid_data_lmdb/signage_valid": (5, "PNG"),
                "test_data_lmdb/signage_test": (4, "PNG")}
    labels = {}
    for rel, (count, fmt) in expected.items():
        raw = read_raw(out / rel)
        assert raw[b"num-samples"] == str(count).encode()
        assert Image.open(io.BytesIO(raw[b"image-000000001"])).format == fmt
        labels[rel] = [raw[b"label-%09d" % k] for k in range(1, count + 1)]
    # every set draws its own words: the pool does not repeat the validation or test sequence
    assert labels["train_data_lmdb/signage"][:4] != labels["test_data_lmdb/signage_test"]
    assert labels["train_data_lmdb/signage"][:5] != labels["valid_data_lmdb/signage_valid"]
    assert labels["valid_data_lmdb/signage_valid"][:4] != labels["test_data_lmdb/signage_test"]
    info = json.loads((out / "synth_info.json").read_text())
    seen, unseen = synth.split_fonts()
    every_font = sorted(os.path.basename(f) for f in seen + unseen)
    sets = info["sets"]
    assert set(sets) == set(expected)
    assert all(sorted(s["fonts"]) == every_font for s in sets.values())  # the target brings the held-out fonts
    assert not os.path.exists(out / "train_data_lmdb" / "CVPR2016")  # the source sets are not built here
    # the target seeds stay apart from the source sets' (seed, 0..4)
    assert all(len(s["seed"]) == 3 and s["seed"][1] >= 100 for s in sets.values())


def test_unknown_target_style_is_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        synth.parse_args(["--target", "graffiti"])
    assert stop.value.code == 2
    assert "signage" in capsys.readouterr().err
