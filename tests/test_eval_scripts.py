"""test.py and demo.py on a model whose output is known in closed form.

The model (None-VGG-None-CTC, charset "ab") has its CTC head's weight zeroed, so every frame's
logits equal the head's bias whatever the image: blank -60, 'a' BETA, 'b' 0. Greedy decoding
reads "a" on every image, and since the blank is out of reach the only alignment of "a" is
'a' on all T frames, so the word confidence is P("a") = p**T with p = e^BETA / (e^BETA + 1)
(T = 24 feature columns for VGG at imgW 100). BETA is chosen so that p**T = 0.7.

Fitted on labels "a", "a", "b" (`valid_mixed`), the token-level temperature makes each frame's
P('a') = 2/3 (T = BETA / log 2) and the word-level one makes P("a") ** (1 / T) = 0.7 ** (1 / T) = 2/3
(T = WORD_T = log 0.7 / log(2/3))."""
import csv
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch
import yaml
from PIL import Image

import dataset
from data_layer import lmdb_writing
from measurement import evaluation
import options
import utils
from model import Model, save_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMES = 24
CONF = 0.7
BETA = math.log(CONF ** (1 / FRAMES) / (1 - CONF ** (1 / FRAMES)))
TOKEN_T = BETA / math.log(2)
WORD_T = math.log(CONF) / math.log(2 / 3)
ARCH = {"Transformation": "None", "FeatureExtraction": "VGG", "SequenceModeling": "None", "Prediction": "CTC",
        "output_channel": 16, "hidden_size": 8, "input_channel": 1, "num_fiducial": 20, "imgH": 32, "imgW": 100,
        "rgb": False, "PAD": False, "character": "ab", "sensitive": False, "character_file": "",
        "batch_max_length": 5}
RUNTIME = ["--device", "cpu", "--workers", "0", "--batch_size", "4"]


def confidence_at(temperature):
    """P("a") under logits / temperature: every frame must emit 'a' (the blank's share, e^-60/T
    relative, is far below the tolerances used)."""
    p = 1.0 / (1.0 + math.exp(-BETA / temperature))
    return p ** FRAMES


def png_bytes(shade):
    buffer = io.BytesIO()
    Image.new("L", (24, 10), color=shade).save(buffer, format="PNG")
    return buffer.getvalue()


def write_set(path, labels, corrupt=0):
    samples = [(png_bytes(40 * k % 256), label, None) for k, label in enumerate(labels)]
    samples += [(b"not an image at all", "a", None)] * corrupt
    lmdb_writing.write_lmdb(path, samples)


def load_script(name):
    # `test` would import Python's own test package: load the scripts from their files.
    spec = importlib.util.spec_from_file_location(f"script_{name.replace('/', '_')}", os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval_scripts")
    opt = type("Opt", (), dict(ARCH, num_class=3))()
    model = Model(opt)
    with torch.no_grad():
        model.Prediction.weight.zero_()
        model.Prediction.bias.copy_(torch.tensor([-60.0, BETA, 0.0]))
    model_dir = root / "saved_models" / "exp"
    model_dir.mkdir(parents=True)
    save_weights(model, model_dir / "best_accuracy.pth")
    (model_dir / "opt.yaml").write_text(yaml.safe_dump(ARCH))

    eval_root = root / "evaluation"
    write_set(eval_root / "IIIT5k_3000", ["a", "a", "a"], corrupt=1)  # all right, one undecodable
    write_set(eval_root / "SVT", ["b"])                                 # wrong, edit similarity 0
    write_set(eval_root / "CUTE80", ["ab", "ab"])                       # wrong, edit similarity 1/2
    write_set(eval_root / "set10", ["b"])
    write_set(eval_root / "set2", ["a"])
    write_set(root / "valid", ["a", "a"])
    write_set(root / "valid_mixed", ["a", "a", "b"])
    (root / "empty").mkdir()

    images = root / "images"
    (images / "sub").mkdir(parents=True)
    for name in ("img1.png", "img2.png", "sub/img3.png"):
        (images / name).write_bytes(png_bytes(90))
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    (images / "notes.txt").write_text("not an image")
    return {"root": root, "model": str(model_dir / "best_accuracy.pth"), "model_dir": model_dir,
            "eval": str(eval_root), "valid": str(root / "valid"), "valid_mixed": str(root / "valid_mixed"),
            "empty": str(root / "empty"),
            "images": str(images)}


def parse(script, argv):
    """The Namespace the script's __main__ block would build from `argv`."""
    return options.parse_with_given(script.get_args_parser(), argv)


def run_script(name, args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, f"{name}.py"), *args, *RUNTIME],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def table_row(stdout, first_cell):
    for line in stdout.splitlines():
        if line.split("  ")[0].strip() == first_cell:
            return line.split()
    raise AssertionError(f"no row {first_cell!r} in:\n{stdout}")


