"""tools/benchmark.py: its measuring helpers, and one run of every part at tiny sizes."""
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from data_layer import lmdb_format

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1024 * 1024


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", os.path.join(ROOT, "tools", "benchmark.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


benchmark = load_benchmark()


def test_within_noise_uses_the_binomial_band_of_a_difference():
    # 50% vs 48% on 1000 images: 1.96 * sqrt((0.25 + 0.2496) / 1000) = 4.38 points of noise.
    ok, tolerance, band = benchmark.within_noise(50.0, 48.0, 1000, None)
    assert ok and band == pytest.approx(4.381, abs=1e-3) and tolerance == band
    # On 10000 images the band shrinks to 1.385 points: a 2-point gap is no longer noise...
    ok, tolerance, _ = benchmark.within_noise(50.0, 48.0, 10000, None)
    assert not ok and tolerance == pytest.approx(1.385, abs=1e-3)
    # ...unless fp32 runs of different seeds already differ by more than that.
    ok, tolerance, _ = benchmark.within_noise(50.0, 48.0, 10000, 3.0)
    assert ok and tolerance == 3.0


def allocate(megabytes):
    """A Python child that touches `megabytes` of fresh memory, then exits."""
    return [sys.executable, "-c", f"import time; b = bytearray({megabytes} * 1024 * 1024); "
                                  "b[::4096] = b'x' * len(b[::4096]); time.sleep(0.5)"]


def test_run_measured_sees_the_memory_a_child_touches(tmp_path):
    small = benchmark.run_measured(allocate(10), str(tmp_path / "small.log"), 0.02)
    large = benchmark.run_measured(allocate(210), str(tmp_path / "large.log"), 0.02)
    assert small[0] == 0 and large[0] == 0
    # ru_maxrss of each child alone (wait4), not the largest child so far: 200 MB more, within slack.
    assert 180 * MIB < large[2] - small[2] < 230 * MIB
    # The /proc polling sees the same 200 MB as anonymous memory.
    assert 180 * MIB < large[4] - small[4] < 230 * MIB
    failed = benchmark.run_measured([sys.executable, "-c", "raise SystemExit(3)"], str(tmp_path / "f.log"), 0.02)
    assert failed[0] == 3


def test_descendants_lists_grandchildren():
    child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; "
                              "subprocess.run([sys.executable, '-c', 'import time; time.sleep(5)'])"])
    try:
        for _ in range(100):
            tree = benchmark.descendants(child.pid)
            if len(tree) == 2:
                break
            time.sleep(0.05)
        assert tree[0] == child.pid and len(tree) == 2
    finally:
        for pid in reversed(benchmark.descendants(child.pid)):
            os.kill(pid, 9)
        child.wait()


def test_build_pool_cycles_the_source_into_exactly_n_samples(tmp_path):
    source = [(b"image-a", "ab"), (b"image-b", "cd"), (b"image-c", "ef")]
    root = benchmark.build_pool(str(tmp_path / "pool"), 7, source)
    with lmdb_format.shared_env(os.path.join(root, benchmark.POOL_NAME)).begin() as txn:
        assert int(txn.get(b"num-samples")) == 7
        images = [txn.get(b"image-%09d" % i) for i in range(1, 8)]
        labels = [txn.get(b"label-%09d" % i).decode() for i in range(1, 8)]
        assert txn.get(b"query-meta") is None  # a base dataset, so it has an unlabelled pool
    assert images == [b"image-a", b"image-b", b"image-c"] * 2 + [b"image-a"]
    assert labels == ["ab", "cd", "ef", "ab", "cd", "ef", "ab"]


