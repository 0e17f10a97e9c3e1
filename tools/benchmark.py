"""Measure the suite's speed and memory on this machine and check them against the targets.

    python tools/benchmark.py                          # all but accuracy, about 10 minutes on 2 cores
    python tools/benchmark.py --accuracy_check         # and the accuracy part, a few minutes more
    python tools/benchmark.py --only train,infer       # some parts
    python tools/benchmark.py --only sampling --pool_sizes 2000,32000 --repeats 5
    python tools/benchmark.py --only pool --workdir /tmp/bench   # a 1M-sample pool, needs ~5 GB of disk

Parts (`--only`, default all but accuracy; `--accuracy_check` adds it):
  train     training images/s of train.py's step (full-size TPS-ResNet-BiLSTM-Attn by default)
            in fp32, with --amp, and with --amp --channels_last
  infer     inference images/s (greedy forward + vectorised decoding) for the same variants
  loader    images/s of dataset.Batch_Balanced_Dataset on the embedded LMDBs, and how many times
            faster it is than the fastest training variant consumes
  sampling  data_sampling.py run as a subprocess on generated pools of each --pool_sizes size:
            images/s and peak memory (the child's ru_maxrss; the process tree's PSS by /proc polling)
  coreset   data_sampling --acquisition coreset's own cost on synthetic float16 embeddings of the
            real width (--coreset_dim): storing them batch by batch, and greedy k-centre over all
            of the pool and over --coreset_candidates of it: seconds and peak resident growth
  accuracy  a short train.py run in fp32 and with --amp on the embedded data with a small model:
            both validation accuracies and whether they agree within noise
  pool      (opt-in) data_sampling.py on one LMDB of --large_pool samples (its keys cycle through the
            bytes of --distinct_images images): with --pool_subsample, and scoring the whole pool
            (or, with --full_pool_sizes, its last N samples) without it; wall time, images scored
            per second and peak memory as in `sampling`, and the whole pool's time extrapolated

Every figure is the median of --repeats timed runs; warm-up runs are not timed. The table goes to
stdout, everything (machine, versions, settings, per-run values, target checks) to --output."""
import argparse
import contextlib
import gc
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402  (the repo root is on sys.path only from here)
import torch  # noqa: E402

from safe_files import atomic_io  # noqa: E402
import calibrators  # noqa: E402
import dataset  # noqa: E402
from data_layer import lmdb_format  # noqa: E402
from data_layer import lmdb_writing  # noqa: E402
import options  # noqa: E402
import train  # noqa: E402  (its train_step is the code being measured)
import utils  # noqa: E402
from measurement.evaluation import forward_logits  # noqa: E402
from model import Model, initialize_weights, save_weights  # noqa: E402

PARTS = ("train", "infer", "loader", "sampling", "coreset", "accuracy", "pool")
# accuracy is opt-in (--accuracy_check): it trains twice per seed; pool writes GBs and runs long
DEFAULT_PARTS = ("train", "infer", "loader", "sampling", "coreset")
# name -> (amp, channels_last); fp32 first: every speed-up is relative to it.
VARIANTS = {
    "fp32": (False, False),
    "fp32_channels_last": (False, True),
    "amp": (True, False),
    "amp_channels_last": (True, True),
}
DEFAULT_VARIANTS = "fp32,amp,amp_channels_last"
POOL_NAME = "bench_pool"
MIB = 1024.0 * 1024.0
TARGETS = {"amp_speedup": 2.0, "memory_growth_mb": 100.0, "loader_ratio": 5.0}


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output", default="benchmark_results/benchmark.json", help="JSON results file")
    parser.add_argument("--only", default=",".join(DEFAULT_PARTS),
                        help="comma-separated parts: " + ", ".join(PARTS))
    parser.add_argument("--accuracy_check", action="store_true",
                        help="add the accuracy part (two short training runs per seed, a few minutes)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (the median is reported)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--workdir", default="", help="scratch folder (default: a temporary one, removed)")

    model = parser.add_argument_group("train / infer")
    model.add_argument("--arch", default="TPS-ResNet-BiLSTM-Attn", help="Transformation-Feature-Sequence-Prediction")
    model.add_argument("--output_channel", type=int, default=512)
    model.add_argument("--hidden_size", type=int, default=256)
    model.add_argument("--imgH", type=int, default=32)
    model.add_argument("--imgW", type=int, default=100)
    model.add_argument("--batch_size", type=int, default=64)
    model.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated: " + ", ".join(VARIANTS))
    model.add_argument("--warmup", type=int, default=1, help="untimed iterations per variant")
    model.add_argument("--train_iters", type=int, default=1, help="training iterations per timed run")
    model.add_argument("--infer_iters", type=int, default=2, help="inference batches per timed run")

    data = parser.add_argument_group("loader / sampling / accuracy data")
    data.add_argument("--train_data", default="data/train_data_lmdb", help="embedded training LMDBs (`make data`)")
    data.add_argument("--valid_data", default="data/valid_data_lmdb", help="validation LMDBs of the accuracy check")
    data.add_argument("--select_data", default="CVPR2016-NIPS2014")
    data.add_argument("--batch_ratio", default="0.5-0.5")
    data.add_argument("--workers", type=int, default=None, help="loader workers (default: the scripts' default)")
    data.add_argument("--loader_batches", type=int, default=20, help="batches per timed loader run")
    data.add_argument("--loader_warmup", type=int, default=5, help="untimed batches after the first")

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--pool_sizes", default="2000,8000,32000", help="comma-separated pool sizes")
    sampling.add_argument("--sampling_arch", default="None-VGG-None-CTC", help="small model, real code path")
    sampling.add_argument("--sampling_output_channel", type=int, default=64)
    sampling.add_argument("--sampling_hidden_size", type=int, default=64)
    sampling.add_argument("--sampling_query", default="uncali", help="query strategy of data_sampling.py")
    sampling.add_argument("--num_query", type=int, default=10)
    sampling.add_argument("--sampling_batch_size", type=int, default=None,
                          help="--batch_size of data_sampling.py (default: its own default)")
    sampling.add_argument("--poll_interval", type=float, default=0.05, help="seconds between /proc memory polls")

    diverse = parser.add_argument_group("coreset")
    diverse.add_argument("--coreset_pool", type=int, default=100000, help="synthetic pool size")
    diverse.add_argument("--coreset_dim", type=int, default=256,
                         help="embedding width (256: --hidden_size of the seed TPS-ResNet-BiLSTM-Attn)")
    diverse.add_argument("--coreset_picks", type=int, default=1000, help="samples to pick (1%% of 100k)")
    diverse.add_argument("--coreset_candidates", type=int, default=10000,
                         help="the --candidates of the restricted selection")
    diverse.add_argument("--coreset_batch", type=int, default=192, help="rows stored per batch")
    pool = parser.add_argument_group("pool (the sampling part's model and query, on one large pool)")
    pool.add_argument("--large_pool", type=int, default=1000000, help="samples in the large pool's LMDB")
    pool.add_argument("--distinct_images", type=int, default=16,
                      help="distinct images (read from --train_data) whose bytes the pool's keys cycle through")
    pool.add_argument("--pool_subsample", type=int, default=20000,
                      help="data_sampling.py --pool_subsample N of the subsampled run (on the whole large pool)")
    pool.add_argument("--full_pool_sizes", default="",
                      help="comma-separated pool sizes scored whole, without --pool_subsample: the last N samples "
                           "of the large pool (--total_data_usage_ratio labels the rest); default: the large pool "
                           "itself. The large pool's time is extrapolated linearly from the largest")

    accuracy = parser.add_argument_group("accuracy")
    accuracy.add_argument("--accuracy_arch", default="None-VGG-BiLSTM-CTC")
    accuracy.add_argument("--accuracy_output_channel", type=int, default=128)
    accuracy.add_argument("--accuracy_hidden_size", type=int, default=128)
    accuracy.add_argument("--accuracy_iters", type=int, default=1000,
                          help="training iterations of each run (the small model reaches about 45%% by 1000)")
    accuracy.add_argument("--accuracy_batch_size", type=int, default=64)
    accuracy.add_argument("--accuracy_seeds", default="1111", help="comma-separated seeds; fp32 and amp run each")
    accuracy.add_argument("--accuracy_train_args", default="--adam --lr 0.001",
                          help="extra train.py flags of the accuracy runs")
    return parser


