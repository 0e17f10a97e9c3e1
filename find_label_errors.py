"""Find wrong labels: score every labelled sample of a selection with a trained model and rank them
by label quality, the model's probability of the given label relative to its own best reading
(annotators/label_quality.py has the formula for both heads).

    python find_label_errors.py --saved_model saved_models/<exp>/best_accuracy.pth \
        --train_data data/train_data_lmdb --select_data CVPR2016-NIPS2014-uncali_iter_1 \
        --batch_ratio 0.25-0.25-0.5 --total_data_usage_ratio 0.2 --out runs/label_errors

--batch_ratio may be given (training's value) and is not used: no batches are mixed. The
labelled samples are those training reads: the first --total_data_usage_ratio of each base
dataset (less the samples a selected query set holds) and every selected query set whole. Writes
`<out>/label_errors.csv` (every scored sample, worst first) and `<out>/summary.json`, and prints the
top of the list and how many labels fall under --threshold.

With the simulated annotator noise flags training used (--noise_ratio, --noise_scope,
--noise_model, --manualSeed), the same wrong labels are rebuilt and scored, and the ranking is
measured against the truth: precision and recall at k (k = the number of wrong labels scored) and
the area under the ROC curve.

With --export_annotation DIR the flagged labels (--num_issues or --threshold) go to annotators
for a second look: an annotation package of them alone (annotators/annotation.py), whose answers
import_annotations.py writes into the relabel set --review_name (default label_review_<k>, k the
next sampling round), which training applies over the earlier labels by --relabel_policy.

Runs as `python find_label_errors.py` or under `torchrun` (rank r scores every world_size-th
sample, rank 0 gathers and writes)."""
import csv
import json
import math
import os
import time
from datetime import datetime, timezone

import numpy as np

from annotators import annotation
from annotators import annotator_noise
from safe_files import atomic_io
import dataset
from data_layer import lmdb_format
from measurement import evaluation
from annotators import label_quality
from safe_files import locking
import options
from active_learning import query_sets
from active_learning import relabel
from active_learning import relabel_policies
import utils

CSV_NAME = "label_errors.csv"
SUMMARY_NAME = "summary.json"
DEFAULT_NOISE_MODEL = "substitute"


def get_args_parser():
    parser = options.make_parser("Rank the labelled samples of a selection by how far a trained model believes "
                                 "their labels, worst first; with the simulated noise flags of training, measure "
                                 "how well that finds the wrong labels.")
    options.add_common_args(parser, saved_model_help="the trained model whose readings judge the labels (required)")
    group = parser.add_argument_group("label errors")
    group.add_argument("--out", default="", help="folder for label_errors.csv and summary.json (made when missing; "
                                                 "required)")
    which = group.add_mutually_exclusive_group()
    which.add_argument("--num_issues", type=int, default=None, metavar="K",
                       help="flag the K lowest label qualities as issues (the `issue` column)")
    which.add_argument("--threshold", type=float, default=0.1, metavar="Q",
                       help="flag the labels whose quality is below this as issues; the count below it is "
                            "reported either way")
    group.add_argument("--show", type=int, default=20, metavar="N", help="print this many of the worst labels")
    options.add_overwrite_arg(group, "replace the label_errors.csv and summary.json of an earlier run in --out; with "
                                     "--export_annotation also an earlier package in DIR (one holding package.json), "
                                     "or draw a review whose package waits for its answers again")
    review = parser.add_argument_group("a second look by annotators (docs/noisy-labels.md: 'Finding wrong labels')")
    review.add_argument("--export_annotation", default="", metavar="DIR",
                        help="write the flagged labels (--num_issues or --threshold) as an annotation package into "
                             "DIR; import_annotations.py turns the answers into the relabel set --review_name")
    review.add_argument("--review_name", default="",
                        help="name of that relabel set under --train_data (default: label_review_<k>, k the next "
                             "sampling round); the rules of data_sampling.py --out_name apply")
    review.add_argument("--relabel_policy", default=relabel_policies.DEFAULT,
                        help="how training combines an answer with the label it trains on, recorded in the relabel "
                             "set: " + relabel_policies.known())
    options.add_lock_timeout_arg(review)
    noise = parser.add_argument_group("simulated annotator noise (give the values training used)")
    noise.add_argument("--noise_ratio", type=float, default=0.0,
                       help="share of the labels the simulated annotator got wrong (train.py --noise_ratio); > 0 "
                            "rebuilds those wrong labels, scores them and measures the ranking against the truth")
    noise.add_argument("--noise_scope", choices=dataset.NOISE_SCOPES, default="queried",
                       help="which labels the noise touched: the query sets only, or all labelled samples")
    noise.add_argument("--noise_model", default=DEFAULT_NOISE_MODEL,
                       help="how a wrong label differs from the right one: " + ", ".join(noise_model_names()))
    return parser


