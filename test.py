"""Evaluate a saved recognizer on every LMDB below `--eval_data`, each set separately: accuracy,
normalised edit distance, calibration (ECE, ACE, MCE, Brier) and speed, per set and in total.

    python test.py --eval_data data/evaluation --benchmark_all_eval \
        --saved_model saved_models/<exp>/best_accuracy.pth

The architecture comes from the flags, or, for flags not given, from the opt.yaml that train.py
saved beside the model. Results go to a table on stdout, a JSON file and one reliability diagram
per set. `--temperature auto --calibration both` also compares ECE, ACE, MCE and Brier unscaled,
after token-level and after word-level temperature scaling (see measurement/calibration.py), in a second table
and under `calibration` of every set and of the total in the JSON."""
import json
import math
import os
import re

import torch

from safe_files import atomic_io
from measurement import calibration
import options
import utils
from dataset import hierarchical_dataset
from data_layer.leaf_selection import refuse_unlabelled
from data_layer.lmdb_format import find_lmdbs
from measurement.evaluation import eval_loader, evaluate, fit_temperatures_on_valid_data, load_model

# The standard benchmark sets, in the order the original family reports them.
BENCHMARK_SETS = ("IIIT5k_3000", "SVT", "IC03_860", "IC03_867", "IC13_857", "IC13_1015",
                  "IC15_1811", "IC15_2077", "SVTP", "CUTE80")
METRICS = ("accuracy", "norm_ED", "ece", "ace", "mce", "brier", "images_per_s")
COLUMNS = (("accuracy", "accuracy", "{:.2f}"), ("norm_ED", "norm_ED", "{:.4f}"), ("ece", "ECE", "{:.4f}"),
           ("ace", "ACE", "{:.4f}"), ("mce", "MCE", "{:.4f}"), ("brier", "Brier", "{:.4f}"),
           ("images_per_s", "img/s", "{:.1f}"))
# --calibration both: the confidences compared, and the metrics kept of each.
SCALINGS = ("none", "token", "word")
CALIBRATION_METRICS = (("ece", "ECE"), ("ace", "ACE"), ("mce", "MCE"), ("brier", "Brier"))


def get_args_parser():
    parser = options.make_parser("Evaluate a saved model on every LMDB below --eval_data, each set separately.")
    group = parser.add_argument_group("evaluation")
    group.add_argument("--eval_data", help="root folder of the evaluation LMDBs (required)")
    group.add_argument("--benchmark_all_eval", action="store_true",
                       help="evaluate the standard benchmark folders under --eval_data in their usual order ("
                            + ", ".join(BENCHMARK_SETS) + "); missing ones are listed as absent")
    options.add_temperature_arg(group, allow_both=True)
    group.add_argument("--output", default="",
                       help="folder for results.json and the reliability diagrams reliability_<set>.png "
                            "(default: test_results/<folder of --saved_model>/<its file name without .pth>/ "
                            "under the current folder, e.g. test_results/exp/best_accuracy for "
                            "saved_models/exp/best_accuracy.pth; never beside the checkpoint)")
    group.add_argument("--output_json", default="", help="write the JSON here instead of <output>/results.json")
    options.add_common_args(parser, saved_model_help="model to evaluate (required)")
    return parser


def check_inputs(opt):
    options.require_file(opt.saved_model, "--saved_model", "give the checkpoint to evaluate")
    options.require_dir(opt.eval_data, "--eval_data", "give the root folder of the evaluation LMDBs")
    # checked before the evaluation, so a wrong path costs no evaluation run
    folder, json_path = output_paths(opt)
    options.check_output_dir(folder, "--output")
    options.check_output_file(json_path, "--output_json")


def check_something_read(results, opt):
    """A set without a readable sample is reported in the table; with none in any set there is
    nothing to report: UserError."""
    if any(r["n"] for r in results):
        return
    size = sum(r["size"] for r in results)
    if size:
        raise utils.UserError(f"--eval_data {opt.eval_data}: none of the {size} images decodes; rebuild the "
                              f"LMDBs from readable images (create_lmdb_dataset.py checks them)")
    raise utils.UserError(f"--eval_data {opt.eval_data}: no label passed the filters; check --character, "
                          f"--sensitive and --batch_max_length (or pass --data_filtering_off)")


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


def parse_temperature_options(opt):
    """`(temperature, method)`: --temperature parsed (a number, None or 'auto') and the fitting
    method of --calibration (None unless auto), checked before any work."""
    temperature = options.parse_temperature(opt.temperature)
    return temperature, options.parse_calibration(opt.calibration, temperature, allow_both=True)


def resolve_temperature(opt, model, converter, device, temperature, method):
    """`(temperature of the main table, {method: fitted temperature} or None)`; with `both` the main
    table is scaled by the token-level one."""
    if temperature != "auto":
        return temperature, None
    methods = calibration.METHODS if method == "both" else (method,)
    fitted = fit_temperatures_on_valid_data(model, converter, opt, device, methods)
    return fitted["token" if method == "both" else method], fitted