def test_benchmark_run_figures_order_and_outputs(world):
    result = run_script("test", ["--eval_data", world["eval"], "--saved_model", world["model"],
                                 "--benchmark_all_eval"], cwd=world["root"])
    assert result.returncode == 0, result.stderr
    out_dir = world["root"] / "test_results" / "exp" / "best_accuracy"  # under the working folder (cwd)
    report = json.loads((out_dir / "results.json").read_text())

    names = [s["name"] for s in report["sets"]]
    assert names == ["IIIT5k_3000", "SVT", "CUTE80"]  # benchmark order, not alphabetical; set2/set10 ignored
    assert report["absent"] == ["IC03_860", "IC03_867", "IC13_857", "IC13_1015", "IC15_1811", "IC15_2077", "SVTP"]
    assert report["temperature"] is None
    c = CONF
    iiit, svt, cute = report["sets"]
    assert (iiit["n"], iiit["skipped"], svt["n"], cute["n"]) == (3, 1, 1, 2)
    assert iiit["accuracy"] == pytest.approx(100.0) and svt["accuracy"] == 0 and cute["accuracy"] == 0
    assert (iiit["norm_ED"], svt["norm_ED"], cute["norm_ED"]) == pytest.approx((1.0, 0.0, 0.5))
    for key in ("ece", "ace", "mce"):
        assert iiit[key] == pytest.approx(1 - c, abs=1e-5)
        assert svt[key] == pytest.approx(c, abs=1e-5)
        assert cute[key] == pytest.approx(c, abs=1e-5)
    assert iiit["brier"] == pytest.approx((1 - c) ** 2, abs=1e-5)
    assert cute["brier"] == pytest.approx(c ** 2, abs=1e-5)
    assert all(s["images_per_s"] > 0 for s in report["sets"])

    total, mean = report["total"], report["mean_over_sets"]
    assert (total["n"], total["skipped"], mean["sets"]) == (6, 1, 3)
    assert total["accuracy"] == pytest.approx(50.0)               # 3 right of 6 samples
    assert total["norm_ED"] == pytest.approx((3 * 1.0 + 0.0 + 2 * 0.5) / 6)
    assert total["ece"] == pytest.approx(abs(0.5 - c), abs=1e-5)  # one bin: accuracy 0.5 at confidence c
    assert total["mce"] == pytest.approx(abs(0.5 - c), abs=1e-5)
    assert total["brier"] == pytest.approx((3 * (1 - c) ** 2 + 3 * c ** 2) / 6, abs=1e-5)
    assert mean["accuracy"] == pytest.approx(100.0 / 3)
    assert mean["norm_ED"] == pytest.approx(0.5)
    assert mean["ece"] == pytest.approx((1 - c + c + c) / 3, abs=1e-5)

    for name in names:
        png = out_dir / f"reliability_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert report["sets"][names.index(name)]["reliability_diagram"] == str(png)

    row = table_row(result.stdout, "CUTE80")
    assert row[:8] == ["CUTE80", "2", "0.00", "0.5000", f"{c:.4f}", f"{c:.4f}", f"{c:.4f}", f"{c * c:.4f}"]
    assert table_row(result.stdout, "total")[:4] == ["total", "6", "50.00", f"{4 / 6:.4f}"]
    assert table_row(result.stdout, "mean of 3 sets")[4:7] == ["33.33", "0.5000", f"{(1 + c) / 3:.4f}"]
    assert "absent: IC03_860, IC03_867, IC13_857, IC13_1015, IC15_1811, IC15_2077, SVTP" in result.stdout
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("set "))
    # aligned: each number ends where its column title ends
    assert [line.index("0.5000") + 6 for line in lines if line.startswith("CUTE80")] == [header.index("norm_ED") + 7]