def noise_model_names():
    """The annotator noise models annotator_noise offers (its NOISE_MODELS registry; substitute
    alone where there is none)."""
    registry = getattr(annotator_noise, "NOISE_MODELS", None)
    if registry:
        return tuple(registry)
    return (DEFAULT_NOISE_MODEL,)


def noise_arguments(opt):
    """The keywords of `hierarchical_dataset` that apply the noise as training did. The noise
    model is passed only when it is not the default, the one every version of the data layer uses."""
    arguments = {"noise_ratio": opt.noise_ratio, "noise_scope": opt.noise_scope}
    model = getattr(opt, "noise_model", DEFAULT_NOISE_MODEL)
    if opt.noise_ratio and model != DEFAULT_NOISE_MODEL:
        arguments["noise_model"] = model
    return arguments


# ---------------------------------------------------------------------------------------------
# checks


def check_inputs(opt):
    options.require_file(opt.saved_model, "--saved_model", "give the trained model whose readings judge the labels")
    options.require_dir(opt.train_data, "--train_data", "give the root folder of the training LMDBs")
    if not opt.out:
        raise utils.UserError("--out is required: give a folder for label_errors.csv and summary.json")
    options.check_output_dir(opt.out, "--out")
    options.check_output_dir(opt.export_annotation, "--export_annotation")
    check_out_free(opt)
    if opt.num_issues is not None and opt.num_issues < 1:
        raise utils.UserError(f"--num_issues {opt.num_issues}: must be at least 1")
    if not (math.isfinite(opt.threshold) and 0.0 < opt.threshold <= 1.0):
        raise utils.UserError(f"--threshold {opt.threshold}: give a label quality in (0, 1], e.g. 0.1")
    if opt.show < 0:
        raise utils.UserError(f"--show {opt.show}: must be at least 0")
    if not (math.isfinite(opt.noise_ratio) and 0.0 <= opt.noise_ratio <= 1.0):
        raise utils.UserError(f"--noise_ratio {opt.noise_ratio}: must lie between 0 and 1")
    names = noise_model_names()
    if opt.noise_model not in names:
        raise utils.UserError(f"--noise_model {opt.noise_model}: unknown; choose one of {', '.join(names)}")
    relabel.check_policy_flag(opt.relabel_policy)
    if not math.isfinite(opt.lock_timeout):
        raise utils.UserError(f"--lock_timeout {opt.lock_timeout}: give seconds (0: fail at once, -1: no limit)")
    if opt.export_annotation:
        review_target(opt)  # a taken name or folder fails before the scoring


def check_out_free(opt):
    """An earlier run's results in --out are replaced only with --overwrite."""
    if opt.overwrite:
        return
    taken = [name for name in (CSV_NAME, SUMMARY_NAME) if os.path.lexists(os.path.join(opt.out, name))]
    if taken:
        raise utils.UserError(f"--out {opt.out}: already holds {' and '.join(taken)} of an earlier run; choose another "
                              f"--out or pass --overwrite to replace them")


def review_target(opt):
    """`(name, path, round)` of the review's relabel set; fails when the name breaks the naming
    rules, is taken, or its package folder may not be written."""
    leaves = query_sets.list_leaf_lmdbs(opt.train_data)
    round_number = query_sets.next_round(leaves)
    name = opt.review_name or f"label_review_{round_number}"
    query_sets.check_out_name(name, leaves, opt.train_data, flag="--review_name")
    path = os.path.join(opt.train_data, name)
    relabel.check_free(path, opt.train_data, opt.overwrite, flag="--review_name")
    annotation.check_package_free(opt.export_annotation, opt.overwrite, path, opt.train_data)
    return name, path, round_number