# ---------------------------------------------------------------------------------------------
# small helpers


def parse_list(text, flag, convert=str, known=None):
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        values = [convert(t) for t in items]
    except ValueError:
        raise utils.UserError(f"{flag} {text}: give comma-separated values") from None
    if not values:
        raise utils.UserError(f"{flag} is empty")
    if known is not None:
        unknown = [v for v in values if v not in known]
        if unknown:
            raise utils.UserError(f"{flag}: unknown {', '.join(map(str, unknown))}; known: {', '.join(known)}")
    return values


def arch_flags(arch, flag):
    stages = arch.split("-")
    if len(stages) != 4:
        raise utils.UserError(f"{flag} {arch}: give four stages, e.g. TPS-ResNet-BiLSTM-Attn")
    flags = []
    for name, value in zip(options.STAGE_CHOICES, stages):
        flags += [f"--{name}", value]
    return flags


def train_opt(argv):
    """train.py's options for `argv`, normalised as train.py does."""
    opt = train.get_args_parser().parse_args(argv)
    with contextlib.redirect_stdout(io.StringIO()):
        options.resolve_options(opt)
    opt.num_class = len(utils.make_converter(opt.Prediction, opt.character).character)
    return opt


def median(values):
    return statistics.median(values) if values else float("nan")


def ratio(a, b):
    if a is None or b is None or not b or a != a or b != b:
        return None
    return a / b


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_runs(step, warmup, iterations, repeats, device):
    """Seconds of each of `repeats` runs of `iterations` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iterations):
            step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


# ---------------------------------------------------------------------------------------------
# machine


def cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def package_version(name):
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # not installed under that name
        return None


def machine_info(device):
    flags = cpu_flags()
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_features": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16"}),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {"torch": torch.__version__, "torchvision": package_version("torchvision"),
                     "numpy": np.__version__, "lmdb": package_version("lmdb"), "pillow": package_version("pillow")},
    }
    return info


# ---------------------------------------------------------------------------------------------
# train / infer


def model_argv(args):
    return arch_flags(args.arch, "--arch") + [
        "--output_channel", str(args.output_channel), "--hidden_size", str(args.hidden_size),
        "--imgH", str(args.imgH), "--imgW", str(args.imgW), "--batch_size", str(args.batch_size),
        "--num_iter", "1000000", "--manualSeed", "1111"]


def synthetic_batch(opt, seed=1111):
    """A fixed batch: images in [-1, 1] and lower-case words of 3 to 10 characters."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(opt.batch_size, opt.input_channel, opt.imgH, opt.imgW, generator=generator) * 2 - 1
    charset = opt.character
    lengths = torch.randint(3, 11, (opt.batch_size,), generator=generator).tolist()
    labels = ["".join(charset[i] for i in torch.randint(0, len(charset), (n,), generator=generator).tolist())
              for n in lengths]
    return images, labels, [("synthetic", i + 1) for i in range(opt.batch_size)]


def build_variant(opt, amp, channels_last, device):
    variant = argparse.Namespace(**vars(opt))
    variant.amp = amp
    variant.channels_last = channels_last
    utils.set_seed(opt.manualSeed)
    model = Model(variant)
    initialize_weights(model)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return variant, model


def bench_train_variant(opt, amp, channels_last, batch, args, device):
    variant, model = build_variant(opt, amp, channels_last, device)
    model.train()
    converter = utils.make_converter(variant.Prediction, variant.character)
    criterion = calibrators.get_calibrator("CE", variant)
    optimizer = train.make_optimizer(model, variant)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and device.type == "cuda")
    step_count = [0]

    def step():
        train.train_step(model, batch, converter, criterion, optimizer, scaler, variant, device, step_count[0])
        step_count[0] += 1

    seconds = timed_runs(step, args.warmup, args.train_iters, args.repeats, device)
    return [args.train_iters * opt.batch_size / s for s in seconds]


def bench_infer_variant(opt, amp, channels_last, batch, args, device):
    variant, model = build_variant(opt, amp, channels_last, device)
    model.eval()
    converter = utils.make_converter(variant.Prediction, variant.character)
    images = batch[0].to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.inference_mode(), utils.autocast_context(device, amp):
            logits = forward_logits(model, images, variant.batch_max_length, variant.Prediction)
        utils.decode_predictions(logits.float(), converter)

    seconds = timed_runs(step, args.warmup, args.infer_iters, args.repeats, device)
    return [args.infer_iters * opt.batch_size / s for s in seconds]