def test_every_lmdb_separately_in_natural_order_with_temperature(world, tmp_path):
    json_path = tmp_path / "out" / "r.json"
    result = run_script("test", ["--eval_data", world["eval"], "--saved_model", world["model"],
                                 "--temperature", "2", "--output", str(tmp_path / "figs"),
                                 "--output_json", str(json_path)], cwd=world["root"])
    assert result.returncode == 0, result.stderr
    report = json.loads(json_path.read_text())
    # lmdb_format.find_lmdbs's natural order (numbers by value; upper case before lower, as natsort)
    assert [s["name"] for s in report["sets"]] == ["CUTE80", "IIIT5k_3000", "SVT", "set2", "set10"]
    assert report["absent"] == [] and report["temperature"] == 2.0
    c2 = confidence_at(2.0)
    by_name = {s["name"]: s for s in report["sets"]}
    assert by_name["set2"]["ece"] == pytest.approx(1 - c2, abs=1e-5)
    assert by_name["set10"]["ece"] == pytest.approx(c2, abs=1e-5)
    assert sorted(os.listdir(tmp_path / "figs")) == sorted(f"reliability_{n}.png" for n in by_name)


def test_temperature_auto_sharpens_when_every_prediction_is_right(world, tmp_path, capsys):
    # All validation labels are "a", which P("a") = p(T)**24 makes likelier as T falls, so the
    # fitted temperature is below 1 and the confidences on the correct set rise towards 1.
    script = load_script("test")
    out = script.main(parse(script, ["--eval_data", os.path.join(world["eval"], "set2"),
                                     "--saved_model", world["model"], "--temperature", "auto",
                                     "--valid_data", world["valid"], "--output", str(tmp_path),
                                     *RUNTIME]))
    temperature = out["temperature"]
    assert 0 < temperature < 1
    (only,) = out["sets"]
    assert only["ece"] == pytest.approx(1 - confidence_at(temperature), abs=1e-5)
    assert only["ece"] < 1 - CONF
    assert f"temperature {temperature:.4f}" in capsys.readouterr().out


def test_calibration_both_compares_unscaled_token_and_word_per_set_and_in_total(world, tmp_path):
    # Every image reads "a" at one confidence, so each set's metrics follow from its labels in
    # closed form: right words at confidence q give ECE 1 - q, wrong ones q; all 8 words pooled
    # (4 right) fall in one bin, ECE |0.5 - q|. Token-level scaling (each frame's P('a') = 2/3)
    # leaves q = (2/3)^24, almost 0; word-level makes q = 2/3, the share of "a" in valid_mixed.
    json_path = tmp_path / "r.json"
    result = run_script("test", ["--eval_data", world["eval"], "--saved_model", world["model"],
                                 "--temperature", "auto", "--calibration", "both", "--valid_data",
                                 world["valid_mixed"], "--output", str(tmp_path), "--output_json", str(json_path)],
                        cwd=world["root"])
    assert result.returncode == 0, result.stderr
    report = json.loads(json_path.read_text())
    assert report["calibration_method"] == "both"
    assert report["temperature"] == pytest.approx(TOKEN_T, rel=5e-3)  # the main table: token-level
    confidence = {"none": CONF, "token": (2 / 3) ** FRAMES, "word": 2 / 3}
    metric_keys = {"ece", "ace", "mce", "brier"}

    def check(block, right, wrong):
        assert list(block) == ["none", "token", "word"]
        assert set(block["none"]) == metric_keys
        assert set(block["token"]) == set(block["word"]) == metric_keys | {"temperature"}
        assert block["token"]["temperature"] == pytest.approx(TOKEN_T, rel=5e-3)
        assert block["word"]["temperature"] == pytest.approx(WORD_T, rel=1e-4)
        for scaling, q in confidence.items():
            n = right + wrong
            ece = abs(right / n - q)
            assert block[scaling]["ece"] == pytest.approx(ece, abs=1e-4)
            assert block[scaling]["mce"] == pytest.approx(ece, abs=1e-4)
            assert block[scaling]["brier"] == pytest.approx((right * (1 - q) ** 2 + wrong * q ** 2) / n, abs=1e-4)

    by_name = {s["name"]: s for s in report["sets"]}
    check(by_name["IIIT5k_3000"]["calibration"], right=3, wrong=0)
    check(by_name["CUTE80"]["calibration"], right=0, wrong=2)
    check(by_name["set10"]["calibration"], right=0, wrong=1)
    check(report["total"]["calibration"], right=4, wrong=4)
    # the main table's figures are those of the token-level block
    assert by_name["IIIT5k_3000"]["ece"] == pytest.approx(by_name["IIIT5k_3000"]["calibration"]["token"]["ece"])
    assert "calibration" not in report["mean_over_sets"]

    lines = result.stdout.splitlines()
    assert f"temperature {report['temperature']:.4f} (fitted on --valid_data, token-level)" in lines[0]
    header = next(k for k, line in enumerate(lines) if line.split()[:3] == ["set", "scaling", "temperature"])
    total = next(k for k in range(header, len(lines)) if lines[k].startswith("total"))
    # ACE: one word per equal-count bin (8 words, 15 bins), so the mean |correct - q|: 0.5 at q = 0.7
    assert lines[total].split() == ["total", "none", "-", "0.2000", "0.5000", "0.2000",
                                    f"{(0.3 ** 2 + 0.7 ** 2) / 2:.4f}"]
    token_row, word_row = lines[total + 1].split(), lines[total + 2].split()
    assert token_row[:3] == ["token", f"{report['temperature']:.4f}", f"{0.5 - (2 / 3) ** FRAMES:.4f}"]
    assert word_row[:3] == ["word", f"{WORD_T:.4f}", f"{1 / 6:.4f}"]