def evaluate_set(name, path, model, converter, opt, device, temperature, compare=None):
    """One set's metrics under `temperature` (None, a number: token level, or a calibration.Scaling);
    with `compare` ({name: Scaling or None}) also its word confidences under each (`confidence_at`)."""
    dataset, _ = hierarchical_dataset(path, opt, select_data="/", flag="--eval_data")
    result = {"name": name, "path": path, "size": len(dataset)}
    if len(dataset) == 0:
        result.update({"n": 0, "skipped": 0, **{k: float("nan") for k in METRICS},
                       "confidence": torch.zeros(0), "correct": torch.zeros(0)})
        if compare is not None:
            result["confidence_at"] = {scaling: torch.zeros(0) for scaling in compare}
        return result
    result.update(evaluate(model, eval_loader(dataset, opt, device), converter, opt, device,
                           amp=opt.amp, temperature=temperature, compare_temperatures=compare))
    result["skipped"] = len(dataset) - result["n"]
    return result


def calibration_block(confidence_at, correct, compare, bins):
    """{scaling: {ece, ace, mce, brier[, temperature]}} of one set or of all pooled (NaN when empty)."""
    block = {}
    for scaling, applied in compare.items():
        metrics = calibration.calibration_metrics(confidence_at[scaling], correct, bins=bins)
        block[scaling] = {key: metrics[key] for key, _ in CALIBRATION_METRICS}
        if applied is not None:
            block[scaling]["temperature"] = applied.temperature
    return block


def add_calibration_blocks(results, total, compare, bins):
    """The `calibration` block of every set and of the total (all samples pooled)."""
    for r in results:
        r["calibration"] = calibration_block(r["confidence_at"], r["correct"], compare, bins)
    scored = [r for r in results if r["n"] > 0]
    pooled = {s: torch.cat([r["confidence_at"][s] for r in scored]) if scored else torch.zeros(0) for s in compare}
    correct = torch.cat([r["correct"] for r in scored]) if scored else torch.zeros(0)
    total["calibration"] = calibration_block(pooled, correct, compare, bins)


def calibration_table(results, total):
    """One row per set and scaling (then the total): temperature and ECE, ACE, MCE, Brier."""
    def cells(block):
        return [f"{block[key]:.4f}" if math.isfinite(block[key]) else "-" for key, _ in CALIBRATION_METRICS]

    header = ["set", "scaling", "temperature"] + [title for _, title in CALIBRATION_METRICS]
    rows = []
    for name, block in [(r["name"], r["calibration"]) for r in results] + [("total", total["calibration"])]:
        if name == "total":
            rows.append(None)
        for k, (scaling, values) in enumerate(block.items()):
            temperature = values.get("temperature")
            rows.append([name if k == 0 else "", scaling, "-" if temperature is None else f"{temperature:.4f}"]
                        + cells(values))
    return utils.format_table(header, rows, align="<<>>>>>")


def summarise(results, bins):
    """`(total, mean)`: metrics pooled over all samples, and the plain mean over the sets."""
    scored = [r for r in results if r["n"] > 0]
    n = sum(r["n"] for r in scored)
    confidence = torch.cat([r["confidence"] for r in scored]) if scored else torch.zeros(0)
    correct = torch.cat([r["correct"] for r in scored]) if scored else torch.zeros(0)
    total = {"n": n, "skipped": sum(r["skipped"] for r in results), **{k: float("nan") for k in METRICS}}
    if n:
        metrics = calibration.calibration_metrics(confidence, correct, bins=bins)
        total.update({k: metrics[k] for k in ("ece", "ace", "mce", "brier")})
        total["accuracy"] = 100.0 * correct.mean().item()
        total["norm_ED"] = sum(r["norm_ED"] * r["n"] for r in scored) / n
        # evaluate() times its own loop; the pooled speed is all samples over all that time
        seconds = sum(r["n"] / r["images_per_s"] for r in scored)
        total["images_per_s"] = n / seconds if seconds > 0 else float("nan")
    mean = {"sets": len(scored),
            **{k: sum(r[k] for r in scored) / len(scored) if scored else float("nan") for k in METRICS}}
    return total, mean


def metric_cells(values):
    return [fmt.format(values[key]) if math.isfinite(values[key]) else "-" for key, _, fmt in COLUMNS]


def results_table(results, total, mean):
    header = ["set", "n"] + [title for _, title, _ in COLUMNS]
    rows = [[r["name"], str(r["n"])] + metric_cells(r) for r in results]
    rows.append(None)
    rows.append(["total", str(total["n"])] + metric_cells(total))
    rows.append([f"mean of {mean['sets']} sets", ""] + metric_cells(mean))
    return utils.format_table(header, rows)