# ---------------------------------------------------------------------------------------------
# the labelled samples, as training reads them


def labelled_samples(opt):
    """`(data, log)`: every labelled sample of --select_data with the labels training reads
    (dataset.labelled_dataset: the noise and the selected relabel sets applied)."""
    return dataset.labelled_dataset(opt.train_data, opt, opt.select_data, **noise_arguments(opt))


def score_shard(model, data, converter, opt, device, rank):
    return label_quality.score_dataset(model, data, converter, opt, device, rank)


# ---------------------------------------------------------------------------------------------
# truth, ranking and outputs


def source_facts(root, opt, relpaths, indices):
    """Per row: the clean label (the LMDB's, normalised as the dataset does, without noise) and the
    origin of a query set's sample (`(relpath, index)` or None)."""
    rules = dataset.LabelRules(opt)
    clean, origins = [None] * len(relpaths), [None] * len(relpaths)
    rows = {}
    for row, rel in enumerate(relpaths):
        rows.setdefault(rel, []).append(row)
    for rel, positions in rows.items():
        path = os.path.join(root, rel)
        with lmdb_format.shared_env(path).begin(write=False) as txn:
            for row in positions:
                raw = txn.get(lmdb_format.label_key(int(indices[row])))
                if raw is None:
                    raise utils.UserError(f"{path}: sample {int(indices[row])} vanished while scoring; was the "
                                          f"dataset rewritten?")
                clean[row] = rules.clean(rules.normalise(raw.decode("utf-8", errors="replace")))
                origins[row] = lmdb_format.read_origin(txn, int(indices[row]), path)
    return clean, origins


def rank_rows(opt, columns):
    """The gathered columns worst first, with quality, reading confidence, clean label, origin,
    `corrupted` (given label != clean label) and `issue`."""
    rows = label_quality.reorder(columns, label_quality.worst_first(columns))
    rows["label_quality"] = label_quality.quality(rows["log_quality"])
    rows["reading_confidence"] = label_quality.quality(rows["reading_log_prob"])
    rows["clean_label"], rows["origin"] = source_facts(opt.train_data, opt, rows["relpath"], rows["index"])
    rows["corrupted"] = np.array([g != c for g, c in zip(rows["label"], rows["clean_label"])], dtype=bool)
    n = len(rows["index"])
    if opt.num_issues is not None:
        rows["issue"] = np.arange(n) < opt.num_issues
    else:
        rows["issue"] = rows["log_quality"] < math.log(opt.threshold)
    return rows


def number(x):
    """A float as text that reads back to the same value (repr), 'inf'/'-inf'/'nan' as such."""
    return repr(float(x))


def write_csv(path, rows, noisy):
    header = ["rank", "relpath", "index", "origin", "given_label", "reading", "label_quality", "log_quality",
              "reading_confidence", "issue"] + (["clean_label", "corrupted"] if noisy else [])
    with atomic_io.atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for i in range(len(rows["index"])):
                origin = rows["origin"][i]
                line = [i + 1, rows["relpath"][i], int(rows["index"][i]),
                        "" if origin is None else f"{origin[0]}:{origin[1]}", rows["label"][i], rows["reading"][i],
                        number(rows["label_quality"][i]), number(rows["log_quality"][i]),
                        number(rows["reading_confidence"][i]), int(rows["issue"][i])]
                if noisy:
                    line += [rows["clean_label"][i], int(rows["corrupted"][i])]
                writer.writerow(line)


