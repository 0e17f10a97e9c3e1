"""Evaluate a saved recognizer on every LMDB below `--eval_data`, each set separately: accuracy,
normalised edit distance, calibration (ECE, ACE, MCE, Brier) and speed, per set and in total.

    python test.py --eval_data data/evaluation --benchmark_all_eval \
        --saved_model saved_models/<exp>/best_accuracy.pth

The architecture comes from the flags, or, for flags not given, from the opt.yaml that train.py
saved beside the model. Results go to a table on stdout, a JSON file and one reliability diagram
per set."""
import argparse
import json
import math
import os
import re
import sys

import torch
import torch.utils.data

import options
import utils
from dataset import AlignCollate, find_lmdbs, hierarchical_dataset
from evaluation import evaluate, forward_logits
from model import Model, load_weights

# The standard benchmark sets, in the order the original family reports them.
BENCHMARK_SETS = ("IIIT5k_3000", "SVT", "IC03_860", "IC03_867", "IC13_857", "IC13_1015",
                  "IC15_1811", "IC15_2077", "SVTP", "CUTE80")
METRICS = ("accuracy", "norm_ED", "ece", "ace", "mce", "brier", "images_per_s")
COLUMNS = (("accuracy", "accuracy", "{:.2f}"), ("norm_ED", "norm_ED", "{:.4f}"), ("ece", "ECE", "{:.4f}"),
           ("ace", "ACE", "{:.4f}"), ("mce", "MCE", "{:.4f}"), ("brier", "Brier", "{:.4f}"),
           ("images_per_s", "img/s", "{:.1f}"))


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Evaluate a saved model on every LMDB below --eval_data, each set separately.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser.add_argument_group("evaluation")
    group.add_argument("--eval_data", help="root folder of the evaluation LMDBs (required)")
    group.add_argument("--saved_model", help="model to evaluate (required); architecture flags not given are "
                                             "read from the opt.yaml beside it")
    group.add_argument("--benchmark_all_eval", action="store_true",
                       help="evaluate the standard benchmark folders under --eval_data in their usual order ("
                            + ", ".join(BENCHMARK_SETS) + "); missing ones are listed as absent")
    group.add_argument("--temperature", default="none",
                       help="temperature scaling of the logits: none | auto (fitted on --valid_data) | a number > 0")
    group.add_argument("--output", default="",
                       help="folder for results.json and the reliability diagrams reliability_<set>.png "
                            "(default: test_results/<model name>/ beside --saved_model)")
    group.add_argument("--output_json", default="", help="write the JSON here instead of <output>/results.json")
    options.add_data_args(parser)
    options.add_model_args(parser, required=False)
    options.add_runtime_args(parser)
    return parser


def parse_args(argv=None):
    """Parse `argv`, remembering which options were given so opt.yaml fills only the others."""
    parser = get_args_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.given_options = sorted(options.given_options(parser, argv))
    return args


def given_option_names(opt):
    # Callers that build the Namespace themselves: what differs from the defaults counts as given.
    if getattr(opt, "given_options", None) is not None:
        return set(opt.given_options)
    defaults = vars(get_args_parser().parse_args([]))
    return {name for name, value in vars(opt).items() if defaults.get(name, value) != value}


def parse_temperature(value, flag="--temperature"):
    """'none' -> None, 'auto' -> 'auto', else a positive float."""
    text = str(value).strip().lower()
    if text in ("none", ""):
        return None
    if text == "auto":
        return "auto"
    try:
        temperature = float(text)
    except ValueError:
        raise utils.UserError(f"{flag} {value!r}: give none, auto or a positive number such as 1.5") from None
    if not math.isfinite(temperature) or temperature <= 0:
        raise utils.UserError(f"{flag} {value}: the temperature must be a positive number")
    return temperature


def check_inputs(opt):
    if not opt.saved_model:
        raise utils.UserError("--saved_model is required: give the checkpoint to evaluate")
    if not os.path.isfile(opt.saved_model):
        raise utils.UserError(f"--saved_model {opt.saved_model}: no such file")
    if not opt.eval_data:
        raise utils.UserError("--eval_data is required: give the root folder of the evaluation LMDBs")
    if not os.path.isdir(opt.eval_data):
        raise utils.UserError(f"--eval_data {opt.eval_data}: no such folder")
    if opt.bins < 1:
        raise utils.UserError("--bins must be at least 1")


def load_model(opt, device):
    model = Model(opt)
    load_weights(model, opt.saved_model, strict=True)
    model.to(device)
    model.eval()
    return model