def bench_model(args, device, parts):
    opt = train_opt(model_argv(args))
    batch = synthetic_batch(opt)
    n_params = sum(p.numel() for p in Model(opt).parameters())
    result = {"model": {"arch": args.arch, "imgH": opt.imgH, "imgW": opt.imgW, "batch_size": opt.batch_size,
                        "output_channel": opt.output_channel, "hidden_size": opt.hidden_size,
                        "num_class": opt.num_class, "parameters": n_params,
                        "amp_dtype": "float16" if device.type == "cuda" else "bfloat16"}}
    for part, bench, iters in (("train", bench_train_variant, args.train_iters),
                               ("infer", bench_infer_variant, args.infer_iters)):
        if part not in parts:
            continue
        result[part] = {}
        for name in args.variants:
            amp, channels_last = VARIANTS[name]
            progress(f"{part} {name} ...")
            runs = bench(opt, amp, channels_last, batch, args, device)
            result[part][name] = {"images_per_s": median(runs), "runs": runs, "amp": amp,
                                  "channels_last": channels_last, "iterations_per_run": iters,
                                  "warmup": args.warmup}
        base = result[part].get("fp32", {}).get("images_per_s")
        for name, entry in result[part].items():
            entry["speedup_vs_fp32"] = ratio(entry["images_per_s"], base)
    return result


# ---------------------------------------------------------------------------------------------
# loader


def check_data_root(path, flag):
    if not os.path.isdir(path):
        raise utils.UserError(f"{flag} {path}: no such folder; run `make data` to build the embedded LMDBs")


def loader_argv(args):
    argv = arch_flags(args.arch, "--arch") + [
        "--train_data", args.train_data, "--valid_data", args.train_data, "--select_data", args.select_data,
        "--batch_ratio", args.batch_ratio, "--batch_size", str(args.batch_size),
        "--imgH", str(args.imgH), "--imgW", str(args.imgW)]
    if args.workers is not None:
        argv += ["--workers", str(args.workers)]
    return argv


def bench_loader(args):
    check_data_root(args.train_data, "--train_data")
    opt = train_opt(loader_argv(args))
    images = [0]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        loader = dataset.Batch_Balanced_Dataset(opt)
    built = time.perf_counter() - start

    def step():
        batch_images, labels, _ = loader.get_batch()
        images[0] += batch_images.size(0)
        if len(labels) != batch_images.size(0):
            raise RuntimeError("loader returned images and labels of different lengths")

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    seconds, counts = [], []
    for _ in range(args.loader_warmup):
        step()
    for _ in range(args.repeats):
        images[0] = 0
        start = time.perf_counter()
        for _ in range(args.loader_batches):
            step()
        seconds.append(time.perf_counter() - start)
        counts.append(images[0])
    runs = [c / s for c, s in zip(counts, seconds)]
    result = {"images_per_s": median(runs), "runs": runs, "workers": int(opt.workers),
              "batch_size": sum(loader.batch_sizes.values()), "batches_per_run": args.loader_batches,
              "images_per_batch": counts[0] / args.loader_batches, "setup_s": built, "first_batch_s": first,
              "select_data": "-".join(opt.select_data), "skipped_images": loader.skipped_images,
              "train_data": args.train_data}
    del loader
    return result


# ---------------------------------------------------------------------------------------------
# sampling


def read_source_samples(root, rules, limit):
    """Up to `limit` raw (image bytes, label) pairs whose label passes the default filter."""
    samples = []
    for rel in lmdb_format.find_lmdbs(root):
        with lmdb_format.shared_env(os.path.join(root, rel)).begin(write=False) as txn:
            if txn.get(lmdb_format.QUERY_META_KEY) is not None:
                continue
            for index in range(1, lmdb_format.read_num_samples(txn, rel) + 1):
                image = txn.get(lmdb_format.image_key(index))
                label = txn.get(lmdb_format.label_key(index))
                if image is None or label is None:
                    continue
                text = label.decode("utf-8", errors="replace")
                if rules.reject_reason(rules.normalise(text)) is None and dataset.decode_image(image, False):
                    samples.append((bytes(image), text))
                if len(samples) >= limit:
                    return samples
    return samples


def build_pool(root, size, source):
    """A training root whose single LMDB `bench_pool` holds `size` samples cycled from `source`."""
    path = os.path.join(root, POOL_NAME)
    count = lmdb_writing.write_lmdb(path, ((source[i % len(source)][0], source[i % len(source)][1], None)
                                      for i in range(size)))
    if count != size:
        raise RuntimeError(f"pool of {size} written with {count} samples")
    return root


def write_sampling_model(args, folder):
    opt = train_opt(arch_flags(args.sampling_arch, "--sampling_arch") + [
        "--output_channel", str(args.sampling_output_channel), "--hidden_size", str(args.sampling_hidden_size),
        "--imgH", str(args.imgH), "--imgW", str(args.imgW)])
    utils.set_seed(1111)
    model = Model(opt)
    initialize_weights(model)
    path = os.path.join(folder, "model", "best_accuracy.pth")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_weights(model, path)
    options.save_opt_yaml(opt, os.path.join(os.path.dirname(path), "opt.yaml"))
    return path, opt


def descendants(pid):
    """pid and every process below it (through /proc/<pid>/task/<tid>/children)."""
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children", encoding="ascii") as f:
                    stack.extend(int(child) for child in f.read().split())
        except (OSError, ValueError):
            continue
    return found


def proportional_memory(pid):
    """(Pss, Pss_Anon) of one process in bytes, from /proc/<pid>/smaps_rollup; (0, 0) if it is gone."""
    pss = anon = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                elif line.startswith("Pss_Anon:"):
                    anon = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return pss, anon


class TreeMemoryMonitor:
    """Polls the summed PSS (all pages, and anonymous pages) of a process tree; keeps the peaks.

    PSS shares each page among the processes mapping it, so forked loader workers are not counted
    twice for the libraries they share with their parent."""

    def __init__(self, pid, interval):
        self.pid = pid
        self.interval = interval
        self.peak_pss = 0
        self.peak_anon = 0
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            totals = [proportional_memory(p) for p in descendants(self.pid)]
            self.peak_pss = max(self.peak_pss, sum(t[0] for t in totals))
            self.peak_anon = max(self.peak_anon, sum(t[1] for t in totals))
            self.polls += 1
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# Linux hands a child its parent's peak RSS at fork and keeps it through exec, so a child of this
# (large) process would report at least our own peak. A small launcher process in between starts
# from a fresh, small address space: its child's ru_maxrss is the child's own.
LAUNCHER = """
import json, os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"status": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss,
               "cpu_s": usage.ru_utime + usage.ru_stime}, f)
"""