def make_summary(opt, rows, labelled, elapsed, world_size, csv_path):
    log_q = rows["log_quality"]
    log_threshold = math.log(opt.threshold)
    summary = {
        "saved_model": os.path.abspath(opt.saved_model),
        "train_data": os.path.abspath(opt.train_data),
        "select_data": "-".join(opt.select_data),
        "total_data_usage_ratio": opt.total_data_usage_ratio,
        "prediction": opt.Prediction,
        "labelled": labelled,
        "scored": int(len(log_q)),
        "unreadable": labelled - int(len(log_q)),
        "reading_equals_label": int(sum(r == g for r, g in zip(rows["reading"], rows["label"]))),
        "threshold": opt.threshold,
        "under_threshold": int((log_q < log_threshold).sum()),
        "num_issues": opt.num_issues,
        "issues": int(rows["issue"].sum()),
        "csv": os.path.abspath(csv_path),
        "noise": None,
        "amp": bool(opt.amp),
        "processes": world_size,
        "time_s": round(elapsed, 3),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if opt.noise_ratio > 0:
        truth = rows["corrupted"]
        noise = {"ratio": opt.noise_ratio, "scope": opt.noise_scope, "model": opt.noise_model,
                 "seed": opt.manualSeed}
        noise.update(label_quality.detection_metrics(log_q, truth))
        noise["under_threshold"] = label_quality.threshold_metrics(log_q, truth, log_threshold)
        summary["noise"] = noise
    return summary


def format_report(summary, rows, show):
    lines = []
    shown = min(show, len(rows["index"]))
    if shown:
        noisy = summary["noise"] is not None
        header = ["rank", "sample", "given label", "reading", "quality"] + (["wrong"] if noisy else [])
        table = []
        for i in range(shown):
            cells = [str(i + 1), f"{rows['relpath'][i]}:{int(rows['index'][i])}", repr(rows["label"][i]),
                     repr(rows["reading"][i]), f"{rows['label_quality'][i]:.3g}"]
            if noisy:
                cells.append("yes" if rows["corrupted"][i] else "")
            table.append(cells)
        lines.append(f"the {shown} lowest label qualities of {summary['scored']}:")
        lines.append(utils.format_table(header, table, align="><<<>" + (">" if noisy else "")))
    lines.append(f"{summary['under_threshold']} of {summary['scored']} labels have quality below "
                 f"{summary['threshold']:g}" + (f"; {summary['issues']} flagged (--num_issues)"
                                                  if summary["num_issues"] is not None else "")
                 + (f"; {summary['unreadable']} unreadable image(s) skipped" if summary["unreadable"] else ""))
    noise = summary["noise"]
    if noise is not None:
        def fmt(x):
            return "n/a" if x is None else f"{x:.4f}"

        lines.append(f"against the simulated noise ({noise['model']}, ratio {noise['ratio']:g}, scope "
                     f"{noise['scope']}, seed {noise['seed']}): {noise['corrupted']} wrong labels scored; "
                     f"precision@k {fmt(noise['precision_at_k'])}, recall@k {fmt(noise['recall_at_k'])} "
                     f"(k = {noise['k']}), ROC AUC {fmt(noise['roc_auc'])}")
        below = noise["under_threshold"]
        lines.append(f"  below the threshold: precision {fmt(below['precision'])}, recall {fmt(below['recall'])}")
        if noise["corrupted"] == 0:
            lines.append("  no scored label is wrong: --noise_scope queried touches query sets only; is one selected?")
    return "\n".join(lines)


def finish(opt, columns, labelled, start, world_size):
    """Rank 0: rank, write the CSV and the summary (and with --export_annotation the package),
    print the report; returns the summary."""
    rows = rank_rows(opt, columns)
    if opt.export_annotation and not rows["issue"].any():  # before anything is written
        raise utils.UserError(f"--export_annotation: no label is flagged (none has quality below --threshold "
                              f"{opt.threshold:g}); raise --threshold or give --num_issues")
    check_out_free(opt)  # again: another run may have written there while this one scored
    os.makedirs(opt.out, exist_ok=True)
    csv_path = os.path.join(opt.out, CSV_NAME)
    write_csv(csv_path, rows, noisy=opt.noise_ratio > 0)
    summary = make_summary(opt, rows, labelled, time.time() - start, world_size, csv_path)
    if opt.export_annotation:
        summary["review"] = export_review(opt, rows, summary)
    atomic_io.atomic_write_text(os.path.join(opt.out, SUMMARY_NAME), json.dumps(summary, indent=2) + "\n")
    print(format_report(summary, rows, opt.show))
    print(f"written: {csv_path}, {os.path.join(opt.out, SUMMARY_NAME)}")
    if opt.export_annotation:
        review = summary["review"]
        print(f"exported {review['num_relabelled']} flagged labels for a second look -> {review['package']}; "
              f"correct its gt.txt (or label tasks.json in Label Studio), then\n  {review['import_command']}\n"
              f"  writes the relabel set {review['name']}: add it to training's --select_data with the share 0")
    return summary


def export_review(opt, rows, summary):
    """Write the package of the flagged labels (under the lock on --train_data, which the record
    of waiting packages lives in); returns the summary's `review` entry."""
    flagged = np.flatnonzero(rows["issue"]).tolist()
    with locking.exclusive(opt.train_data, opt.lock_timeout):
        name, path, round_number = review_target(opt)
        meta = {"name": name, "query_set": None, "round": round_number, "review": True,
                "model": os.path.abspath(opt.saved_model), "policy": opt.relabel_policy,
                "num_relabelled": len(flagged), "seed": opt.manualSeed, "select_data": "-".join(opt.select_data),
                "total_data_usage_ratio": opt.total_data_usage_ratio,
                "label_quality": [round(float(rows["label_quality"][i]), 6) for i in flagged],
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        manifest = {
            "format": annotation.FORMAT, "written_by": "find_label_errors.py", "round": name, "review": True,
            "train_data": os.path.abspath(opt.train_data), "model": os.path.abspath(opt.saved_model),
            "strategy": "label review", "created": meta["created"],
            "charset": {"character": opt.character, "lowercase": dataset.lowercases_labels(opt),
                        "batch_max_length": opt.batch_max_length},
            "selection": {"select_data": list(opt.select_data), "batch_ratio": opt.review_batch_ratio,
                          "unlabelled": [], "pool_data": []},
            "query_meta": {"strategy": "label review"},
            "relabel": {"name": name, "policy": opt.relabel_policy, "meta": meta},
            "summary": {k: v for k, v in summary.items() if k != "review"},
        }
        identities = [rows["origin"][i] or (rows["relpath"][i], int(rows["index"][i])) for i in flagged]
        records = annotation.second_look_records(opt.train_data, rows, flagged, identities)
        annotation.write_package(opt.export_annotation, records, manifest, opt.overwrite, path)
    return {"name": name, "package": os.path.abspath(opt.export_annotation), "num_relabelled": len(flagged),
            "policy": opt.relabel_policy, "import_command": annotation.import_command(opt.export_annotation,
                                                                                      opt.train_data)}


def main(opt, given=None):
    """Score, rank and write; `given` holds the option names set on the command line (the other
    architecture options come from the opt.yaml beside --saved_model; default:
    `options.given_option_names`). Returns the summary on rank 0, None on the others."""
    start = time.time()
    check_inputs(opt)
    given = options.given_option_names(opt, get_args_parser()) if given is None else set(given)
    options.fill_from_saved(opt, given)
    # training's shares when given: the review package's import then prints the next selection whole
    opt.review_batch_ratio = None
    if "batch_ratio" not in given and isinstance(opt.select_data, str):
        # unused here (no batches are mixed): one share per name satisfies resolve_options
        opt.batch_ratio = "-".join("1" for name in opt.select_data.split("-") if name) or "1"
    options.resolve_options(opt)
    if "batch_ratio" in given:
        opt.review_batch_ratio = [float(r) for r in opt.batch_ratio]
    with utils.distributed_session() as (rank, world_size, local_rank, distributed):
        device = utils.select_device(opt.device, local_rank)
        opt.amp = utils.effective_amp(opt.amp, device)
        utils.set_seed(opt.manualSeed)
        model, converter = evaluation.load_model(opt, device)
        data, log = labelled_samples(opt)
        if rank == 0:
            print(log)
            print(f"scoring {len(data)} labelled samples with {opt.saved_model} ({opt.Prediction}) on {device}"
                  + (f", {world_size} processes" if world_size > 1 else ""))
        columns = score_shard(model, evaluation.rank_share(data, rank, world_size), converter, opt, device, rank)
        parts = utils.all_gather_object(columns) if distributed else [columns]
        if rank != 0:
            return None
        columns = evaluation.concatenate_columns(parts)
        if len(columns["index"]) == 0:
            raise utils.UserError(f"none of the {len(data)} labelled images of --select_data "
                                  f"{'-'.join(opt.select_data)} decodes; nothing to score")
        return finish(opt, columns, len(data), start, world_size)


if __name__ == "__main__":
    utils.exit_on_user_error(main)(options.parse_with_given(get_args_parser()))