def test_calibration_word_scales_the_main_table(world, tmp_path):
    script = load_script("test")
    out = script.main(parse(script, ["--eval_data", os.path.join(world["eval"], "set2"),
                                     "--saved_model", world["model"], "--temperature", "auto",
                                     "--calibration", "word", "--valid_data", world["valid_mixed"],
                                     "--output", str(tmp_path), *RUNTIME]))
    assert out["temperature"] == pytest.approx(WORD_T, rel=1e-4) and out["calibration_method"] == "word"
    assert out["sets"][0]["ece"] == pytest.approx(1 / 3, abs=1e-4)
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["calibration_method"] == "word" and "calibration" not in report["sets"][0]


@pytest.mark.parametrize("case, message", [
    ("missing_model", "--saved_model"),
    ("missing_folder", "--eval_data"),
    ("empty_folder", "no LMDB"),
    ("model_does_not_fit", "does not fit"),
    ("auto_without_valid", "--valid_data"),
    ("no_benchmark_set", "--benchmark_all_eval"),
    ("bad_temperature", "--temperature"),
    ("calibration_without_auto", "--calibration word: it chooses how --temperature auto is fitted"),
    ("bad_calibration", "--calibration chars: give token, word or both"),
])
def test_test_py_errors_exit_2_with_one_line(world, tmp_path, capsys, case, message):
    args = {"missing_model": ["--eval_data", world["eval"], "--saved_model", str(tmp_path / "nope.pth")],
            "missing_folder": ["--eval_data", str(tmp_path / "nowhere"), "--saved_model", world["model"]],
            "empty_folder": ["--eval_data", world["empty"], "--saved_model", world["model"]],
            "model_does_not_fit": ["--eval_data", world["eval"], "--saved_model", world["model"],
                                   "--output_channel", "32"],
            "auto_without_valid": ["--eval_data", world["eval"], "--saved_model", world["model"],
                                   "--temperature", "auto"],
            "no_benchmark_set": ["--eval_data", os.path.join(world["eval"], "set2"), "--saved_model",
                                 world["model"], "--benchmark_all_eval"],
            "bad_temperature": ["--eval_data", world["eval"], "--saved_model", world["model"],
                                "--temperature", "-1"],
            "calibration_without_auto": ["--eval_data", world["eval"], "--saved_model", world["model"],
                                         "--temperature", "2", "--calibration", "word"],
            "bad_calibration": ["--eval_data", world["eval"], "--saved_model", world["model"],
                                "--temperature", "auto", "--calibration", "chars"]}[case]
    script = load_script("test")
    with pytest.raises(SystemExit) as exit_info:
        script.utils.exit_on_user_error(script.main)(parse(script, args + ["--output", str(tmp_path)] + RUNTIME))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_test_py_as_a_command_exits_2_without_traceback(world, tmp_path):
    result = run_script("test", ["--eval_data", world["empty"], "--saved_model", world["model"]], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --eval_data") and "Traceback" not in result.stderr


def test_demo_table_csv_and_skipped_file(world, tmp_path):
    csv_path = tmp_path / "pred.csv"
    result = run_script("demo", ["--image_folder", world["images"], "--saved_model", world["model"],
                                 "--temperature", "2", "--csv", str(csv_path)], cwd=world["root"])
    assert result.returncode == 0, result.stderr
    c2 = confidence_at(2.0)
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith(("img", "sub"))]
    assert rows == [["img1.png", "a", f"{c2:.4f}"], ["img2.png", "a", f"{c2:.4f}"],
                    [os.path.join("sub", "img3.png"), "a", f"{c2:.4f}"]]
    assert "skipped 1 undecodable file(s): broken.png" in result.stdout
    assert "notes.txt" not in result.stdout

    with open(csv_path, newline="", encoding="utf-8") as f:
        records = list(csv.DictReader(f))
    assert [r["file"] for r in records] == ["img1.png", "img2.png", os.path.join("sub", "img3.png"), "broken.png"]
    assert [r["prediction"] for r in records[:3]] == ["a", "a", "a"]
    assert all(float(r["confidence"]) == pytest.approx(c2, abs=1e-5) for r in records[:3])
    assert records[3]["status"].startswith("skipped") and records[3]["confidence"] == ""
    assert [p.name for p in tmp_path.iterdir()] == ["pred.csv"]  # no temporary left behind