def safe_name(name):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "set"


def output_paths(opt):
    folder = opt.output
    if not folder:
        # under the working folder: a model folder may be read-only or shared, and is not ours to fill
        model_dir = os.path.basename(os.path.dirname(os.path.abspath(opt.saved_model)))
        stem = os.path.splitext(os.path.basename(opt.saved_model))[0]
        folder = os.path.abspath(os.path.join("test_results", model_dir, stem))
    json_path = opt.output_json or os.path.join(folder, "results.json")
    return folder, json_path


def finite_or_none(value):
    return value if not isinstance(value, float) or math.isfinite(value) else None


def calibration_record(block):
    return {scaling: {k: finite_or_none(float(v)) for k, v in values.items()} for scaling, values in block.items()}


def set_record(result):
    record = {"name": result["name"], "path": result["path"], "n": result["n"], "skipped": result["skipped"]}
    record.update({k: finite_or_none(float(result[k])) for k in METRICS})
    if "calibration" in result:
        record["calibration"] = calibration_record(result["calibration"])
    return record


def write_reliability_diagrams(results, folder, bins):
    paths = {}
    for r in results:
        if r["n"] == 0:
            continue
        path = os.path.join(folder, f"reliability_{safe_name(r['name'])}.png")
        calibration.reliability_diagram(r["confidence"], r["correct"], path, bins=bins,
                                  title=f"{r['name']}: accuracy {r['accuracy']:.2f}%")
        paths[r["name"]] = path
    return paths


def write_json(path, opt, temperature, method, results, total, mean, absent, diagrams):
    report = {
        "saved_model": os.path.abspath(opt.saved_model),
        "eval_data": os.path.abspath(opt.eval_data),
        "temperature": temperature,
        "calibration_method": method,
        "bins": opt.bins,
        "architecture": {k: getattr(opt, k) for k in ("Transformation", "FeatureExtraction",
                                                      "SequenceModeling", "Prediction")},
        "sets": [{**set_record(r), "reliability_diagram": diagrams.get(r["name"])} for r in results],
        "total": {k: calibration_record(v) if k == "calibration" else finite_or_none(v) for k, v in total.items()},
        "mean_over_sets": {k: finite_or_none(v) for k, v in mean.items()},
        "absent": absent,
    }
    atomic_io.atomic_write_text(path, json.dumps(report, indent=2) + "\n")


def main(opt):
    check_inputs(opt)
    temperature, method = parse_temperature_options(opt)
    options.fill_from_saved(opt, options.given_option_names(opt, get_args_parser()))
    options.resolve_options(opt)
    sets, absent = find_eval_sets(opt)
    for _, path in sets:  # before the model loads: an unlabelled pool has nothing to evaluate against
        refuse_unlabelled(path, find_lmdbs(path), "--eval_data")
    device = utils.select_device(opt.device)
    opt.amp = utils.effective_amp(opt.amp, device)
    model, converter = load_model(opt, device)
    temperature, fitted = resolve_temperature(opt, model, converter, device, temperature, method)
    compare = {"none": None, **{level: calibration.Scaling(t, level) for level, t in fitted.items()}} \
        if method == "both" else None
    main_scaling = calibration.as_scaling(temperature, "word" if method == "word" else "token")

    results = [evaluate_set(name, path, model, converter, opt, device, main_scaling, compare)
               for name, path in sets]
    check_something_read(results, opt)
    total, mean = summarise(results, opt.bins)
    if compare is not None:
        add_calibration_blocks(results, total, compare, opt.bins)

    folder, json_path = output_paths(opt)
    diagrams = write_reliability_diagrams(results, folder, opt.bins)
    write_json(json_path, opt, temperature, method, results, total, mean, absent, diagrams)

    print(f"model {opt.saved_model} on {device}, temperature "
          f"{'none' if temperature is None else f'{temperature:.4f}'}"
          + (f" (fitted on --valid_data, {'token' if method == 'both' else method}-level)" if method else ""))
    print(results_table(results, total, mean))
    if compare is not None:
        print("calibration before and after temperature scaling (fitted on --valid_data at the token and the "
              "word level):")
        print(calibration_table(results, total))
    for r in results:
        if r["skipped"]:
            print(f"{r['name']}: {r['skipped']} undecodable image(s) skipped")
        if r["size"] == 0:
            print(f"{r['name']}: no sample passed the filters")
    if absent:
        print("absent: " + ", ".join(absent))
    print(f"results written to {json_path}; reliability diagrams in {folder}")
    return {"sets": results, "total": total, "mean": mean, "absent": absent, "temperature": temperature,
            "calibration_method": method}


if __name__ == "__main__":
    utils.exit_on_user_error(main)(options.parse_with_given(get_args_parser()))
