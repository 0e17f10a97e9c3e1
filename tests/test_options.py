"""Option helpers shared by the scripts: which options were given, --temperature, path checks."""
import argparse

import pytest
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
