"""Option helpers shared by the scripts: which options were given, --temperature, path checks."""
import argparse

import pytest
import torch
import yaml

import options
from utils import UserError


def script_parser(saved_model_help="model to run"):
    parser = options.make_parser("a script that runs a saved model")
    group = parser.add_argument_group("script")
    options.add_temperature_arg(group)
    options.add_common_args(parser, saved_model_help=saved_model_help)
    return parser


# ---------------------------------------------------------------------------------------------
# given options


def test_parse_with_given_records_typed_options_abbreviations_included():
    opt = options.parse_with_given(script_parser(), ["--Prediction", "CTC", "--imgW=120", "--batch_s", "8",
                                                     "--rgb"])
    assert opt.given_options == ["Prediction", "batch_size", "imgW", "rgb"]
    assert (opt.Prediction, opt.imgW, opt.batch_size, opt.rgb) == ("CTC", 120, 8, True)
    # a value equal to the default still counts: it was typed
    assert options.parse_with_given(script_parser(), ["--imgH", "32"]).given_options == ["imgH"]


def test_given_option_names_prefers_the_record_then_falls_back_to_defaults():
    parser = script_parser()
    recorded = options.parse_with_given(parser, ["--imgH", "32"])
    recorded.imgW = 300  # changed after parsing: not typed, so not given
    assert options.given_option_names(recorded, parser) == {"imgH"}

    built = parser.parse_args([])  # a caller's own Namespace: what differs from the defaults
    built.Prediction, built.hidden_size, built.imgH = "Attn", 64, 32
    assert options.given_option_names(built, parser) == {"Prediction", "hidden_size"}


def test_given_options_keep_their_values_over_the_saved_opt_yaml(tmp_path):
    (tmp_path / "opt.yaml").write_text(yaml.safe_dump({"Prediction": "Attn", "imgW": 160, "hidden_size": 64}))
    model = tmp_path / "best_accuracy.pth"
    model.write_bytes(b"")
    parser = script_parser()
    opt = options.parse_with_given(parser, ["--saved_model", str(model), "--Prediction", "CTC"])
    options.fill_from_saved(opt, options.given_option_names(opt, parser))
    assert (opt.Prediction, opt.imgW, opt.hidden_size) == ("CTC", 160, 64)


# ---------------------------------------------------------------------------------------------
# parsers and help


def test_saved_model_flag_only_where_asked_for_and_help_skips_empty_defaults():
    text = " ".join(script_parser("model to evaluate (required)").format_help().split())
    assert "model to evaluate (required); architecture flags not given are read from the opt.yaml" in text
    assert "(default: 32)" in text            # --imgH: a default worth showing
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: )" not in text
    plain = argparse.ArgumentParser()
    options.add_common_args(plain)
    assert "--saved_model" not in plain.format_help()
    with pytest.raises(SystemExit):
        required = argparse.ArgumentParser()
        options.add_common_args(required, model_required=True)
        required.parse_args([])


def test_temperature_help_names_auto_only_where_it_is_accepted():
    with_auto, without = argparse.ArgumentParser(), argparse.ArgumentParser()
    options.add_temperature_arg(with_auto)
    options.add_temperature_arg(without, allow_auto=False, note="fit one elsewhere")
    assert "none | auto (fitted on --valid_data by NLL) | a number > 0" in " ".join(with_auto.format_help().split())
    help_text = " ".join(without.format_help().split())
    assert "auto" not in help_text and "none | a number > 0; fit one elsewhere" in help_text


# ---------------------------------------------------------------------------------------------
# --temperature values


@pytest.mark.parametrize("value, default, expected", [
    ("none", "auto", None), (" None ", None, None), ("auto", None, "auto"), ("AUTO", None, "auto"),
    ("1.5", None, 1.5), ("2", None, 2.0), ("1e-3", None, 0.001),
    (None, None, None), (None, "auto", "auto"), ("", "auto", "auto"),  # not given -> the caller's default
])
def test_parse_temperature_values(value, default, expected):
    assert options.parse_temperature(value, default=default) == expected


@pytest.mark.parametrize("value, message", [
    ("warm", "--temperature warm: give none, auto or a positive number such as 1.5"),
    ("0", "--temperature 0: the temperature must be a positive finite number"),
    ("-1", "--temperature -1: the temperature must be a positive finite number"),
    ("inf", "--temperature inf: the temperature must be a positive finite number"),
    ("nan", "--temperature nan: the temperature must be a positive finite number"),
])
def test_parse_temperature_rejects_with_the_flag_and_the_fix(value, message):
    with pytest.raises(UserError) as info:
        options.parse_temperature(value)
    assert str(info.value) == message