def run_measured(command, log_path, poll_interval):
    """Run `command`; returns (exit status, wall seconds, peak RSS bytes, peak tree PSS, peak tree anon PSS).

    The peak RSS is ru_maxrss from wait4 on that child alone (the largest of it and the processes it
    waited for, such as loader workers), taken through LAUNCHER."""
    usage_path = log_path + ".rusage.json"
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, usage_path, *command], cwd=REPO,
                                   stdout=log, stderr=subprocess.STDOUT)
        with TreeMemoryMonitor(process.pid, poll_interval) as monitor:
            process.wait()
        wall = time.perf_counter() - start
    if process.returncode != 0 or not os.path.isfile(usage_path):
        return process.returncode or 1, wall, 0, monitor.peak_pss, monitor.peak_anon
    with open(usage_path, encoding="utf-8") as f:
        usage = json.load(f)
    return usage["status"], wall, usage["maxrss_kb"] * 1024, monitor.peak_pss, monitor.peak_anon


def cpu_seconds(log_path):
    """User + system CPU seconds of the last `run_measured(command, log_path, ...)` child and the
    processes it waited for (from its wait4): on a core other jobs share, a steadier measure of the
    work done than the wall time."""
    with open(log_path + ".rusage.json", encoding="utf-8") as f:
        return json.load(f).get("cpu_s")


def log_tail(path, lines=15):
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def sampling_command(args, root, model_path, model_opt, out_name, extra=()):
    command = [sys.executable, os.path.join(REPO, "data_sampling.py"), "--train_data", root,
               "--select_data", POOL_NAME, "--batch_ratio", "1", "--total_data_usage_ratio", "0",
               "--saved_model", model_path, "--query", args.sampling_query, "--num_query", str(args.num_query),
               "--out_name", out_name, "--no_progress", "--device", args.device,
               "--imgH", str(model_opt.imgH), "--imgW", str(model_opt.imgW)]
    command += arch_flags(args.sampling_arch, "--sampling_arch")
    command += ["--output_channel", str(args.sampling_output_channel), "--hidden_size", str(args.sampling_hidden_size)]
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    if args.sampling_batch_size is not None:
        command += ["--batch_size", str(args.sampling_batch_size)]
    return command + list(extra)  # argparse takes the last of a repeated flag


def bench_sampling(args, workdir):
    check_data_root(args.train_data, "--train_data")
    sizes = sorted(set(args.pool_sizes))
    model_path, model_opt = write_sampling_model(args, workdir)
    source = read_source_samples(args.train_data, dataset.LabelRules(model_opt), limit=max(sizes))
    if not source:
        raise utils.UserError(f"--train_data {args.train_data}: no readable sample to build the pools from")
    roots = {}
    for size in sizes:
        progress(f"sampling: writing a pool of {size} images ...")
        roots[size] = build_pool(os.path.join(workdir, f"pool_{size}"), size, source)
    runs = {size: [] for size in sizes}
    # Sizes interleave within each repeat, so a slow spell on a shared machine hits every size alike.
    for repeat in range(args.repeats):
        for size in sizes:
            progress(f"sampling: pool {size}, run {repeat + 1}/{args.repeats} ...")
            out_name = f"bench_query_{repeat}"
            log_path = os.path.join(workdir, f"sampling_{size}_{repeat}.log")
            command = sampling_command(args, roots[size], model_path, model_opt, out_name)
            status, wall, maxrss, pss, anon = run_measured(command, log_path, args.poll_interval)
            if status != 0:
                raise RuntimeError(f"data_sampling.py exited with {status} on the pool of {size}:\n"
                                   f"{log_tail(log_path)}")
            query_dir = os.path.join(roots[size], out_name)
            with open(os.path.join(query_dir, "summary.json"), encoding="utf-8") as f:
                summary = json.load(f)
            # Each run leaves a query set whose origins later pools would exclude; remove it.
            shutil.rmtree(query_dir)
            runs[size].append({"wall_s": wall, "time_s": summary.get("time_s"), "maxrss_mb": maxrss / MIB,
                               "peak_tree_pss_mb": pss / MIB, "peak_tree_anon_mb": anon / MIB,
                               "pool_size": summary.get("pool_size"), "scored": summary.get("scored"),
                               "num_picked": summary.get("num_picked")})
    pools = []
    for size in sizes:
        entries = runs[size]
        wall = median([r["wall_s"] for r in entries])
        inner = median([r["time_s"] for r in entries if r["time_s"] is not None])
        pools.append({"pool_size": size, "wall_s": wall, "time_s": inner,
                      "images_per_s_end_to_end": size / wall,
                      "images_per_s_in_script": size / inner if inner == inner and inner else None,
                      "maxrss_mb": median([r["maxrss_mb"] for r in entries]),
                      "peak_tree_pss_mb": median([r["peak_tree_pss_mb"] for r in entries]),
                      "peak_tree_anon_mb": median([r["peak_tree_anon_mb"] for r in entries]),
                      "runs": entries})
    smallest, largest = pools[0], pools[-1]
    marginal = None
    if len(pools) > 1 and largest["wall_s"] > smallest["wall_s"]:
        # The per-image rate once start-up (imports, model, pool index) is paid: the slope.
        marginal = (largest["pool_size"] - smallest["pool_size"]) / (largest["wall_s"] - smallest["wall_s"])
    return {"model": {"arch": args.sampling_arch, "output_channel": args.sampling_output_channel,
                      "hidden_size": args.sampling_hidden_size},
            "query": args.sampling_query, "num_query": args.num_query, "workers": args.workers,
            "source_samples": len(source), "pools": pools, "marginal_images_per_s": marginal,
            "memory_growth_mb": largest["maxrss_mb"] - smallest["maxrss_mb"],
            "tree_pss_growth_mb": largest["peak_tree_pss_mb"] - smallest["peak_tree_pss_mb"],
            "tree_anon_growth_mb": largest["peak_tree_anon_mb"] - smallest["peak_tree_anon_mb"],
            "growth_from": smallest["pool_size"], "growth_to": largest["pool_size"]}


# ---------------------------------------------------------------------------------------------
# coreset


def resident_kb(field):
    """VmRSS or VmHWM of this process in KiB (None where /proc cannot tell)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak():
    """Start a fresh peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM); the RSS now."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return None
    return resident_kb("VmRSS")


def peak_growth_mb(base):
    peak = resident_kb("VmHWM")
    return None if base is None or peak is None else (peak - base) / 1024.0


