"""torchrun on CPU (gloo, 2 processes): train.py writes one set of outputs from rank 0 in the usual
checkpoint format, and data_sampling.py sharded over 2 ranks picks exactly what one process picks
(coreset too: its embeddings are gathered like the scores)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from data_layer import lmdb_format
from data_layer import set_records
from model import Model, load_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = ["--Transformation", "None", "--FeatureExtraction", "VGG", "--SequenceModeling", "BiLSTM",
        "--Prediction", "CTC", "--output_channel", "16", "--hidden_size", "16"]
# Half of each training set's kept samples is labelled (split between the 2 ranks), the rest is the pool.
DATA = ["--select_data", "CVPR2016-NIPS2014", "--batch_ratio", "0.5-0.5", "--total_data_usage_ratio", "0.5",
        "--workers", "0", "--device", "cpu", "--manualSeed", "1111", "--no_progress"]
NUM_ITER, VAL_INTERVAL = 4, 2
NUM_QUERY = 12
CHARSET = set("0123456789abcdefghijklmnopqrstuvwxyz")

pytestmark = pytest.mark.slow


def split_by_hand(train_root):
    """{name: (labelled indices, pool indices)}: the labels the default filter keeps (lower-cased, 1 to 25
    characters of the 36-character set), first half labelled, as --total_data_usage_ratio 0.5 asks."""
    split = {}
    for name in ("CVPR2016", "NIPS2014"):
        with lmdb_format.shared_env(os.path.join(train_root, name)).begin() as txn:
            n = int(txn.get(b"num-samples"))
            labels = [txn.get(b"label-%09d" % i).decode().lower() for i in range(1, n + 1)]
        kept = [i for i, label in enumerate(labels, 1) if 0 < len(label) <= 25 and set(label) <= CHARSET]
        half = int(len(kept) * 0.5)
        split[name] = (kept[:half], kept[half:])
    return split


def run(args, nproc=1):
    """Run a script of the repo, under torchrun (gloo on CPU) when nproc > 1; returns the process."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(launcher + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(args[:1])} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def ddp_training(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_train")
    run(["train.py", "--train_data", tiny_data.train, "--valid_data", tiny_data.valid, *ARCH, *DATA,
         "--batch_size", "8", "--num_iter", str(NUM_ITER), "--valInterval", str(VAL_INTERVAL),
         "--output_dir", str(out), "--exp_name", "ddp"], nproc=2)
    return out


def test_ddp_training_writes_one_set_of_outputs_from_rank_0(ddp_training, tiny_data):
    assert sorted(os.listdir(ddp_training)) == ["ddp"]
    exp = ddp_training / "ddp"
    records = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines() if line.strip()]
    # Validation at iteration 1, then every VAL_INTERVAL up to NUM_ITER: 1, 2, 4 -- once, not once per rank.
    assert [r["iteration"] for r in records] == [1, 2, 4]
    log = (exp / "log_train.txt").read_text()
    assert log.count("finished at iteration 4") == 1
    assert "x 2 processes" in log
    assert (exp / "log_dataset.txt").read_text().count("Total_batch_size") == 1
    summary = json.loads((exp / "train_summary.json").read_text())
    assert summary["iterations"] == NUM_ITER
    # Rank 0 reports the whole labelled set, not its own shard.
    assert summary["labelled_total"] == sum(len(lab) for lab, _ in split_by_hand(tiny_data.train).values())
    assert torch.load(exp / "last.pth", map_location="cpu", weights_only=False)["iteration"] == NUM_ITER


def test_ddp_checkpoint_loads_strictly_into_model(ddp_training, make_opt):
    path = ddp_training / "ddp" / "best_accuracy.pth"
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state and all(key.startswith("module.") for key in state)  # the original's DataParallel layout
    opt = make_opt(output_channel=16, hidden_size=16)
    opt.num_class = len(opt.character) + 1
    model = Model(opt)
    load_weights(model, str(path), strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state["module." + key])


def query_set(path):
    """(origins in stored order, labels, image bytes, query-meta) of a query set."""
    with lmdb_format.shared_env(str(path)).begin() as txn:
        n = int(txn.get(b"num-samples"))
        origins = [txn.get(b"origin-%09d" % i).decode() for i in range(1, n + 1)]
        labels = [txn.get(b"label-%09d" % i).decode() for i in range(1, n + 1)]
        images = [bytes(txn.get(b"image-%09d" % i)) for i in range(1, n + 1)]
        meta = json.loads(txn.get(b"query-meta"))
    return origins, labels, images, meta


# uncali with coreset: its scores and its embeddings are gathered (random: top-k of the tie keys). A
# third run, plain uncali top-k, would add ~40 s on the shared machine for the same gathering.
@pytest.mark.parametrize("strategy, acquisition", [("uncali", ["--acquisition", "coreset", "--candidates", "40"]),
                                                   ("random", [])], ids=["uncali-coreset", "random"])
def test_sharded_sampling_picks_what_one_process_picks(strategy, acquisition, ddp_training, tiny_data, tmp_path):
    model = str(ddp_training / "ddp" / "best_accuracy.pth")
    pool = {f"{name}\t{i}" for name, (_, rest) in split_by_hand(tiny_data.train).items() for i in rest}
    picks, summaries = {}, {}
    for mode, nproc in (("single", 1), ("ddp", 2)):
        # A private copy each: a query set written under --train_data leaves the later pools.
        root = tmp_path / mode
        shutil.copytree(tiny_data.train, root)
        run(["data_sampling.py", "--train_data", str(root), *DATA, "--saved_model", model, "--query", strategy,
             "--num_query", str(NUM_QUERY), "--out_name", "picked", "--batch_size", "16", *acquisition], nproc=nproc)
        summary = summaries[mode] = json.loads((root / "picked" / "summary.json").read_text())
        assert summary["pool_size"] == len(pool) and summary["scored"] == len(pool)  # both shards merged
        picks[mode] = query_set(root / "picked")
        assert set_records.read_query_origins(str(root)) == {
            (o.rpartition("\t")[0], int(o.rpartition("\t")[2])) for o in picks[mode][0]}
    single, ddp = picks["single"], picks["ddp"]
    assert len(single[0]) == NUM_QUERY
    assert ddp[0] == single[0]  # the same identities, in the same order
    assert ddp[1] == single[1] and ddp[2] == single[2]
    assert set(single[0]) <= pool  # the unlabelled second half only
    assert ddp[3]["scores"] == pytest.approx(single[3]["scores"], abs=1e-5)
    # The whole pool was scored alike: the pool's mean confidence and accuracy agree.
    conf = {mode: summary["mean_confidence"] for mode, summary in summaries.items()}
    assert conf["ddp"] == pytest.approx(conf["single"], rel=1e-4)
    assert summaries["ddp"]["accuracy"] == summaries["single"]["accuracy"]
    if strategy == "uncali":  # ranked by raw confidence: the least confident samples of the pool
        assert conf["single"]["picked"] < conf["single"]["pool"]