def make_loader(dataset, opt, device):
    collate = AlignCollate(imgH=opt.imgH, imgW=opt.imgW, keep_ratio_with_pad=opt.PAD,
                           channels=3 if opt.rgb else 1)
    return torch.utils.data.DataLoader(dataset, batch_size=opt.batch_size, shuffle=False,
                                       num_workers=opt.workers, collate_fn=collate,
                                       pin_memory=device.type == "cuda")


def find_eval_sets(opt):
    """`(sets, absent)`: sets as (name, path) in reporting order, absent benchmark names."""
    root = opt.eval_data
    if opt.benchmark_all_eval:
        present = [name for name in BENCHMARK_SETS if os.path.isdir(os.path.join(root, name))
                   and find_lmdbs(os.path.join(root, name))]
        absent = [name for name in BENCHMARK_SETS if name not in present]
        if not present:
            raise utils.UserError(f"--eval_data {root}: none of the benchmark sets ({', '.join(BENCHMARK_SETS)}) "
                                  f"is there; drop --benchmark_all_eval to evaluate the LMDBs it holds")
        return [(name, os.path.join(root, name)) for name in present], absent
    leaves = find_lmdbs(root)
    if not leaves:
        raise utils.UserError(f"--eval_data {root}: no LMDB (folder with data.mdb) below it")
    sets = []
    for rel in leaves:
        name = os.path.basename(os.path.abspath(root)) if rel == "." else rel
        sets.append((name, os.path.join(root, rel)))
    return sets, []


def collect_logits(model, loader, opt, device, amp):
    """Greedy logits (fp32, on the CPU) and labels of every sample in `loader`."""
    logits, labels = [], []
    with torch.no_grad():
        for images, batch_labels, _ in loader:
            if len(batch_labels) == 0:
                continue
            with utils.autocast_context(device, amp):
                out = forward_logits(model, images.to(device), opt.batch_max_length, opt.Prediction)
            logits.append(out.float().cpu())
            labels.extend(batch_labels)
    return logits, labels


def resolve_temperature(opt, model, converter, device):
    temperature = parse_temperature(opt.temperature)
    if temperature != "auto":
        return temperature
    if not opt.valid_data:
        raise utils.UserError("--temperature auto fits on --valid_data; give --valid_data or a number")
    if not os.path.isdir(opt.valid_data):
        raise utils.UserError(f"--valid_data {opt.valid_data}: no such folder")
    valid_set, _ = hierarchical_dataset(opt.valid_data, opt, select_data="/", flag="--valid_data")
    if len(valid_set) == 0:
        raise utils.UserError(f"--valid_data {opt.valid_data}: no samples to fit the temperature on")
    logits, labels = collect_logits(model, make_loader(valid_set, opt, device), opt, device, opt.amp)
    if not labels:
        raise utils.UserError(f"--valid_data {opt.valid_data}: no readable sample to fit the temperature on")
    text, length = converter.encode(labels, batch_max_length=opt.batch_max_length)
    if opt.Prediction == "CTC":
        return float(utils.fit_temperature(torch.cat(logits), text, target_lengths=length))
    return float(utils.fit_temperature(torch.cat(logits), text[:, 1:]))


def evaluate_set(name, path, model, converter, opt, device, temperature):
    dataset, _ = hierarchical_dataset(path, opt, select_data="/", flag="--eval_data")
    result = {"name": name, "path": path, "size": len(dataset)}
    if len(dataset) == 0:
        result.update({"n": 0, "skipped": 0, **{k: float("nan") for k in METRICS},
                       "confidence": torch.zeros(0), "correct": torch.zeros(0)})
        return result
    result.update(evaluate(model, make_loader(dataset, opt, device), converter, opt, device,
                           amp=opt.amp, temperature=temperature))
    result["skipped"] = len(dataset) - result["n"]
    return result


def summarise(results, bins):
    """`(total, mean)`: metrics pooled over all samples, and the plain mean over the sets."""
    scored = [r for r in results if r["n"] > 0]
    n = sum(r["n"] for r in scored)
    confidence = torch.cat([r["confidence"] for r in scored]) if scored else torch.zeros(0)
    correct = torch.cat([r["correct"] for r in scored]) if scored else torch.zeros(0)
    total = {"n": n, "skipped": sum(r["skipped"] for r in results), **{k: float("nan") for k in METRICS}}
    if n:
        calibration = utils.calibration_metrics(confidence, correct, bins=bins)
        total.update({k: calibration[k] for k in ("ece", "ace", "mce", "brier")})
        total["accuracy"] = 100.0 * correct.mean().item()
        total["norm_ED"] = sum(r["norm_ED"] * r["n"] for r in scored) / n
        # evaluate() times its own loop; the pooled speed is all samples over all that time
        seconds = sum(r["n"] / r["images_per_s"] for r in scored)
        total["images_per_s"] = n / seconds if seconds > 0 else float("nan")
    mean = {"sets": len(scored),
            **{k: sum(r[k] for r in scored) / len(scored) if scored else float("nan") for k in METRICS}}
    return total, mean