def bench_coreset(args):
    from active_learning import coreset

    n, d = args.coreset_pool, args.coreset_dim
    generator = torch.Generator().manual_seed(1111)
    base = reset_peak()
    store = coreset.RowStore(capacity=n)
    store_s = 0.0
    for start in range(0, n, args.coreset_batch):
        features = torch.randn(min(args.coreset_batch, n - start), d, generator=generator)
        begin = time.perf_counter()
        store.add(coreset.to_float16(features))
        store_s += time.perf_counter() - begin
    store_mb = peak_growth_mb(base)
    embeddings = store.array()
    order = np.arange(n)  # the strategy's ranking does not change the cost
    runs = {}
    for label, candidates in (("all", n), ("candidates", min(args.coreset_candidates, n))):
        progress(f"coreset: k-centre, {args.coreset_picks} of {candidates} ...")
        base = reset_peak()
        begin, cpu = time.perf_counter(), time.process_time()
        picked = coreset.k_centre(embeddings, order[:candidates], args.coreset_picks)
        # CPU seconds beside the wall clock: on a shared machine the wall clock also counts waiting
        runs[label] = {"candidates": candidates, "seconds": time.perf_counter() - begin,
                       "cpu_seconds": time.process_time() - cpu, "peak_growth_mb": peak_growth_mb(base),
                       "picked": len(picked)}
    # k-centre costs picks x candidates x dim: the default pool is the 100k the README quotes
    return {"pool": n, "dim": d, "picks": args.coreset_picks, "batch": args.coreset_batch,
            "embedding_bytes_per_sample": d * 2, "embeddings_mb": embeddings.nbytes / MIB,
            "store_s": store_s, "store_peak_growth_mb": store_mb, "selection": runs}


# pool