def test_bad_part_name_is_a_user_error(tmp_path):
    result = subprocess.run([sys.executable, "tools/benchmark.py", "--only", "train,speed",
                             "--output", str(tmp_path / "b.json")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert "--only: unknown speed" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_tiny_benchmark_of_every_part(tiny_data, tmp_path):
    output = tmp_path / "bench.json"
    sizes = (40, 90)
    command = [sys.executable, "tools/benchmark.py", "--output", str(output), "--repeats", "2", "--threads", "1",
               "--device", "cpu", "--arch", "None-VGG-None-CTC", "--output_channel", "16", "--hidden_size", "16",
               "--batch_size", "4", "--variants", "fp32,amp,amp_channels_last", "--warmup", "0",
               "--train_data", tiny_data.train, "--valid_data", tiny_data.valid, "--workers", "0",
               "--loader_batches", "2", "--loader_warmup", "0", "--pool_sizes", ",".join(map(str, sizes)),
               "--sampling_output_channel", "16", "--sampling_hidden_size", "16", "--num_query", "5",
               "--accuracy_arch", "None-VGG-None-CTC", "--accuracy_output_channel", "16",
               "--accuracy_hidden_size", "16", "--accuracy_iters", "2", "--accuracy_batch_size", "8",
               "--accuracy_check"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(output.read_text())

    assert data["machine"]["cpu"] == benchmark.cpu_model()
    assert data["machine"]["versions"]["torch"] == torch.__version__
    assert data["model"]["arch"] == "None-VGG-None-CTC" and data["model"]["num_class"] == 37
    for part in ("train", "infer"):
        assert list(data[part]) == ["fp32", "amp", "amp_channels_last"]
        fp32 = data[part]["fp32"]["images_per_s"]
        for entry in data[part].values():
            assert len(entry["runs"]) == 2 and entry["images_per_s"] > 0
            assert entry["images_per_s"] == pytest.approx(sorted(entry["runs"])[0] / 2 + sorted(entry["runs"])[1] / 2)
            assert entry["speedup_vs_fp32"] == pytest.approx(entry["images_per_s"] / fp32)

    loader = data["loader"]
    assert loader["batch_size"] == 4 and loader["images_per_batch"] == 4 and len(loader["runs"]) == 2
    fastest = max(e["images_per_s"] for e in data["train"].values())
    assert loader["vs_training"] == pytest.approx(loader["images_per_s"] / fastest)

    sampling = data["sampling"]
    assert [p["pool_size"] for p in sampling["pools"]] == list(sizes)
    for pool in sampling["pools"]:
        assert len(pool["runs"]) == 2
        for run in pool["runs"]:
            # data_sampling.py saw exactly the generated pool, scored all of it and picked --num_query.
            assert run["pool_size"] == run["scored"] == pool["pool_size"] and run["num_picked"] == 5
            assert run["maxrss_mb"] > 50 and run["peak_tree_pss_mb"] > 0
    assert sampling["memory_growth_mb"] == pytest.approx(
        sampling["pools"][1]["maxrss_mb"] - sampling["pools"][0]["maxrss_mb"])

    accuracy = data["accuracy"]
    assert accuracy["valid_samples"] > 0
    assert [r["iteration"] for r in accuracy["runs"]["fp32"] + accuracy["runs"]["amp"]] == [2, 2]
    assert 0.0 <= accuracy["fp32_accuracy"] <= 100.0 and 0.0 <= accuracy["amp_accuracy"] <= 100.0

    names = [c["name"] for c in data["checks"]]
    assert names == ["amp_train_speedup", "amp_infer_speedup", "amp_accuracy_within_noise",
                     "sampling_memory_growth_mb", "sampling_tree_anon_growth_mb", "loader_vs_model_ratio"]
    assert "targets:" in result.stdout and "marginal rate" in result.stdout


def test_coreset_part_measures_storage_and_selection():
    args = benchmark.get_args_parser().parse_args(["--only", "coreset", "--coreset_pool", "3000", "--coreset_dim",
                                                   "64", "--coreset_picks", "20", "--coreset_candidates", "500"])
    benchmark.validate_args(args)
    # once untimed: the first run in a process also pays torch's one-time allocations (about 12 MB
    # here), which only an earlier test in the same process would have paid before
    benchmark.bench_coreset(args)
    result = benchmark.bench_coreset(args)
    assert result["embeddings_mb"] == pytest.approx(3000 * 64 * 2 / MIB)  # float16: 2 bytes a value
    assert [(r["candidates"], r["picked"]) for r in result["selection"].values()] == [(3000, 20), (500, 20)]
    # where /proc can tell: no more than the 0.37 MB store and a few batches (less where the store
    # lands on pages the process freed earlier)
    if result["store_peak_growth_mb"] is not None:
        assert result["store_peak_growth_mb"] < 0.37 + 8
    text = benchmark.format_table({"machine": {"cpu": "x", "usable_cores": 1, "versions": {"torch": "t"},
                                               "torch_threads": 1, "device": "cpu"},
                                   "coreset": result, "checks": [], "elapsed_s": 1.0})
    assert "k-centre of 20 among 500" in text
    fewer = benchmark.get_args_parser().parse_args(["--only", "coreset", "--coreset_candidates", "10"])
    with pytest.raises(benchmark.utils.UserError, match="--coreset_candidates must be at least --coreset_picks"):
        benchmark.validate_args(fewer)


def test_build_large_pool_cycles_the_source_in_one_transaction(tmp_path):
    source = [(b"image-a", "ab"), (b"image-bb", "cd"), (b"image-ccc", "ef")]
    root = benchmark.build_large_pool(str(tmp_path / "pool"), 7, source)
    with lmdb_format.shared_env(os.path.join(root, benchmark.POOL_NAME)).begin() as txn:
        assert int(txn.get(b"num-samples")) == 7 and txn.get(b"query-meta") is None
        assert [txn.get(b"image-%09d" % i) for i in range(1, 8)] == [b"image-a", b"image-bb", b"image-ccc"] * 2 + \
            [b"image-a"]
        assert [txn.get(b"label-%09d" % i).decode() for i in range(1, 8)] == ["ab", "cd", "ef"] * 2 + ["ab"]
        assert txn.get(b"image-%09d" % 8) is None and txn.stat()["entries"] == 2 * 7 + 1
    assert os.listdir(root) == [benchmark.POOL_NAME]  # no hidden folder left behind


@pytest.mark.parametrize("size", [1, 7, 20000, 200000, 333333, 999999])
def test_usage_ratio_leaves_exactly_the_asked_pool(size):
    total = 1000000
    ratio = benchmark.usage_ratio_leaving(total, size)
    # hierarchical_dataset labels int(total * ratio) samples; the pool is the rest
    assert total - int(total * float(repr(ratio))) == size


@pytest.mark.slow
def test_tiny_benchmark_of_the_pool_part(tiny_data, tmp_path):
    output = tmp_path / "bench.json"
    command = [sys.executable, "tools/benchmark.py", "--only", "pool", "--output", str(output), "--repeats", "1",
               "--threads", "1", "--device", "cpu", "--train_data", tiny_data.train, "--workers", "0",
               "--sampling_output_channel", "16", "--sampling_hidden_size", "16", "--num_query", "5",
               "--large_pool", "60", "--distinct_images", "4", "--pool_subsample", "20", "--full_pool_sizes", "30",
               "--workdir", str(tmp_path / "work")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    pool = json.loads(output.read_text())["pool"]
    assert (pool["large_pool"], pool["distinct_images"], pool["pool_subsample"]) == (60, 4, 20)
    subsampled, full = pool["cases"]
    # the subsampled run pooled all 60 and scored 20; the other scored the last 30 whole
    assert (subsampled["case"], subsampled["pool_size"], subsampled["scored"], subsampled["subsampled"]) == \
        ("subsample_20", 60, 20, True)
    assert (full["case"], full["pool_size"], full["scored"], full["subsampled"]) == ("full_30", 30, 30, False)
    for case in pool["cases"]:
        assert case["images_per_s"] == pytest.approx(case["scored"] / case["wall_s"])
        assert case["maxrss_mb"] > 50 and 0 < case["cpu_s"] and len(case["runs"]) == 1
    assert pool["full_large_pool_extrapolated_from"] == 30
    assert pool["full_large_pool_wall_s"] == pytest.approx(full["wall_s"] * 2)
    assert "(extrapolated linearly from the pool of 30)" in result.stdout
    assert not os.path.exists(tmp_path / "work" / "large_pool" / benchmark.POOL_NAME)  # the GBs are removed