def format_table(header, rows, right_align_from=1):
    """Rows of strings as aligned text: the first columns left-aligned, the rest right-aligned;
    a None row is a rule."""
    cells = [header] + [row for row in rows if row is not None]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row):
        cells = [cell.ljust(w) if i < right_align_from else cell.rjust(w)
                 for i, (cell, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule] + [line(r) if r is not None else rule for r in rows])


def metric_cells(values):
    return [fmt.format(values[key]) if math.isfinite(values[key]) else "-" for key, _, fmt in COLUMNS]


def results_table(results, total, mean):
    header = ["set", "n"] + [title for _, title, _ in COLUMNS]
    rows = [[r["name"], str(r["n"])] + metric_cells(r) for r in results]
    rows.append(None)
    rows.append(["total", str(total["n"])] + metric_cells(total))
    rows.append([f"mean of {mean['sets']} sets", ""] + metric_cells(mean))
    return format_table(header, rows, right_align_from=1)


def safe_name(name):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "set"


def output_paths(opt):
    folder = opt.output
    if not folder:
        model_dir = os.path.dirname(os.path.abspath(opt.saved_model))
        stem = os.path.splitext(os.path.basename(opt.saved_model))[0]
        folder = os.path.join(model_dir, "test_results", stem)
    json_path = opt.output_json or os.path.join(folder, "results.json")
    return folder, json_path


def finite_or_none(value):
    return value if not isinstance(value, float) or math.isfinite(value) else None


def set_record(result):
    record = {"name": result["name"], "path": result["path"], "n": result["n"], "skipped": result["skipped"]}
    record.update({k: finite_or_none(float(result[k])) for k in METRICS})
    return record


def write_reliability_diagrams(results, folder, bins):
    paths = {}
    for r in results:
        if r["n"] == 0:
            continue
        path = os.path.join(folder, f"reliability_{safe_name(r['name'])}.png")
        utils.reliability_diagram(r["confidence"], r["correct"], path, bins=bins,
                                  title=f"{r['name']}: accuracy {r['accuracy']:.2f}%")
        paths[r["name"]] = path
    return paths


def write_json(path, opt, temperature, results, total, mean, absent, diagrams):
    report = {
        "saved_model": os.path.abspath(opt.saved_model),
        "eval_data": os.path.abspath(opt.eval_data),
        "temperature": temperature,
        "bins": opt.bins,
        "architecture": {k: getattr(opt, k) for k in ("Transformation", "FeatureExtraction",
                                                      "SequenceModeling", "Prediction")},
        "sets": [{**set_record(r), "reliability_diagram": diagrams.get(r["name"])} for r in results],
        "total": {k: finite_or_none(v) for k, v in total.items()},
        "mean_over_sets": {k: finite_or_none(v) for k, v in mean.items()},
        "absent": absent,
    }
    utils.atomic_write_text(path, json.dumps(report, indent=2) + "\n")


def main(opt):
    check_inputs(opt)
    options.fill_from_saved(opt, given_option_names(opt))
    options.resolve_options(opt)
    sets, absent = find_eval_sets(opt)
    device = utils.select_device(opt.device)
    converter = utils.make_converter(opt.Prediction, opt.character)
    opt.num_class = len(converter.character)
    model = load_model(opt, device)
    temperature = resolve_temperature(opt, model, converter, device)

    results = [evaluate_set(name, path, model, converter, opt, device, temperature) for name, path in sets]
    total, mean = summarise(results, opt.bins)

    folder, json_path = output_paths(opt)
    diagrams = write_reliability_diagrams(results, folder, opt.bins)
    write_json(json_path, opt, temperature, results, total, mean, absent, diagrams)

    print(f"model {opt.saved_model} on {device}, temperature "
          f"{'none' if temperature is None else f'{temperature:.4f}'}")
    print(results_table(results, total, mean))
    for r in results:
        if r["skipped"]:
            print(f"{r['name']}: {r['skipped']} undecodable image(s) skipped")
        if r["size"] == 0:
            print(f"{r['name']}: no sample passed the filters")
    if absent:
        print("absent: " + ", ".join(absent))
    print(f"results written to {json_path}; reliability diagrams in {folder}")
    return {"sets": results, "total": total, "mean": mean, "absent": absent, "temperature": temperature}


if __name__ == "__main__":
    utils.exit_on_user_error(main)(parse_args())
