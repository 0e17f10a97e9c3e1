"""train.py --replay_data / --replay_ratio: rehearsal of labelled source data in every batch."""
import json
import os
import subprocess
import sys

import pytest

import dataset
from data_layer import lmdb_format
from data_layer import lmdb_writing
import train
import utils
from conftest import REPO_ROOT, build_opt

REPLAY_COUNT = 30
SMALL_ARCH = ["--Transformation", "None", "--FeatureExtraction", "VGG", "--SequenceModeling", "BiLSTM",
              "--Prediction", "CTC", "--output_channel", "32", "--hidden_size", "16"]


@pytest.fixture(scope="module")
def replay_root(tiny_data, tmp_path_factory):
    """A folder beside the training data holding one LMDB of 30 decodable images labelled
    source0 .. source29 (no training label looks like these)."""
    # the process's shared environment: another test of this worker may hold the LMDB open already
    with lmdb_format.shared_env(tiny_data.nips).begin() as txn:
        images = [bytes(txn.get(b"image-%09d" % k)) for k in range(1, REPLAY_COUNT + 1)]
    root = tmp_path_factory.mktemp("replay")
    lmdb_writing.write_lmdb(str(root / "source"), ((image, f"source{k}", None) for k, image in enumerate(images)))
    return str(root)


def replay_opt(tiny_data, replay_root, **overrides):
    settings = dict(train_data=tiny_data.train, batch_size=8, total_data_usage_ratio="0.5",
                    replay_data=replay_root, replay_ratio=0.5)
    return build_opt(**{**settings, **overrides})


def test_every_batch_holds_its_replay_share_and_the_loop_counts_only_its_own_labels(tiny_data, replay_root):
    opt = replay_opt(tiny_data, replay_root)
    loader = dataset.Batch_Balanced_Dataset(opt)
    without = dataset.Batch_Balanced_Dataset(replay_opt(tiny_data, replay_root, replay_data="", replay_ratio=0.0))
    # batch 8: half replayed (4), the other half split 0.5-0.5 between the two datasets (2 + 2)
    assert loader.batch_sizes == {"CVPR2016": 2, "NIPS2014": 2, dataset.REPLAY_STREAM: 4}
    assert loader.replay_samples == REPLAY_COUNT
    assert loader.num_samples == without.num_samples  # the replayed samples are no labels of the loop
    replayed = []
    for _ in range(REPLAY_COUNT // 4):  # one epoch of the replay stream: 7 full batches of 4
        images, labels, _ = loader.get_batch()
        assert images.shape[0] == 8
        own = [label for label in labels if label.startswith("source")]
        assert len(own) == 4
        replayed += own
    assert len(set(replayed)) == 28  # without repeats inside an epoch
    assert set(replayed) <= {f"source{k}" for k in range(REPLAY_COUNT)}


def test_annotator_noise_never_touches_the_replayed_labels(tiny_data, replay_root):
    opt = replay_opt(tiny_data, replay_root, noise_ratio=1.0, noise_scope="all")
    loader = dataset.Batch_Balanced_Dataset(opt)
    assert loader.num_corrupted == sum(loader.num_samples.values())  # every label of the loop is wrong
    records = loader.noise_records()
    assert len(records) == loader.num_corrupted
    assert not any(record["clean_label"].startswith("source") for record in records)
    for _ in range(5):
        _, labels, _ = loader.get_batch()
        replayed = labels[4:]  # the replay stream comes last in the batch
        assert all(label in {f"source{k}" for k in range(REPLAY_COUNT)} for label in replayed), replayed


@pytest.mark.parametrize("where", ["same", "inside"])
def test_replay_data_overlapping_the_training_data_is_refused(tiny_data, where):
    replay = tiny_data.train if where == "same" else os.path.join(tiny_data.train, "NIPS2014")
    with pytest.raises(utils.UserError) as error:
        dataset.Batch_Balanced_Dataset(replay_opt(tiny_data, replay))
    assert str(error.value).startswith(f"--replay_data {replay}: overlaps --train_data")


@pytest.mark.parametrize("extra, message", [
    (["--replay_ratio", "1"], "--replay_ratio 1.0: must lie in [0, 1)"),
    (["--replay_ratio", "-0.1"], "--replay_ratio -0.1: must lie in [0, 1)"),
    (["--replay_ratio", "nan"], "--replay_ratio nan: must lie in [0, 1)"),
    (["--replay_ratio", "0.5", "--replay_data", ""], "--replay_ratio 0.5: needs --replay_data"),
    (["--replay_ratio", "0"], "--replay_data REPLAY: give --replay_ratio"),
])
def test_replay_flags_out_of_range_are_one_error(tiny_data, replay_root, extra, message):
    args = ["--train_data", tiny_data.train, "--valid_data", tiny_data.valid, "--replay_data", replay_root, *extra]
    opt = train.get_args_parser().parse_args(args)
    with pytest.raises(utils.UserError) as error:
        train.check_train_options(opt)
    assert str(error.value).startswith(message.replace("REPLAY", replay_root))


def run_train(args):
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "train.py"), *args], cwd=REPO_ROOT,
                          capture_output=True, text=True)


def test_a_run_records_the_replay_and_resume_refuses_another_share(tiny_data, replay_root, tmp_path):
    args = ["--train_data", tiny_data.train, "--valid_data", tiny_data.valid, "--select_data", "CVPR2016-NIPS2014",
            "--batch_ratio", "0.5-0.5", *SMALL_ARCH, "--batch_size", "8", "--workers", "0", "--num_iter", "2",
            "--valInterval", "2", "--total_data_usage_ratio", "0.5", "--output_dir", str(tmp_path),
            "--exp_name", "run", "--replay_data", replay_root, "--replay_ratio", "0.5"]
    result = run_train(args)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["replay_samples"] == REPLAY_COUNT and summary["replay_ratio"] == 0.5
    labelled = sum(len(dataset.hierarchical_dataset(tiny_data.train, build_opt(total_data_usage_ratio="0.5"),
                                                    [name], split="labelled")[0])
                   for name in ("CVPR2016", "NIPS2014"))
    assert summary["labelled_total"] == labelled
    resumed = run_train([*args[:args.index("--replay_ratio")], "--replay_ratio", "0.25", "--num_iter", "4",
                         "--resume", str(tmp_path / "run" / "last.pth")])
    assert resumed.returncode == 2
    assert "--replay_ratio 0.5 -> 0.25" in resumed.stderr and "Traceback" not in resumed.stderr