def test_auto_refused_where_it_cannot_be_fitted():
    assert options.parse_temperature("0.8", allow_auto=False) == 0.8
    with pytest.raises(UserError) as info:
        options.parse_temperature("auto", allow_auto=False, hint="fit one with test.py --temperature auto")
    assert str(info.value) == ("--temperature auto: give none or a positive number such as 1.5 "
                               "(fit one with test.py --temperature auto)")


# ---------------------------------------------------------------------------------------------
# required paths


def test_require_file_and_dir(tmp_path):
    model = tmp_path / "model.pth"
    model.write_bytes(b"x")
    options.require_file(str(model), "--saved_model", "give the checkpoint")
    options.require_dir(str(tmp_path), "--eval_data", "give the folder")
    cases = [
        (options.require_file, "", {}, "--saved_model is required: give the checkpoint"),
        (options.require_file, None, {}, "--saved_model is required: give the checkpoint"),
        (options.require_file, str(tmp_path / "nope.pth"), {}, f"--saved_model {tmp_path / 'nope.pth'}: no such file"),
        (options.require_file, str(tmp_path / "nope.pth"), {"if_absent": "train a model first"},
         f"--saved_model {tmp_path / 'nope.pth'}: no such file; train a model first"),
        (options.require_file, str(tmp_path), {}, f"--saved_model {tmp_path}: no such file"),  # a folder
        (options.require_dir, str(model), {}, f"--saved_model {model}: no such folder"),         # a file
    ]
    for check, value, extra, message in cases:
        with pytest.raises(UserError) as info:
            check(value, "--saved_model", "give the checkpoint", **extra)
        assert str(info.value) == message


# ---------------------------------------------------------------------------------------------
# ranges of the shared options (resolve_options)


@pytest.mark.parametrize("ratio", ["nan-0.5", "inf-0.5", "0.5-Infinity", "0.5-NaN"])
def test_batch_ratio_must_be_positive_and_finite(make_opt, ratio):
    with pytest.raises(UserError) as info:
        make_opt(batch_ratio=ratio)
    assert str(info.value) == (f"--batch_ratio {ratio}: every share must be a positive finite number (0 only for a "
                               f"relabel set), e.g. 0.5-0.5")


@pytest.mark.parametrize("name, value, message", [
    ("workers", -1, "--workers -1: must be at least 0 (0 loads the data in the main process)"),
    ("threads", -2, "--threads -2: must be at least 0 (0 chooses from the cores)"),
    ("hidden_size", 0, "--hidden_size 0: must be at least 1 (default 256)"),
    ("bins", 0, "--bins 0: must be at least 1 (default 15)"),
    ("batch_size", 0, "--batch_size 0: must be at least 1 (default 192)"),
    ("batch_max_length", 0, "--batch_max_length 0: must be at least 1 (the longest label; default 25)"),
    ("input_channel", 0, "--input_channel 0: must be at least 1 (default 1)"),
    ("output_channel", 15, "--output_channel 15: must be at least 16 (the feature extractors divide it by 16; "
                           "default 512)"),
    ("imgH", 31, "--imgH 31: must be at least 32 (the feature extractors halve the height 4 times and end in a "
                 "2x2 convolution; default 32)"),
    ("imgW", 2.5, "--imgW 2.5: not a whole number"),
])
def test_whole_number_options_out_of_range(make_opt, name, value, message):
    with pytest.raises(UserError) as info:
        make_opt(**{name: value})
    assert str(info.value) == message


@pytest.mark.parametrize("transformation, extractor, narrowest", [
    # width after the extractor: VGG floor(floor(W/2)/2) - 1, RCNN and ResNet floor(floor(W/2)/2) + 1,
    # each >= 1 once the two halvings leave a column; TPS's localization network halves W 3 times
    ("None", "VGG", 8), ("None", "RCNN", 4), ("None", "ResNet", 4),
    ("TPS", "VGG", 8), ("TPS", "RCNN", 8), ("TPS", "ResNet", 8),
])
def test_narrowest_image_width_runs_and_one_less_is_refused(make_opt, transformation, extractor, narrowest):
    from model import Model

    arch = dict(Transformation=transformation, FeatureExtraction=extractor, SequenceModeling="None",
                Prediction="CTC", output_channel=16, character="ab")
    opt = make_opt(imgW=narrowest, **arch)
    opt.num_class = 3
    with torch.no_grad():
        logits = Model(opt).eval()(torch.zeros(1, 1, 32, narrowest), None, is_train=False)
    assert logits.shape[1] >= 1
    with pytest.raises(UserError) as info:
        make_opt(imgW=narrowest - 1, **arch)
    stage = "--Transformation TPS" if transformation == "TPS" and extractor != "VGG" else f"--FeatureExtraction {extractor}"
    assert str(info.value).startswith(f"--imgW {narrowest - 1}: too narrow for {stage}")
    assert f"give --imgW {narrowest} or more" in str(info.value)