def test_demo_temperature_auto_fitted_at_the_word_level(world, tmp_path, capsys):
    script = load_script("demo")
    rows, _ = script.main(parse(script, ["--image_folder", world["images"], "--saved_model", world["model"],
                                         "--temperature", "auto", "--calibration", "word",
                                         "--valid_data", world["valid_mixed"], *RUNTIME]))
    assert [conf for _, _, conf in rows] == pytest.approx([2 / 3] * 3, abs=1e-4)
    out = capsys.readouterr().out
    assert f"confidence calibrated with temperature {WORD_T:g}"[:-2] in out and "word-level" in out


def test_demo_errors_exit_2(world, tmp_path, capsys):
    script = load_script("demo")
    for args, message in ((["--image_folder", str(tmp_path / "none"), "--saved_model", world["model"]],
                           "--image_folder"),
                          (["--image_folder", world["images"], "--saved_model", world["model"],
                            "--temperature", "auto"], "--valid_data"),
                          (["--image_folder", world["images"], "--saved_model", world["model"],
                            "--temperature", "auto", "--calibration", "both", "--valid_data", world["valid"]],
                           "--calibration both: give token or word")):
        with pytest.raises(SystemExit) as exit_info:
            script.utils.exit_on_user_error(script.main)(parse(script, args + RUNTIME))
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the shared pieces the scripts are built from


def test_format_table_aligns_columns_and_draws_rules():
    text = utils.format_table(["set", "n", "acc"], [["a", "3", "1.5"], None, ["total", "12", "10.25"]])
    assert text.splitlines() == ["set     n    acc",
                                 "----------------",
                                 "a       3    1.5",
                                 "----------------",
                                 "total  12  10.25"]
    text = utils.format_table(["file", "prediction", "confidence"], [["img1.png", "a", "0.4900"]], align="<<>")
    assert text.splitlines() == ["file      prediction  confidence",
                                 "-" * 32,
                                 "img1.png  a" + " " * 15 + "0.4900"]


class BigramAttn(torch.nn.Module):
    """A stand-in Attn model that ignores the image: each step's logits depend on the previous
    token alone, `logits[previous]` (C x C); greedy decoding feeds back its argmax, teacher forcing
    the given text ([GO] first). It records (is_train, text) of every call."""

    def __init__(self, logits, steps):
        super().__init__()
        self.logits, self.steps, self.calls = logits, steps, []

    def forward(self, images, text, is_train=True):
        self.calls.append((is_train, text.tolist()))
        if is_train:
            return self.logits[text[:, :self.steps]]
        previous, steps = torch.zeros(images.size(0), dtype=torch.long), []
        for _ in range(self.steps):
            steps.append(self.logits[previous])
            previous = steps[-1].argmax(-1)
        return torch.stack(steps, 1)


