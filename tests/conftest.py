"""Shared fixtures: tiny rendered LMDB datasets and resolved option namespaces."""
import argparse
import os
import sys
import types

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import options  # noqa: E402

TINY_SEED = 7


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs of the scripts (still part of make test)")


# Options a test gets unless it overrides them: everything else is options.py's default.
# workers=0 keeps loaders in-process (2 shared cores); the stages pick the smallest model.
TEST_DEFAULTS = {
    "select_data": "CVPR2016-NIPS2014",
    "workers": 0,
    "Transformation": "None",
    "FeatureExtraction": "VGG",
    "SequenceModeling": "BiLSTM",
    "Prediction": "CTC",
    "train_data": None,
    "valid_data": None,
    "noise_ratio": 0.0,
    "noise_scope": "queried",
}


def build_opt(**overrides):
    """An options Namespace with the defaults of options.py, `overrides` applied, then resolved
    (select_data list, batch_ratio floats, total_data_usage_ratio float, character string)."""
    parser = argparse.ArgumentParser()
    options.add_data_args(parser)
    options.add_model_args(parser, required=False)
    options.add_runtime_args(parser)
    opt = parser.parse_args([])
    for name, value in {**TEST_DEFAULTS, **overrides}.items():
        setattr(opt, name, value)
    return options.resolve_options(opt)


@pytest.fixture
def make_opt():
    """The `build_opt(**overrides)` function."""
    return build_opt


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Rendered LMDBs: train/CVPR2016 and train/NIPS2014 (120 images each), valid/synth_eval (60)."""
    from tools import make_synth_lmdb as synth

    root = tmp_path_factory.mktemp("tiny_data")
    seen, unseen = synth.split_fonts()
    sets = {
        "cvpr": ("train/CVPR2016", 120, "cvpr2016", seen),
        "nips": ("train/NIPS2014", 120, "nips2014", seen),
        "eval": ("valid/synth_eval", 60, "mixed", seen + unseen),
    }
    paths = {}
    for k, (key, (rel, n, style, fonts)) in enumerate(sets.items()):
        paths[key] = str(root / rel)
        synth.make_lmdb_set(paths[key], n, style, (TINY_SEED, k), fonts)
    return types.SimpleNamespace(root=str(root), train=str(root / "train"), valid=str(root / "valid"),
                                 counts={"CVPR2016": 120, "NIPS2014": 120, "synth_eval": 60}, **paths)