def test_tps_needs_an_even_number_of_fiducial_points(make_opt):
    for count in (2, 5):
        with pytest.raises(UserError, match=f"^--num_fiducial {count}: TPS needs an even number of at least 4"):
            make_opt(Transformation="TPS", num_fiducial=count)
    assert make_opt(Transformation="None", num_fiducial=5).num_fiducial == 5  # unused without TPS


# ---------------------------------------------------------------------------------------------
# --threads


@pytest.fixture
def machine(monkeypatch):
    """Pretend torch starts with 16 threads on a process allowed 8 cores; returns the counts set."""
    set_to = []
    monkeypatch.setattr(options.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(options.torch, "get_num_threads", lambda: 16)
    monkeypatch.setattr(options.torch, "set_num_threads", set_to.append)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    return set_to


def test_threads_default_shares_the_cores_among_the_processes_of_the_run(make_opt, machine, monkeypatch):
    assert make_opt().threads == 0 and machine == [8]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun --nproc_per_node 4
    make_opt()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    make_opt()
    assert machine == [8, 2, 1]
    make_opt(threads=3)
    assert machine[-1] == 3


def test_threads_default_never_raises_a_lower_count(make_opt, machine, monkeypatch):
    monkeypatch.setattr(options.torch, "get_num_threads", lambda: 1)  # OMP_NUM_THREADS=1
    make_opt()
    assert machine == []


def test_threads_flag_is_documented():
    text = " ".join(script_parser().format_help().split())
    assert "--threads THREADS CPU threads of torch's operators. 0: the cores this process may use divided" in text


# ---------------------------------------------------------------------------------------------
# opt.yaml beside a model, output paths


@pytest.mark.parametrize("content, message", [
    (b"Prediction: [CTC\n", "not valid YAML (expected ',' or ']', but got '<stream end>' at line 2)"),
    (b"Prediction: CTC\nimgW: \xff\xfe\n", "not UTF-8 text (line 2)"),
    (b"- Prediction\n- CTC\n", "holds a list, not option: value lines"),
])
def test_bad_opt_yaml_is_a_user_error_naming_it(tmp_path, content, message):
    (tmp_path / "opt.yaml").write_bytes(content)
    with pytest.raises(UserError) as info:
        options.load_opt_yaml(str(tmp_path / "best_accuracy.pth"))
    assert str(info.value) == (f"{tmp_path / 'opt.yaml'}: {message}; fix or delete it, or give the architecture "
                               f"flags (--Transformation ... --Prediction) yourself")


def test_opt_yaml_values_of_the_wrong_type(tmp_path):
    model = tmp_path / "best_accuracy.pth"
    parser = script_parser()
    (tmp_path / "opt.yaml").write_text("imgW: wide\nhidden_size: null\nrgb: 1\n")
    opt = options.parse_with_given(parser, ["--saved_model", str(model), "--rgb"])
    with pytest.raises(UserError) as info:
        options.fill_from_saved(opt, options.given_option_names(opt, parser))
    assert str(info.value) == f"{tmp_path / 'opt.yaml'}: imgW is 'wide', not a whole number; fix the file or give --imgW"
    opt = options.parse_with_given(parser, ["--saved_model", str(model), "--rgb", "--imgW", "90"])
    options.fill_from_saved(opt, options.given_option_names(opt, parser))  # given flags are not read from it
    assert (opt.imgW, opt.hidden_size, opt.rgb) == (90, None, True)        # null counts as absent


def test_output_paths_checked_before_any_work(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    options.check_output_file(str(tmp_path / "new" / "r.json"), "--output_json")
    options.check_output_dir(str(tmp_path / "new" / "deeper"), "--output")
    options.check_output_file("", "--csv")
    cases = [
        (options.check_output_file, str(tmp_path), "--output_json",
         f"--output_json {tmp_path}: a folder; give the path of the file to write, e.g. {tmp_path / 'results.json'}"),
        (options.check_output_file, str(tmp_path / "new") + "/", "--output_json",
         f"--output_json {tmp_path / 'new'}/: a folder; give the path of the file to write, e.g. "
         f"{tmp_path / 'new' / 'results.json'}"),
        (options.check_output_file, str(tmp_path / "file.txt" / "r.json"), "--output_json",
         f"--output_json {tmp_path / 'file.txt' / 'r.json'}: {tmp_path / 'file.txt'} is a file, not a folder; "
         f"choose another path"),
        (options.check_output_dir, str(tmp_path / "file.txt"), "--output",
         f"--output {tmp_path / 'file.txt'}: a file, not a folder; give a folder (it is made when missing)"),
        (options.check_output_dir, str(tmp_path / "file.txt" / "sub"), "--output",
         f"--output {tmp_path / 'file.txt' / 'sub'}: {tmp_path / 'file.txt'} is a file, not a folder; "
         f"choose another path"),
    ]
    for check, value, flag, message in cases:
        with pytest.raises(UserError) as info:
            check(value, flag)
        assert str(info.value) == message