def test_attn_token_temperature_is_fitted_on_teacher_forced_logits():
    # [GO] 0, [s] 1, a 2, b 3. After each token one winner at logit log 13 against one runner-up at
    # 0 (p = 13/14 and 1/14; the rest at -1e4, nothing): [GO] -> a over b, a -> b over [s],
    # b -> [s] over a, [s] -> [s] over a. Greedy: "ab" with confidence (13/14)^3.
    converter = utils.AttnLabelConverter("ab")
    pairs = {0: (2, 3), 2: (3, 1), 3: (1, 2), 1: (1, 2)}
    logits = torch.full((4, 4), -1e4)
    for previous, (winner, runner_up) in pairs.items():
        logits[previous, winner], logits[previous, runner_up] = math.log(13.0), 0.0
    model = BigramAttn(logits, steps=4)
    opt = types.SimpleNamespace(batch_max_length=3, Prediction="Attn")
    labels = ["ab", "ab", "ab", "b", "ab"]  # 20% one-character deletions
    loader = [(torch.zeros(3, 1, 32, 100), labels[:3], None), (torch.zeros(2, 1, 32, 100), labels[3:], None)]
    # With two candidates per step, each at margin log 13, the NLL of the labels under logits / T is
    # least where sigmoid(log 13 / T) = (label tokens that are winners) / (all label tokens).
    # Teacher-forced: "ab" scores a, b, [s] after [GO], a, b: 3 winners each; "b" scores b after
    # [GO] (runner-up) and [s] after b (winner): 13 of 14, sigmoid(log 13 / T) = 13/14, T = 1.
    # Greedy: "b"'s [s] is scored after the reading's a, where it is the runner-up: 12 of 14,
    # sigmoid(log 13 / T) = 6/7, T = log 13 / log 6 = 1.43.
    fitted = evaluation.fit_temperatures_on_loader(model, loader, converter, opt, "cpu", methods=("token", "word"))
    assert fitted["token"] == pytest.approx(1.0, rel=1e-3)
    # the word level still judges the greedy readings, "ab" each, 4 of 5 right at (13/14)^3:
    # c^(1/T) = 4/5
    assert fitted["word"] == pytest.approx(3 * math.log(13 / 14) / math.log(4 / 5), rel=1e-4)
    greedy, forced = model.calls[0], model.calls[1]
    assert not greedy[0] and forced[0] and forced[1] == [[0, 2, 3, 1], [0, 2, 3, 1], [0, 2, 3, 1]]
    assert model.calls[3][1] == [[0, 3, 1, 0], [0, 2, 3, 1]]  # the second batch, fed [GO] + label
    # what the greedy logits give (the fit before teacher forcing)
    greedy_logits = torch.cat([model(images, torch.zeros(len(batch), 4, dtype=torch.long), is_train=False)
                               for images, batch, _ in loader])
    assert evaluation.fit_temperature_on_logits(greedy_logits, labels, converter, opt) == \
        pytest.approx(math.log(13) / math.log(6), rel=1e-3)
    # token level alone runs the teacher-forced pass only
    model.calls.clear()
    assert evaluation.fit_temperature_on_loader(model, loader, converter, opt, "cpu") == pytest.approx(1.0, rel=1e-3)
    assert [is_train for is_train, _ in model.calls] == [True, True]


def test_load_model_and_fit_temperature_on_a_loader(world, tmp_path):
    # Labels "a", "a", "b": every frame must emit the label's character (the blank is out of
    # reach), so the NLL is -24 (2 log s + log(1 - s)) with s = sigmoid(BETA / T), least at s = 2/3,
    # i.e. T = BETA / log 2. The undecodable sample is skipped, not fitted on. (Within 1e-3 of
    # log T the fp32 loss is flat to its last bit, hence the tolerance.)
    write_set(tmp_path / "mixed", ["a", "a", "b"], corrupt=1)
    script = load_script("test")
    opt = parse(script, ["--eval_data", world["eval"], "--saved_model", world["model"], *RUNTIME])
    options.fill_from_saved(opt, options.given_option_names(opt, script.get_args_parser()))
    options.resolve_options(opt)
    model, converter = evaluation.load_model(opt, torch.device("cpu"))
    assert not model.training and opt.num_class == 3 and converter.character == ["[CTCblank]", "a", "b"]

    mixed, _ = dataset.hierarchical_dataset(str(tmp_path / "mixed"), opt)
    loader = evaluation.eval_loader(mixed, opt, "cpu")
    temperature = evaluation.fit_temperature_on_loader(model, loader, converter, opt, "cpu")
    assert temperature == pytest.approx(TOKEN_T, rel=5e-3)
    # word level: P("a") = 2/3, the share of right readings
    assert evaluation.fit_temperature_on_loader(model, loader, converter, opt, "cpu", method="word") == \
        pytest.approx(WORD_T, rel=1e-4)
    both = evaluation.fit_temperatures_on_loader(model, loader, converter, opt, "cpu", methods=("token", "word"))
    assert both == {"token": pytest.approx(TOKEN_T, rel=5e-3), "word": pytest.approx(WORD_T, rel=1e-4)}
    with pytest.raises(utils.UserError, match="^--valid_data v: no readable sample to fit the temperature on$"):
        evaluation.fit_temperature_on_loader(model, [], converter, opt, "cpu", source="--valid_data v")