def build_large_pool(root, size, source):
    """A training root whose LMDB `bench_pool` holds `size` samples, sample i the bytes and label of
    source[(i - 1) % len(source)]; returns the root. Keys sort by index, so one transaction of
    appends writes a million samples in seconds (lmdb_writing.write_lmdb's commits would take minutes);
    written into a hidden folder and renamed into place."""
    import lmdb

    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, POOL_NAME)
    if os.path.lexists(path):
        shutil.rmtree(path)
    tmp = atomic_io.make_temp_dir(root, POOL_NAME)
    try:
        images = [image for image, _ in source]
        labels = [label.encode("utf-8") for _, label in source]
        # every value in its own overflow pages at worst, plus the branch pages: a generous bound
        page = 4096
        per_sample = (max(map(len, images)) // page + 2) * page + 256
        env = lmdb.open(tmp, map_size=size * per_sample + (256 << 20), meminit=False, sync=False)
        try:
            with env.begin(write=True) as txn:
                cursor = txn.cursor()
                k = len(source)
                cursor.putmulti(((lmdb_format.image_key(i), images[(i - 1) % k]) for i in range(1, size + 1)),
                                append=True)
                cursor.putmulti(((lmdb_format.label_key(i), labels[(i - 1) % k]) for i in range(1, size + 1)),
                                append=True)
                txn.put(lmdb_format.NUM_SAMPLES_KEY, str(size).encode())
            env.sync(True)
        finally:
            env.close()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def usage_ratio_leaving(total, size):
    """A --total_data_usage_ratio whose labelled part int(total * ratio) leaves exactly `size`
    samples of `total` to the pool (float rounding nudged away)."""
    ratio = (total - size) / total
    while int(total * ratio) > total - size:
        ratio = float(np.nextafter(ratio, 0.0))
    while int(total * ratio) < total - size:
        ratio = float(np.nextafter(ratio, 1.0))
    return ratio


def pool_cases(args):
    """(name, pool size, extra data_sampling.py flags) of each pool-part run."""
    cases = [(f"subsample_{args.pool_subsample}", args.large_pool,
              ["--pool_subsample", str(args.pool_subsample)])]
    for size in args.full_pool_sizes:
        extra = [] if size == args.large_pool else \
            ["--total_data_usage_ratio", repr(usage_ratio_leaving(args.large_pool, size))]
        cases.append((f"full_{size}", size, extra))
    return cases


def bench_pool(args, workdir):
    check_data_root(args.train_data, "--train_data")
    model_path, model_opt = write_sampling_model(args, workdir)
    source = read_source_samples(args.train_data, dataset.LabelRules(model_opt), limit=args.distinct_images)
    if not source:
        raise utils.UserError(f"--train_data {args.train_data}: no readable sample to build the pool from")
    progress(f"pool: writing {args.large_pool} samples ({len(source)} distinct images) ...")
    start = time.perf_counter()
    root = build_large_pool(os.path.join(workdir, "large_pool"), args.large_pool, source)
    build_s = time.perf_counter() - start
    lmdb_mb = os.path.getsize(os.path.join(root, POOL_NAME, "data.mdb")) / MIB
    runs = []
    try:
        for repeat in range(args.repeats):
            for name, size, extra in pool_cases(args):
                progress(f"pool: {name}, run {repeat + 1}/{args.repeats} ...")
                out_name = f"bench_query_{repeat}"
                log_path = os.path.join(workdir, f"pool_{name}_{repeat}.log")
                command = sampling_command(args, root, model_path, model_opt, out_name, extra)
                status, wall, maxrss, pss, anon = run_measured(command, log_path, args.poll_interval)
                if status != 0:
                    raise RuntimeError(f"data_sampling.py exited with {status} in the pool run {name}:\n"
                                       f"{log_tail(log_path)}")
                query_dir = os.path.join(root, out_name)
                with open(os.path.join(query_dir, "summary.json"), encoding="utf-8") as f:
                    summary = json.load(f)
                shutil.rmtree(query_dir)  # its origins would leave the next run's pool
                if summary["pool_size"] != size:
                    raise RuntimeError(f"pool run {name}: data_sampling.py pooled {summary['pool_size']} samples, "
                                       f"not {size}")
                runs.append({"case": name, "pool_size": size, "wall_s": wall, "time_s": summary.get("time_s"),
                             "cpu_s": cpu_seconds(log_path), "scored": summary["scored"], "subsampled": summary.get("subsampled", False),
                             "maxrss_mb": maxrss / MIB, "peak_tree_pss_mb": pss / MIB,
                             "peak_tree_anon_mb": anon / MIB})
    finally:
        shutil.rmtree(os.path.join(root, POOL_NAME), ignore_errors=True)  # gigabytes
    cases = []
    for name, size, _ in pool_cases(args):
        entries = [r for r in runs if r["case"] == name]
        wall = median([r["wall_s"] for r in entries])
        inner = median([r["time_s"] for r in entries if r["time_s"] is not None])
        scored = entries[0]["scored"]
        cpu = median([r["cpu_s"] for r in entries])
        cases.append({"case": name, "pool_size": size, "scored": scored, "subsampled": entries[0]["subsampled"],
                      "wall_s": wall, "time_s": inner, "cpu_s": cpu, "images_per_s": scored / wall,
                      "images_per_cpu_s": scored / cpu if cpu else None,
                      "images_per_s_in_script": scored / inner if inner == inner and inner else None,
                      "maxrss_mb": median([r["maxrss_mb"] for r in entries]),
                      "peak_tree_pss_mb": median([r["peak_tree_pss_mb"] for r in entries]),
                      "peak_tree_anon_mb": median([r["peak_tree_anon_mb"] for r in entries]),
                      "runs": entries})
    full = max((c for c in cases if not c["subsampled"]), key=lambda c: c["pool_size"])
    return {"model": {"arch": args.sampling_arch, "output_channel": args.sampling_output_channel,
                      "hidden_size": args.sampling_hidden_size},
            "query": args.sampling_query, "num_query": args.num_query, "workers": args.workers,
            "large_pool": args.large_pool, "distinct_images": len(source), "pool_subsample": args.pool_subsample,
            "build_s": build_s, "lmdb_mb": lmdb_mb, "cases": cases,
            # linear through the origin from the largest pool scored whole (start-up counted per image)
            "full_large_pool_wall_s": full["wall_s"] * args.large_pool / full["pool_size"],
            "full_large_pool_cpu_s": full["cpu_s"] * args.large_pool / full["pool_size"] if full["cpu_s"] else None,
            "full_large_pool_extrapolated_from": None if full["pool_size"] == args.large_pool else full["pool_size"]}


# ---------------------------------------------------------------------------------------------
# accuracy


def accuracy_command(args, seed, amp, output_dir, exp_name):
    command = [sys.executable, os.path.join(REPO, "train.py"), "--train_data", args.train_data,
               "--valid_data", args.valid_data, "--select_data", args.select_data, "--batch_ratio", args.batch_ratio,
               "--output_channel", str(args.accuracy_output_channel), "--hidden_size", str(args.accuracy_hidden_size),
               "--batch_size", str(args.accuracy_batch_size), "--num_iter", str(args.accuracy_iters),
               "--valInterval", str(args.accuracy_iters), "--manualSeed", str(seed), "--device", args.device,
               "--output_dir", output_dir, "--exp_name", exp_name, "--no_progress"]
    command += arch_flags(args.accuracy_arch, "--accuracy_arch") + args.accuracy_train_args.split()
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    if amp:
        command.append("--amp")
    return command


def final_record(metrics_path):
    with open(metrics_path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return records[-1]


def validation_size(args):
    opt = train_opt(arch_flags(args.accuracy_arch, "--accuracy_arch"))
    with contextlib.redirect_stdout(io.StringIO()):
        valid, _ = dataset.hierarchical_dataset(args.valid_data, opt, select_data="/")
    return len(valid)


def within_noise(fp32, amp, n, seed_spread):
    """Whether mean accuracies (in %) differ by no more than the noise: the larger of the 95% band
    of a difference of two binomial proportions over n validation images, and the spread between
    fp32 runs of different seeds (when there are several)."""
    p, q = fp32 / 100.0, amp / 100.0
    band = 196.0 * ((p * (1 - p) + q * (1 - q)) / max(n, 1)) ** 0.5
    tolerance = max(band, seed_spread or 0.0)
    return abs(amp - fp32) <= tolerance, tolerance, band


def bench_accuracy(args, workdir):
    check_data_root(args.train_data, "--train_data")
    check_data_root(args.valid_data, "--valid_data")
    n = validation_size(args)
    runs = {"fp32": [], "amp": []}
    for seed in args.accuracy_seeds:
        for name, amp in (("fp32", False), ("amp", True)):
            progress(f"accuracy: {name}, seed {seed} ...")
            exp = f"{name}_{seed}"
            log_path = os.path.join(workdir, f"accuracy_{exp}.log")
            command = accuracy_command(args, seed, amp, os.path.join(workdir, "accuracy"), exp)
            status, wall, _, _, _ = run_measured(command, log_path, 1.0)
            if status != 0:
                raise RuntimeError(f"train.py exited with {status} in the accuracy check:\n{log_tail(log_path)}")
            record = final_record(os.path.join(workdir, "accuracy", exp, "metrics.jsonl"))
            runs[name].append({"seed": seed, "accuracy": record["accuracy"], "norm_ED": record["norm_ED"],
                               "ece": record["ece"], "iteration": record["iteration"], "wall_s": wall})
    fp32 = statistics.mean(r["accuracy"] for r in runs["fp32"])
    amp = statistics.mean(r["accuracy"] for r in runs["amp"])
    spread = None
    if len(runs["fp32"]) > 1:
        values = [r["accuracy"] for r in runs["fp32"]]
        spread = max(values) - min(values)
    ok, tolerance, band = within_noise(fp32, amp, n, spread)
    return {"model": {"arch": args.accuracy_arch, "output_channel": args.accuracy_output_channel,
                      "hidden_size": args.accuracy_hidden_size},
            "iterations": args.accuracy_iters, "batch_size": args.accuracy_batch_size,
            "train_args": args.accuracy_train_args, "valid_data": args.valid_data, "valid_samples": n,
            "fp32_accuracy": fp32, "amp_accuracy": amp, "difference": amp - fp32, "tolerance": tolerance,
            "binomial_band": band, "fp32_seed_spread": spread, "within_noise": ok, "runs": runs}


# ---------------------------------------------------------------------------------------------
# checks, table, main


def best_variant(section, amp_only=False):
    candidates = {k: v for k, v in (section or {}).items() if not amp_only or v["amp"]}
    if not candidates:
        return None, None
    name = max(candidates, key=lambda k: candidates[k]["images_per_s"])
    return name, candidates[name]


def make_checks(results):
    checks = []
    for part in ("train", "infer"):
        name, entry = best_variant(results.get(part), amp_only=True)
        if entry is None or "fp32" not in results[part]:
            continue
        value = entry["speedup_vs_fp32"]
        checks.append({"name": f"amp_{part}_speedup", "value": value, "variant": name,
                       "target": f">= {TARGETS['amp_speedup']:g}x fp32",
                       "met": value is not None and value >= TARGETS["amp_speedup"]})
    accuracy = results.get("accuracy")
    if accuracy:
        checks.append({"name": "amp_accuracy_within_noise", "value": accuracy["difference"],
                       "target": f"|amp - fp32| <= {accuracy['tolerance']:.2f} points",
                       "met": accuracy["within_noise"]})
    sampling = results.get("sampling")
    if sampling and len(sampling["pools"]) > 1:
        checks.append({"name": "sampling_memory_growth_mb", "value": sampling["memory_growth_mb"],
                       "target": f"< {TARGETS['memory_growth_mb']:g} MB from {sampling['growth_from']} to "
                                 f"{sampling['growth_to']} (peak RSS of data_sampling.py)",
                       "met": sampling["memory_growth_mb"] < TARGETS["memory_growth_mb"]})
        # Every process of the run together (loader workers included), anonymous memory only:
        # the LMDB's file-backed pages are page cache, not images held by the program.
        checks.append({"name": "sampling_tree_anon_growth_mb", "value": sampling["tree_anon_growth_mb"],
                       "target": f"< {TARGETS['memory_growth_mb']:g} MB (all processes' anonymous PSS)",
                       "met": sampling["tree_anon_growth_mb"] < TARGETS["memory_growth_mb"]})
    loader = results.get("loader")
    if loader and loader.get("vs_training") is not None:
        checks.append({"name": "loader_vs_model_ratio", "value": loader["vs_training"],
                       "target": f">= {TARGETS['loader_ratio']:g}x the fastest training variant",
                       "met": loader["vs_training"] >= TARGETS["loader_ratio"]})
    return checks


def fmt(value, spec="{:.1f}"):
    return "-" if value is None else spec.format(value)


def format_table(results):
    m = results["machine"]
    lines = [f"machine: {m['cpu']}, {m['usable_cores']} cores, torch {m['versions']['torch']} "
             f"({m['torch_threads']} threads), device {m['device']}",
             "load average (1 min) before -> after each part: " + ", ".join(
                 f"{name} {v['before']:.1f} -> {v['after']:.1f} ({v['seconds']:.0f}s)"
                 for name, v in results.get("load_average", {}).items())]
    model = results.get("model")
    if model and ("train" in results or "infer" in results):
        lines += ["", f"model: {model['arch']} {model['imgH']}x{model['imgW']}, batch {model['batch_size']}, "
                      f"output {model['output_channel']}, hidden {model['hidden_size']} "
                      f"({model['parameters'] / 1e6:.1f}M parameters); amp = {model['amp_dtype']} autocast",
                  f"{'variant':22s} {'train img/s':>12s} {'x fp32':>7s} {'infer img/s':>12s} {'x fp32':>7s}"]
        names = list(dict.fromkeys(list(results.get("train", {})) + list(results.get("infer", {}))))
        for name in names:
            t = results.get("train", {}).get(name, {})
            i = results.get("infer", {}).get(name, {})
            lines.append(f"{name:22s} {fmt(t.get('images_per_s')):>12s} {fmt(t.get('speedup_vs_fp32'), '{:.2f}'):>7s} "
                         f"{fmt(i.get('images_per_s')):>12s} {fmt(i.get('speedup_vs_fp32'), '{:.2f}'):>7s}")
    loader = results.get("loader")
    if loader:
        lines += ["", f"loader: Batch_Balanced_Dataset ({loader['select_data']}, {loader['workers']} workers, "
                      f"batch {loader['batch_size']}): {loader['images_per_s']:.0f} img/s"
                      + (f" = {loader['vs_training']:.1f}x the fastest training variant"
                         if loader.get("vs_training") is not None else "")
                      + f"; first batch after {loader['first_batch_s']:.2f}s"]
    sampling = results.get("sampling")
    if sampling:
        s = sampling["model"]
        lines += ["", f"sampling: data_sampling.py --query {sampling['query']} --num_query {sampling['num_query']}, "
                      f"model {s['arch']} (output {s['output_channel']}, hidden {s['hidden_size']})",
                  f"{'pool':>8s} {'wall s':>8s} {'img/s':>8s} {'in-script img/s':>16s} {'peak RSS MB':>12s} "
                  f"{'tree PSS MB':>12s} {'tree anon MB':>13s}"]
        for p in sampling["pools"]:
            lines.append(f"{p['pool_size']:>8d} {p['wall_s']:>8.1f} {p['images_per_s_end_to_end']:>8.0f} "
                         f"{fmt(p['images_per_s_in_script'], '{:.0f}'):>16s} {p['maxrss_mb']:>12.1f} "
                         f"{p['peak_tree_pss_mb']:>12.1f} {p['peak_tree_anon_mb']:>13.1f}")
        lines.append(f"marginal rate {fmt(sampling['marginal_images_per_s'], '{:.0f}')} img/s; growth "
                     f"{sampling['growth_from']} -> {sampling['growth_to']}: "
                     f"peak RSS {sampling['memory_growth_mb']:+.1f} MB, "
                     f"tree PSS {sampling['tree_pss_growth_mb']:+.1f} MB, "
                     f"tree anon {sampling['tree_anon_growth_mb']:+.1f} MB")
    diverse = results.get("coreset")
    if diverse:
        lines += ["", f"coreset: {diverse['pool']} synthetic float16 embeddings of width {diverse['dim']} "
                      f"({diverse['embeddings_mb']:.1f} MB): stored in {diverse['store_s']:.2f}s, peak growth "
                      f"{fmt(diverse['store_peak_growth_mb'])} MB"]
        for label, run in diverse["selection"].items():
            lines.append(f"  k-centre of {diverse['picks']} among {run['candidates']}: {run['seconds']:.2f}s "
                         f"({run['cpu_seconds']:.2f}s CPU), peak growth {fmt(run['peak_growth_mb'])} MB")
    pool = results.get("pool")
    if pool:
        s = pool["model"]
        lines += ["", f"pool: one LMDB of {pool['large_pool']} samples ({pool['distinct_images']} distinct images, "
                      f"{pool['lmdb_mb']:.0f} MB, written in {pool['build_s']:.1f}s); data_sampling.py --query "
                      f"{pool['query']} --num_query {pool['num_query']}, model {s['arch']} "
                      f"(output {s['output_channel']}, hidden {s['hidden_size']})",
                  f"{'run':>18s} {'pool':>8s} {'scored':>8s} {'wall s':>8s} {'CPU s':>8s} {'img/s':>8s} "
                  f"{'img/CPU-s':>9s} {'in-script img/s':>16s} {'peak RSS MB':>12s} {'tree PSS MB':>12s} "
                  f"{'tree anon MB':>13s}"]
        for c in pool["cases"]:
            lines.append(f"{c['case']:>18s} {c['pool_size']:>8d} {c['scored']:>8d} {c['wall_s']:>8.1f} "
                         f"{fmt(c['cpu_s']):>8s} {c['images_per_s']:>8.0f} {fmt(c['images_per_cpu_s'], '{:.0f}'):>9s} "
                         f"{fmt(c['images_per_s_in_script'], '{:.0f}'):>16s} "
                         f"{c['maxrss_mb']:>12.1f} {c['peak_tree_pss_mb']:>12.1f} {c['peak_tree_anon_mb']:>13.1f}")
        source = pool["full_large_pool_extrapolated_from"]
        lines.append(f"whole pool of {pool['large_pool']} without --pool_subsample: "
                     f"{pool['full_large_pool_wall_s']:.0f}s wall, {fmt(pool['full_large_pool_cpu_s'], '{:.0f}')}s CPU"
                     + (f" (extrapolated linearly from the pool of {source})" if source else " (measured)"))
    accuracy = results.get("accuracy")
    if accuracy:
        lines += ["", f"accuracy: {accuracy['model']['arch']}, {accuracy['iterations']} iterations, "
                      f"{accuracy['valid_samples']} validation images: fp32 {accuracy['fp32_accuracy']:.2f}%, "
                      f"amp {accuracy['amp_accuracy']:.2f}% (difference {accuracy['difference']:+.2f}, "
                      f"noise {accuracy['tolerance']:.2f})"]
    if results["checks"]:
        lines += ["", "targets:"]
        for c in results["checks"]:
            lines.append(f"  {c['name']:28s} {fmt(c['value'], '{:.2f}'):>8s}  target {c['target']}  "
                         f"{'met' if c['met'] else 'MISSED'}")
    lines.append(f"\n{results['elapsed_s']:.0f}s in all")
    return "\n".join(lines)


def progress(message):
    print(message, file=sys.stderr, flush=True)


def validate_args(args):
    args.parts = parse_list(args.only, "--only", known=PARTS)
    if args.accuracy_check and "accuracy" not in args.parts:
        args.parts.append("accuracy")
    args.variants = parse_list(args.variants, "--variants", known=tuple(VARIANTS))
    args.pool_sizes = parse_list(args.pool_sizes, "--pool_sizes", int)
    args.full_pool_sizes = sorted(set(parse_list(args.full_pool_sizes or str(args.large_pool), "--full_pool_sizes",
                                                 int)))
    args.accuracy_seeds = parse_list(args.accuracy_seeds, "--accuracy_seeds", int)
    for flag in ("repeats", "train_iters", "infer_iters", "loader_batches", "batch_size", "num_query",
                 "accuracy_iters", "accuracy_batch_size", "coreset_pool", "coreset_dim", "coreset_picks",
                 "coreset_candidates", "coreset_batch", "large_pool", "distinct_images",
                 "pool_subsample"):
        if getattr(args, flag) < 1:
            raise utils.UserError(f"--{flag} must be at least 1")
    for flag in ("warmup", "loader_warmup"):
        if getattr(args, flag) < 0:
            raise utils.UserError(f"--{flag} must not be negative")
    if min(args.coreset_pool, args.coreset_candidates) < args.coreset_picks:
        raise utils.UserError(f"--coreset_pool and --coreset_candidates must be at least --coreset_picks "
                              f"{args.coreset_picks}")
    if min(args.pool_sizes) < args.num_query:
        raise utils.UserError(f"--pool_sizes: every pool must hold at least --num_query {args.num_query} images")
    if "pool" in args.parts:
        if min(args.full_pool_sizes) < args.num_query or max(args.full_pool_sizes) > args.large_pool:
            raise utils.UserError(f"--full_pool_sizes: every size must lie between --num_query {args.num_query} "
                                  f"and --large_pool {args.large_pool}")
        if not args.num_query <= args.pool_subsample < args.large_pool:
            raise utils.UserError(f"--pool_subsample {args.pool_subsample}: give at least --num_query "
                                  f"{args.num_query} and less than --large_pool {args.large_pool}")
    if ("train" in args.parts or "infer" in args.parts) and "fp32" not in args.variants:
        raise utils.UserError("--variants must include fp32: every speed-up is relative to it")


def main(args):
    validate_args(args)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = utils.select_device(args.device)
    results = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "command": [os.path.basename(sys.argv[0])] + sys.argv[1:], "parts": args.parts,
               "settings": {k: v for k, v in vars(args).items() if k != "parts"},
               "machine": machine_info(device)}
    workdir = args.workdir or tempfile.mkdtemp(prefix="benchmark-")
    os.makedirs(workdir, exist_ok=True)
    # The load average around each part shows whether other work shared the cores meanwhile.
    results["load_average"] = {}

    def timed_part(name, run):
        before = os.getloadavg()[0]
        start = time.perf_counter()
        value = run()
        results["load_average"][name] = {"before": round(before, 2), "after": round(os.getloadavg()[0], 2),
                                         "seconds": round(time.perf_counter() - start, 1)}
        return value

    try:
        if "train" in args.parts or "infer" in args.parts:
            results.update(timed_part("train_infer", lambda: bench_model(args, device, args.parts)))
        if "loader" in args.parts:
            progress("loader ...")
            results["loader"] = timed_part("loader", lambda: bench_loader(args))
            fastest = best_variant(results.get("train"))[1]
            fastest_infer = best_variant(results.get("infer"))[1]
            results["loader"]["vs_training"] = ratio(results["loader"]["images_per_s"],
                                                     fastest and fastest["images_per_s"])
            results["loader"]["vs_inference"] = ratio(results["loader"]["images_per_s"],
                                                      fastest_infer and fastest_infer["images_per_s"])
        if "sampling" in args.parts:
            results["sampling"] = timed_part("sampling", lambda: bench_sampling(args, workdir))
        if "coreset" in args.parts:
            results["coreset"] = timed_part("coreset", lambda: bench_coreset(args))
        if "accuracy" in args.parts:
            results["accuracy"] = timed_part("accuracy", lambda: bench_accuracy(args, workdir))
        if "pool" in args.parts:
            results["pool"] = timed_part("pool", lambda: bench_pool(args, workdir))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    results["checks"] = make_checks(results)
    results["elapsed_s"] = time.perf_counter() - started
    results["self_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB
    atomic_io.atomic_write_text(args.output, json.dumps(results, indent=2) + "\n")
    print(format_table(results))
    print(f"results: {args.output}")
    return results


if __name__ == "__main__":
    utils.exit_on_user_error(main)(get_args_parser().parse_args())
