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


# `make test` runs the modules on two pytest-xdist workers, a whole module per worker (its module
# fixtures are built once), handed out in collection order (--no-loadscope-reorder). The longest go
# first so that neither worker is left alone with a long module at the end: these took the most time
# on a 2-core CPU (`--durations=0`), longest first; every other module follows in its usual order.
# A module that becomes slow belongs in this list.
SLOWEST_MODULES = ("test_experiment.py", "test_train.py", "test_al_loop.py", "test_benchmark.py", "test_resume.py",
                   "test_distributed.py", "test_sampling_safety.py", "test_annotation.py", "test_sampling.py",
                   "test_eval_scripts.py", "test_pool_subsample.py", "test_label_errors.py", "test_create_lmdb.py")


def pytest_collection_modifyitems(session, config, items):
    # a stable sort keeps each module's tests together and in their written order
    rank = {name: k for k, name in enumerate(SLOWEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


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


@pytest.fixture
def no_runs(monkeypatch):
    """tools/experiment.py fails at once instead of running a check or a grid (the in-process tests
    that use it expect a refusal before either)."""
    from tools import experiment

    def refuse(*args, **kwargs):
        raise AssertionError("the settings were accepted")

    monkeypatch.setattr(experiment, "preflight", refuse)
    monkeypatch.setattr(experiment, "run_grid", refuse)
