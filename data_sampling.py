"""Query one active-learning round: score the unlabelled pool with the last round's model, pick
samples by a query strategy, and write them (original bytes and labels) to a new LMDB query set
under --train_data, with a summary that names the next `train.py --mode al` arguments.

    python data_sampling.py --train_data train_data_lmdb --valid_data test_data_lmdb \
        --select_data CVPR2016-NIPS2014 --batch_ratio 0.5-0.5 --saved_model <model.pth> \
        --Transformation TPS --FeatureExtraction ResNet --SequenceModeling BiLSTM --Prediction Attn \
        --total_data_usage_ratio 0.1 --query random

Runs as `python data_sampling.py` or under `torchrun`: the pool is sharded across ranks, rank 0
gathers the per-sample records, picks and writes (the same picks as one process)."""
import argparse
import contextlib
import itertools
import json
import math
import os
import shutil
import sys
import time
from datetime import datetime, timezone

import numpy as np

from active_learning import acquisition
from active_learning import coreset
from active_learning import pool_scoring
from active_learning.query_sets import ROUND_PATTERN, check_out_name, check_output_free, empty_names, list_leaf_lmdbs, next_round, \
    query_set_names, unselected_query_sets
from active_learning import query_strategies
from active_learning import relabel
from annotators import annotation
import dataset
from data_layer import leaf_selection
from data_layer import lmdb_format
from data_layer import lmdb_writing
from data_layer import set_records
from measurement import calibration
from measurement.evaluation import eval_loader, fit_temperature_on_valid_data, forward_logits, load_model, rank_share
import options
from safe_files import atomic_io
from safe_files import locking
import utils

TRAINING_ONLY_FLAGS = ("exp_name", "output_dir", "valInterval", "num_iter", "lr", "beta1", "rho", "eps", "grad_clip",
                       "lr_schedule", "warmup_iters", "calibrator", "alpha", "beta", "smooth_tail", "patience", "mode",
                       "query_iter", "B", "t")
DEFAULT_RATIO = 0.01


def get_args_parser():
    parser = options.make_parser("Score the unlabelled pool with a trained model and write the queried samples to "
                                 "a new LMDB query set under --train_data.")
    options.add_common_args(parser, saved_model_help="the model of the last round")
    group = parser.add_argument_group("sampling")
    group.add_argument("--query", default="random",
                       help="strategy; " + "; ".join(f"{s.name}: {s.help}"
                                                    for s in query_strategies.STRATEGIES.values()))
    group.add_argument("--pool_data", default="",
                       help="'-'-separated datasets under --train_data to query as well, whole (--total_data_usage_"
                            "ratio does not apply) and never proposed for training: e.g. an unlabelled LMDB of "
                            "create_lmdb_dataset.py --unlabelled, or a labelled set kept out of training; they may "
                            "share no LMDB with --select_data")
    group.add_argument("--ratio", type=float, default=DEFAULT_RATIO,
                       help="share of the pool to query: floor(pool size * ratio) samples")
    group.add_argument("--num_query", type=int, default=None, help="query this many samples (overrides --ratio)")
    group.add_argument("--pool_subsample", type=int, default=None, metavar="N",
                       help="score a random N of the pool instead of all of it (pools of millions): the draw is "
                            "fixed by --manualSeed and the query set's name, never holds an already queried "
                            "sample, and the query (--ratio of the whole pool, or --num_query) must fit in it; "
                            "N at least the pool size scores the whole pool")
    options.add_temperature_arg(group, default=None,
                                note="applied before the confidence, margin, entropy and bald scores (uncali always "
                                     "ranks raw confidence); default auto for cali, none otherwise")
    group.add_argument("--acquisition", default="topk", choices=list(acquisition.ACQUISITIONS),
                       help="how the batch is taken from the strategy's ranking: "
                            + "; ".join(f"{a.name}: {a.help}" for a in acquisition.ACQUISITIONS.values())
                            + "; the draws are repeatable per seed and round")
    group.add_argument("--acquisition_beta", type=float, default=1.0,
                       help="beta of power, softmax and softrank (large: close to topk; 0: uniform)")
    group.add_argument("--candidates", type=int, default=None,
                       help="coreset only: k-centre among the strategy's top M samples (default: all); at least "
                            "the number to query")
    group.add_argument("--coreset_init", choices=coreset.INITS, default=None,
                       help="coreset only: the starting centres. labelled (default): the labelled samples the next "
                            "round trains on, embedded by the model as the pool is (Sener and Savarese's core-set; "
                            "one more pass, over them); top: none, the first pick is the strategy's first choice "
                            "(the default where an earlier coreset query set under --train_data predates this flag)")
    group.add_argument("--cali_threshold", type=float, default=0.5,
                       help="cali: least calibrated confidence at or above this first, then the closest below it; "
                            "in [0, 1] (recorded in the query set's query-meta)")
    group.add_argument("--mc_samples", type=int, default=10,
                       help="bald: number of stochastic passes (1 = mean token entropy of a single pass)")
    group.add_argument("--mc_dropout", type=float, default=0.2,
                       help="bald: dropout probability applied to the sequence features before prediction "
                            "during the stochastic passes (model.mc_dropout_p), even though the model is in "
                            "eval mode")
    group.add_argument("--out_name", default="",
                       help="name of the new query set under --train_data (default <query>_iter_<k>, k one past "
                            "the latest *_iter_<k> query set there, 1 if none)")
    options.add_overwrite_arg(group, "replace an existing query set of that name, or an earlier --save_images "
                                     "export; never anything else (a base dataset, a folder this tool did not write)")
    group.add_argument("--save_images", default="",
                       help="also export the picked images (original bytes) and a gt.txt to this folder")
    group.add_argument("--export_annotation", default="",
                       help="write an annotation package for real annotators to this folder instead of the query "
                            "set (images, gt.txt pre-filled with the model's readings, predictions.csv, Label "
                            "Studio tasks.json, README.txt, package.json); import_annotations.py turns the answers "
                            "into the query set. Always done for a pool with an unlabelled LMDB, by default into "
                            "<train_data>/<query set name>_annotation. With --relabel_ratio the package also asks for "
                            "second looks at labelled samples, whose answers become the relabel set")
    options.add_lock_timeout_arg(group, holder="another sampler")
    group.add_argument("--dry_run", action="store_true",
                       help="check the options, the output name and the pool, print what would be queried, and "
                            "stop (no model is needed)")
    relabel.add_args(parser)
    ignored = parser.add_argument_group("training-only options (accepted and ignored, so that a train.py "
                                        "command line can be reused)")
    for name in TRAINING_ONLY_FLAGS:
        ignored.add_argument(f"--{name}", default=argparse.SUPPRESS, help="ignored")
    for name in ("adam", "FT", "channels_last"):
        ignored.add_argument(f"--{name}", action="store_true", default=argparse.SUPPRESS, help="ignored")
    ignored.add_argument("--resume", nargs="?", const="auto", default=argparse.SUPPRESS, help="ignored")
    return parser


# ---------------------------------------------------------------------------------------------
# checks and set-up


def check_inputs(opt):
    options.require_dir(opt.train_data, "--train_data", "give the root folder of the training LMDBs")
    options.check_output_dir(opt.save_images, "--save_images")
    options.check_output_dir(opt.export_annotation, "--export_annotation")
    if not (opt.dry_run and opt.saved_model and not os.path.exists(opt.saved_model)):
        options.require_file(opt.saved_model, "--saved_model", "give the model of the last round",
                             if_absent="train a model first")
    if not math.isfinite(opt.lock_timeout):
        raise utils.UserError(f"--lock_timeout {opt.lock_timeout}: give seconds (0: fail at once, -1: no limit)")
    if not 0.0 <= opt.cali_threshold <= 1.0:  # also refuses nan, which would rank as uncali does
        raise utils.UserError(f"--cali_threshold {opt.cali_threshold}: must lie in [0, 1] (a calibrated confidence)")
    if opt.mc_samples < 1:
        raise utils.UserError(f"--mc_samples {opt.mc_samples}: must be at least 1")
    if not 0.0 <= opt.mc_dropout < 1.0:
        raise utils.UserError(f"--mc_dropout {opt.mc_dropout}: must lie in [0, 1)")
    if opt.num_query is None:
        if not 0.0 < opt.ratio <= 1.0:
            raise utils.UserError(f"--ratio {opt.ratio}: must lie in (0, 1]")
    elif opt.num_query < 1:
        raise utils.UserError(f"--num_query {opt.num_query}: must be at least 1")
    relabel.check_args(opt)
    if opt.pool_subsample is not None and opt.pool_subsample < 1:
        raise utils.UserError(f"--pool_subsample {opt.pool_subsample}: must be at least 1 (the number of pool "
                              f"samples to score; leave it out to score the whole pool)")


# ---------------------------------------------------------------------------------------------
# query sets and the pool


def output_path(opt, leaves):
    name = opt.out_name or f"{opt.query}_iter_{next_round(leaves)}"
    check_out_name(name, leaves, opt.train_data)
    path = os.path.join(opt.train_data, name)
    check_output_free(path, opt.overwrite)
    return name, path


EXPORT_MARKER = "export.json"


def check_export_free(folder, overwrite, query_path):
    """--save_images writes a new folder, fills an empty one, or (with --overwrite) replaces an
    earlier export, recognised by the marker file it holds; nothing else is ever deleted."""
    annotation.check_folder_free(folder, overwrite, EXPORT_MARKER, "--save_images", "an export of data_sampling.py",
                                 avoid=query_path)


def query_size(opt, pool):
    """How many samples the round queries: --num_query, or --ratio of the whole pool (a subsample
    changes what is scored, not the labelling budget), which must fit in the subsample."""
    count = query_strategies.query_count(pool.total, opt.ratio, opt.num_query)
    if count > len(pool):
        asked = f"--num_query {opt.num_query}" if opt.num_query is not None else \
            f"--ratio {opt.ratio} of the pool of {pool.total}"
        raise utils.UserError(f"--pool_subsample {opt.pool_subsample}: the round queries {count} samples ({asked}), "
                              f"more than it scores; give --pool_subsample {count} or more, or query fewer")
    return count


# ---------------------------------------------------------------------------------------------
# picking and writing


def pick(columns, strategy, opt, count, round_name, centres=None):
    identities = list(zip(columns["relpath"], columns["index"].tolist()))
    keys = query_strategies.identity_keys(identities, opt.manualSeed)
    chosen = acquisition.select(opt.acquisition, opt.acquisition_beta, strategy, columns, keys, count,
                                opt.manualSeed, round_name, candidates=opt.candidates, centres=centres,
                                threshold=opt.cali_threshold)
    scores = strategy.score(columns, keys)
    return np.sort(chosen), scores


def read_raw_samples(root, identities):
    """(image bytes, label, identity) straight from the source LMDBs: nothing decoded or re-encoded."""
    envs = {}
    for relpath, index in identities:
        if relpath not in envs:
            envs[relpath] = lmdb_format.shared_env(os.path.join(root, relpath))
        with envs[relpath].begin(write=False) as txn:
            image = txn.get(lmdb_format.image_key(index))
            label = txn.get(lmdb_format.label_key(index))
        if image is None or label is None:
            raise utils.UserError(f"{os.path.join(root, relpath)}: sample {index} vanished while sampling; "
                                  f"was the dataset rewritten?")
        yield image, label.decode("utf-8"), (relpath, index)


def stage_images(folder, samples, query_set):
    """Write the images (original bytes), `gt.txt` (`images/<file><TAB>label`) and the export
    marker into a hidden sibling of `folder`; returns its path, for `publish_images` once the query
    set is written."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    staged = atomic_io.make_temp_dir(parent, os.path.basename(os.path.abspath(folder)))
    try:
        os.makedirs(os.path.join(staged, "images"))
        count = 0
        with open(os.path.join(staged, "gt.txt"), "w", encoding="utf-8") as gt:
            for count, (image, label, (relpath, index)) in enumerate(samples, start=1):
                # create_lmdb_dataset.py splits a gt.txt line at its first tab: only line breaks break it
                if "".join(label.splitlines()) != label:
                    raise utils.UserError(f"--save_images: the label of {relpath} sample {index} holds a line "
                                          f"break, which gt.txt cannot carry; drop --save_images")
                name = f"images/image_{count:09d}.{annotation.image_extension(image)}"
                with open(os.path.join(staged, name), "wb") as f:
                    f.write(image)
                gt.write(f"{name}\t{label}\n")
        marker = {"written_by": "data_sampling.py", "query_set": query_set, "images": count,
                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        with open(os.path.join(staged, EXPORT_MARKER), "w", encoding="utf-8") as f:
            f.write(json.dumps(marker, indent=2) + "\n")
    except BaseException as err:
        shutil.rmtree(staged, ignore_errors=True)
        if isinstance(err, OSError):  # a full disk's error names no file: name the folder asked for
            raise atomic_io.blame_output(err, folder)
        raise
    return staged


def publish_images(staged, folder, overwrite, query_path):
    check_export_free(folder, overwrite, query_path)  # again: the folder may have changed while scoring
    if os.path.isdir(folder) and not os.listdir(folder):
        os.rmdir(folder)
    if os.path.lexists(folder):
        lmdb_writing.replace_dir(staged, folder)
    else:
        os.replace(staged, folder)


def query_meta(opt, strategy, name, pool, picked_scores, temperature, centres=None):
    return {
        "name": name, "strategy": strategy.name, "model": os.path.abspath(opt.saved_model),
        "acquisition": opt.acquisition,
        "acquisition_beta": opt.acquisition_beta if acquisition.uses_beta(opt.acquisition) else None,
        "candidates": opt.candidates,
        "cali_threshold": opt.cali_threshold if "threshold" in strategy.params else None,
        # coreset: its starting centres, and how many labelled samples were embedded as such
        "coreset_init": opt.coreset_init, "coreset_labelled": None if centres is None else len(centres),
        "ratio": opt.ratio if opt.num_query is None else None, "num_query": opt.num_query,
        "num_picked": len(picked_scores), "pool_size": pool.total, "pool_subsample": opt.pool_subsample,
        "subsample_size": len(pool), "temperature": temperature,
        "calibration": opt.calibration, "seed": opt.manualSeed, "select_data": "-".join(opt.select_data),
        "total_data_usage_ratio": opt.total_data_usage_ratio,
        "scores": [round(float(s), 6) for s in picked_scores],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def mean_or_none(values):
    return float(np.mean(values)) if len(values) else None


def make_summary(opt, name, path, columns, picked, pool, temperature, elapsed, query_names, selection=None,
                 skip=()):
    """The round's summary. The next round's selection is `selection` when given (relabel's
    next_selection), else query_strategies' rule over the --select_data names not in `skip` (those
    that select only empty query sets)."""
    if selection is None:
        kept = [(n, r) for n, r in zip(opt.select_data, opt.batch_ratio) if n not in skip]
        selection = query_strategies.next_round_selection([n for n, _ in kept], [r for _, r in kept], query_names,
                                                          name)
    names, shares = selection
    select_data, batch_ratio = query_strategies.format_selection(names, shares)
    summary = {
        "query_set": name, "path": os.path.abspath(path), "strategy": opt.query,
        "pool_size": pool.total, "pool_subsample": opt.pool_subsample, "subsampled": pool.subsampled,
        "subsample_size": len(pool), "scored": len(columns["index"]), "unreadable": len(pool) - len(columns["index"]),
        "num_picked": int(len(picked)),
        "mean_confidence": {"picked": mean_or_none(columns["confidence"][picked]),
                            "pool": mean_or_none(columns["confidence"])},
        "accuracy": {"picked": mean_or_none(columns["correct"][picked]), "pool": mean_or_none(columns["correct"])},
        "temperature": temperature, "calibration": opt.calibration,
        "time_s": round(elapsed, 3),
        "next_select_data": select_data, "next_batch_ratio": batch_ratio,
    }
    if "cal_confidence" in columns and temperature is not None:
        summary["mean_calibrated_confidence"] = {"picked": mean_or_none(columns["cal_confidence"][picked]),
                                                 "pool": mean_or_none(columns["cal_confidence"])}
    return summary


def format_summary(summary):
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.2f}%"

    def num(x):
        return "n/a" if x is None else f"{x:.4f}"

    conf, acc = summary["mean_confidence"], summary["accuracy"]
    lines = [
        f"queried {summary['num_picked']} of {summary['scored']} pool samples by '{summary['strategy']}' "
        f"-> {summary['path']}" + (f" ({summary['unreadable']} unreadable skipped)" if summary["unreadable"] else ""),
    ]
    if summary["subsampled"]:
        lines.append(f"  pool: {summary['pool_size']} samples, of which a random {summary['subsample_size']} "
                     f"were scored (--pool_subsample {summary['pool_subsample']})")
    lines += [
        f"  mean confidence: picked {num(conf['picked'])}  pool {num(conf['pool'])}",
        f"  accuracy:        picked {pct(acc['picked'])}  pool {pct(acc['pool'])}",
        f"  temperature: {'none' if summary['temperature'] is None else num(summary['temperature'])}"
        f"   time: {summary['time_s']:.1f}s",
    ] + ([relabel.format_part(summary["relabel"])] if summary.get("relabel") else []) + [
        f"next round: train.py --mode al --select_data {summary['next_select_data']} "
        f"--batch_ratio {summary['next_batch_ratio']}",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


class Plan:
    """Where a round writes and what it reads: the new query set's `name` and `path`, `replaced`
    (its relpath when --overwrite replaces an earlier query set, else None), the names of the query
    sets the next round trains on besides it, and the names whose unlabelled part forms the pool."""

    # set by package_plan: the annotation package's folder when the round exports one instead of
    # writing the query set, and the --select_data names that select an unlabelled LMDB
    package = None
    unlabelled = ()

    def __init__(self, name, path, replaced, query_names, pool_names, relabel_plan=None, empty=(), whole=()):
        self.name, self.path, self.replaced = name, path, replaced
        self.query_names, self.pool_names = query_names, pool_names
        self.relabel = relabel_plan  # relabel.RelabelPlan: the round's relabel set and the earlier ones
        # --select_data names of empty query sets only (never proposed for training); the --pool_data
        # names (queried whole)
        self.empty, self.whole = empty, whole


def plan_output(opt):
    """The round's Plan; fails before any work when the output is taken or the selection has no
    pool."""
    leaves = list_leaf_lmdbs(opt.train_data)
    query_names = query_set_names(opt.select_data, leaves, opt.train_data)
    name, path = output_path(opt, leaves)
    if opt.save_images:
        check_export_free(opt.save_images, opt.overwrite, path)
    whole = pool_data_names(opt, leaves)
    empty = empty_names(opt.select_data, leaves, opt.train_data)
    pool_names = [n for n in opt.select_data if n not in query_names] + whole
    query_names = [n for n in opt.select_data if n in query_names and n not in empty] + \
        unselected_query_sets(leaves, opt.select_data, opt.train_data)
    if not pool_names:
        raise utils.UserError(f"--select_data {'-'.join(opt.select_data)} names only query sets, which have no "
                              f"unlabelled pool; name a base dataset too, or give --pool_data")
    replaced = name if os.path.lexists(path) else None
    plan = Plan(name, path, replaced, query_names, pool_names, plan_relabel(opt, name, leaves), empty, whole)
    plan.package, plan.unlabelled = package_plan(opt, plan)
    return plan


def pool_data_names(opt, leaves):
    """The --pool_data names: each selects datasets under --train_data, none a query set (queried
    already) and none that --select_data selects too (its labelled part would be trained on and
    queried)."""
    names = [n for n in (opt.pool_data or "").split("-") if n]
    training = set(leaf_selection.select_leaves(opt.train_data, opt.select_data, "--train_data"))
    for name in names:
        try:
            chosen = leaf_selection.select_leaves(opt.train_data, [name], "--train_data")
        except utils.UserError:
            raise utils.UserError(f"--pool_data {name}: no LMDB below {opt.train_data} has a path component "
                                  f"'{name}'; found: {', '.join(leaves)}") from None
        queried = [rel for rel in chosen if leaves.get(rel)]
        if queried:
            raise utils.UserError(f"--pool_data {name}: selects the query set {queried[0]}, whose samples were "
                                  f"queried already; name the datasets to query")
        shared = [rel for rel in chosen if rel in training]
        if shared:
            raise utils.UserError(f"--pool_data {name}: {shared[0]} is selected by --select_data "
                                  f"{'-'.join(opt.select_data)} too; a pool dataset is never trained on, so name it "
                                  f"in one of the two only")
    return names


def package_plan(opt, plan):
    """`(package folder or None, unlabelled names)`. An unlabelled LMDB in the pool has no labels
    to write, so its round always exports a package (by default beside where the query set would
    go); --export_annotation asks for one with any pool."""
    unlabelled = [n for n in plan.pool_names
                  if any(set_records.is_unlabelled(os.path.join(opt.train_data, rel))
                         for rel in leaf_selection.select_leaves(opt.train_data, [n], "--train_data"))]
    folder = opt.export_annotation or (f"{plan.path}_annotation" if unlabelled else None)
    if folder is None:
        return None, unlabelled
    if opt.save_images:
        raise utils.UserError(f"--save_images with an annotation package ({folder}): the package holds the images "
                              f"already and no query set is written; drop --save_images")
    annotation.check_package_free(folder, opt.overwrite, plan.path, opt.train_data)
    return folder, unlabelled


def plan_relabel(opt, name, leaves):
    """The round's relabel.RelabelPlan; its round number is the query set's k (*_iter_<k>), else
    the next round's."""
    match = ROUND_PATTERN.search(name)
    round_number = int(match.group(1)) if match else next_round(leaves)
    return relabel.plan(opt, name, leaves, round_number, lambda other: check_out_name(other, leaves, opt.train_data))


def relabel_names(plan):
    """The names whose labelled samples --relabel_ratio judges (relabel.labelled_names): not the
    --pool_data names nor the unlabelled LMDBs, which are never trained on."""
    trained = [n for n in plan.pool_names if n not in plan.whole and n not in plan.unlabelled]
    return relabel.labelled_names(trained + plan.query_names, plan.relabel, plan.replaced)


def queried_before(opt, plan):
    """Identities that earlier query sets hold (the one being replaced gives its samples back)."""
    return set_records.read_query_origins(opt.train_data, skip={plan.replaced} if plan.replaced else ())


def score_round(opt, model, converter, strategy, temperature, device, plan, rank, world_size, distributed):
    """Build the pool, fit the temperature if asked, score this rank's shard and gather on rank 0.

    Returns `(columns in pool order or None off rank 0, the pool, temperature)`."""
    pool, pool_log = pool_scoring.build_pool(opt, plan.pool_names, queried_before(opt, plan), plan.name, plan.whole)
    # fail before the long scoring pass
    acquisition.check_candidates(opt.candidates, query_size(opt, pool))
    if temperature == "auto":
        temperature = fit_temperature_on_valid_data(model, converter, opt, device, opt.calibration)
    if rank == 0:
        print(pool_log)
        if temperature is not None:
            print(f"temperature: {temperature:.4f}"
                  + (f" (fitted on --valid_data, {opt.calibration}-level)" if opt.calibration else ""))
    columns = pool_scoring.score_pool(model, rank_share(pool, rank, world_size), converter, opt, strategy, temperature, device, rank)
    parts = utils.all_gather_object(columns) if distributed else [columns]
    if rank != 0:
        return None, pool, temperature
    return pool_scoring.merge_columns(parts, [leaf.relpath for leaf in pool.leaves]), pool, temperature


def coreset_init(opt):
    """--coreset_init for --acquisition coreset (None for the others): as given, else labelled, but
    top when a query set under --train_data was picked by coreset before the choice existed (its
    query-meta has no coreset_init), so that a loop grown by more rounds keeps one method."""
    if opt.coreset_init is not None or "embedding" not in acquisition.needs(opt.acquisition):
        return opt.coreset_init
    for rel, is_query in list_leaf_lmdbs(opt.train_data).items():
        meta = set_records.read_query_meta(os.path.join(opt.train_data, rel)) if is_query else None
        if meta and meta.get("acquisition") == "coreset" and "coreset_init" not in meta:
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"coreset: {rel} was picked from the strategy's first choice (before --coreset_init existed); "
                      f"this round starts there too (--coreset_init top); give --coreset_init labelled to change")
            return "top"
    return coreset.DEFAULT_INIT


def labelled_centres(opt, model, plan, device, rank, world_size, distributed):
    """--coreset_init labelled: the (m, d) float16 embeddings of the labelled samples the next round
    trains on (relabel_names), taken as the pool's are (`score_batch`: the same model, forward pass
    and hook), on rank 0 ((0, 0) when none is labelled: coreset then starts from the strategy's
    first choice); None on the other ranks. Each rank embeds every world_size-th sample."""
    data, _ = relabel.labelled_data(opt, relabel_names(plan), required=False)
    if rank == 0:
        print(f"coreset: embedding the {len(data)} labelled samples as the starting centres (--coreset_init labelled)")
    if not len(data):
        return np.zeros((0, 0), dtype=np.float16) if rank == 0 else None

    def forward(images):
        with utils.autocast_context(device, opt.amp):
            forward_logits(model, images.to(device, non_blocking=True), opt.batch_max_length, opt.Prediction)

    share = rank_share(data, rank, world_size)
    rows, identities = coreset.embed_loader(model, eval_loader(share, opt, device), forward, capacity=len(share))
    parts = utils.all_gather_object((rows, identities)) if distributed else [(rows, identities)]
    if rank != 0:
        return None
    # in identity order, so that the distances' blocks are the same for any number of processes
    identities = [identity for _, part in parts for identity in part]
    order = sorted(range(len(identities)), key=lambda k: (str(identities[k][0]), int(identities[k][1])))
    return np.concatenate([part for part, _ in parts])[order]


def check_still_free(opt, plan, identities):
    """Just before publishing: the name is still ours to write and no picked sample has been
    queried meanwhile. Under the lock both hold; this catches a writer that ignored the lock."""
    check_output_free(plan.path, opt.overwrite)
    if plan.replaced is None and os.path.lexists(plan.path):
        raise utils.UserError(f"{plan.path} appeared while sampling; another run wrote it without the lock")
    taken = queried_before(opt, plan).intersection(identities)
    if taken:
        raise utils.UserError(f"{len(taken)} picked samples were queried by another run while this one scored "
                              f"(e.g. {sorted(taken)[0]}); nothing was written, run the round again")


def write_round(opt, strategy, plan, columns, pool, temperature, start, labelled=None, centres=None):
    """Pick, write the query set (and with --relabel_ratio the relabel set, `labelled` holding the
    label-quality columns of the labelled samples) and print the summary; `centres` are coreset's
    starting centres (`labelled_centres`)."""
    scored = len(columns["index"])
    if scored == 0:
        raise utils.UserError(f"the {'subsample' if pool.subsampled else 'pool'} of {len(pool)} samples holds "
                              f"no readable image")
    # unreadable images leave the query fewer to choose from; a subsample's share is of the whole pool
    count = min(query_size(opt, pool) if pool.subsampled else
                query_strategies.query_count(scored, opt.ratio, opt.num_query), scored)
    relabelling = relabel_round(opt, plan, labelled, count)
    if relabelling:
        count -= len(relabelling["rows"])
    picked, scores = pick(columns, strategy, opt, count, plan.name, centres)
    identities = [(columns["relpath"][i], int(columns["index"][i])) for i in picked]
    if plan.package:
        return export_round(opt, strategy, plan, columns, picked, scores, identities, pool, temperature, start,
                            relabelling, labelled, centres)
    staged = stage_images(opt.save_images, read_raw_samples(opt.train_data, identities), plan.name) \
        if opt.save_images else None
    try:
        meta = query_meta(opt, strategy, plan.name, pool, scores[picked], temperature, centres)
        # The summary is part of the folder from the start: a kill cannot leave a query set without it.
        summary = make_summary(opt, plan.name, plan.path, columns, picked, pool, temperature,
                               time.time() - start, plan.query_names,
                               relabel.next_selection(opt, plan.query_names, plan.name, plan.relabel,
                                                      bool(relabelling and relabelling["rows"]), count == 0, plan.empty))
        check_still_free(opt, plan, identities)
        if relabelling:
            summary["relabel"] = relabelling["summary"]
            if relabelling["rows"]:  # published first: a round stopped before its query set is rerun whole
                relabel.write(opt, plan.relabel, plan.name, relabelling["rows"], labelled, relabelling["samples"])
        lmdb_writing.write_lmdb(plan.path, read_raw_samples(opt.train_data, identities), meta=meta,
                                overwrite=plan.replaced is not None,
                                extra_files={"summary.json": json.dumps(summary, indent=2) + "\n"})
        if staged:
            publish_images(staged, opt.save_images, opt.overwrite, plan.path)
    finally:
        if staged:
            shutil.rmtree(staged, ignore_errors=True)
    print(format_summary(summary))
    return summary


def export_round(opt, strategy, plan, columns, picked, scores, identities, pool, temperature, start,
                 relabelling=None, labelled=None, centres=None):
    """Write the annotation package of the picked samples instead of the query set: the images,
    the model's readings, confidences and scores, and what import_annotations.py needs; with
    --relabel_ratio also the labelled samples chosen for a second look (`relabelling`, rows of the
    label-quality columns `labelled`), which import_annotations.py turns into the relabel set."""
    images = annotation.read_images(opt.train_data, identities)
    records = itertools.chain(
        ({"image": data, "path": path, "origin": identity, "reading": columns["prediction"][i],
          "confidence": columns["confidence"][i], "score": scores[i]}
         for i, identity, (data, path) in zip(picked, identities, images)),
        annotation.second_look_records(opt.train_data, labelled, relabelling["rows"], relabelling["identities"])
        if relabelling else ())
    summary = make_summary(opt, plan.name, plan.path, columns, picked, pool, temperature,
                           time.time() - start, plan.query_names, skip=plan.empty)
    if relabelling:
        summary["relabel"] = relabelling["summary"]
    for key in ("path", "next_select_data", "next_batch_ratio"):  # import_annotations.py decides these
        summary.pop(key)
    if plan.unlabelled:  # pool "labels" are empty strings: no accuracy to report
        summary["accuracy"] = {"picked": None, "pool": None}
    summary.update(query_set=None, package=os.path.abspath(plan.package), round=plan.name,
                   import_command=annotation.import_command(plan.package, opt.train_data))
    manifest = {
        "format": annotation.FORMAT, "written_by": "data_sampling.py", "round": plan.name,
        "train_data": os.path.abspath(opt.train_data), "model": os.path.abspath(opt.saved_model),
        "strategy": strategy.name, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "charset": {"character": opt.character, "lowercase": dataset.lowercases_labels(opt),
                    "batch_max_length": opt.batch_max_length},
        "selection": {"select_data": list(opt.select_data), "batch_ratio": [float(r) for r in opt.batch_ratio],
                      "unlabelled": list(plan.unlabelled), "pool_data": list(plan.whole)},
        "query_meta": query_meta(opt, strategy, plan.name, pool, scores[picked], temperature, centres),
        "relabel": relabelling and {
            "name": plan.relabel.name, "policy": opt.relabel_policy,
            "meta": relabel.relabel_meta(opt, plan.relabel, plan.name, relabelling["rows"], labelled)},
        "summary": summary,
    }
    check_still_free(opt, plan, identities)
    annotation.write_package(plan.package, records, manifest, opt.overwrite, plan.path)
    print(format_export_summary(summary))
    return summary


def format_export_summary(summary):
    conf = summary["mean_confidence"]
    return "\n".join([
        f"exported {summary['num_picked']} of {summary['scored']} pool samples by '{summary['strategy']}' for "
        f"annotation -> {summary['package']}" + (f" ({summary['unreadable']} unreadable skipped)"
                                                 if summary["unreadable"] else ""),
    ] + (["  " + relabel.format_part(summary["relabel"])] if summary.get("relabel") else []) + [
        f"  mean confidence: picked {conf['picked']:.4f}  pool {conf['pool']:.4f}",
        f"  no query set is written yet: correct {summary['package']}/gt.txt (or label its tasks.json in Label "
        f"Studio), then",
        f"  {summary['import_command']}",
        f"  writes the query set {summary['round']} that the next round trains on",
    ])


def relabel_round(opt, plan, labelled, count):
    """With --relabel_ratio: the labelled rows to re-annotate out of a budget of `count`, the
    samples of the relabel set and the summary's `relabel` entry; None without."""
    if labelled is None:
        return None
    identities = relabel.sample_identities(opt.train_data, labelled["relpath"], labelled["index"])
    wanted, _ = relabel.split_budget(count, opt.relabel_ratio, len(set(identities)))
    rows = relabel.choose(labelled, wanted, identities)
    if plan.package:  # the transcribers answer; import_annotations.py writes the relabel set
        return {"rows": rows, "identities": [identities[row] for row in rows],
                "summary": relabel.pending_part(opt, plan.relabel, rows, labelled)}
    samples = relabel.read_sources(opt.train_data, rows, labelled, identities)
    draws = relabel.draw(opt, samples, plan.relabel.round)
    before, after, clean = relabel.outcome(opt, rows, labelled, samples, draws)
    return {"rows": rows, "samples": samples,
            "summary": relabel.summary_part(opt, plan.relabel, rows, labelled, before, after, clean)}


@contextlib.contextmanager
def round_lock(opt, rank, distributed):
    """The exclusive lock on --train_data for the whole round, taken by rank 0; the other ranks
    learn whether it was taken."""
    with contextlib.ExitStack() as stack:
        error = None
        if rank == 0:
            try:
                stack.enter_context(locking.exclusive(opt.train_data, opt.lock_timeout))
            except utils.UserError as err:
                error = err
        if distributed and not utils.broadcast_flag(error is None) and rank != 0:
            raise utils.UserError(f"rank 0 could not lock --train_data {opt.train_data}; see its error")
        if error is not None:
            raise error
        yield


def dry_run(opt, strategy):
    """What the round would do, from the options and the data alone."""
    plan = plan_output(opt)
    pool, pool_log = pool_scoring.build_pool(opt, plan.pool_names, queried_before(opt, plan), plan.name, plan.whole)
    count = query_size(opt, pool)
    acquisition.check_candidates(opt.candidates, count)
    print(pool_log)
    scored = f"a random {len(pool)} of the {pool.total}" if pool.subsampled else f"{len(pool)}"
    result = {"query_set": plan.name, "path": os.path.abspath(plan.path), "pool_size": pool.total,
              "subsample_size": len(pool), "subsampled": pool.subsampled, "num_query": count,
              "package": plan.package and os.path.abspath(plan.package)}
    if opt.relabel_ratio > 0:
        labelled, _ = relabel.labelled_data(opt, relabel_names(plan))
        result["num_relabel"], count = relabel.split_budget(count, opt.relabel_ratio, len(labelled))
        result["num_query"] = count
        where = "in the package" if plan.package else f"into {plan.relabel.path}"
        print(f"dry run: would re-annotate {result['num_relabel']} of {len(labelled)} labelled samples (lowest "
              f"label quality) {where}, policy {opt.relabel_policy}")
    if plan.package:
        print(f"dry run: would export {count} of {scored} pool samples by '{strategy.name}' as an annotation "
              f"package into {plan.package} (the query set {plan.path} is written by import_annotations.py)")
    else:
        print(f"dry run: would query {count} of {scored} pool samples by '{strategy.name}' into {plan.path}"
              + (" (replacing it)" if plan.replaced else ""))
    return result


def main(opt, given=None):
    """One query round; `given` holds the option names set on the command line (the rest may come
    from the opt.yaml beside --saved_model; default: `options.given_option_names`). Returns the
    summary on rank 0."""
    start = time.time()
    check_inputs(opt)
    given = options.given_option_names(opt, get_args_parser()) if given is None else set(given)
    saved = options.fill_from_saved(opt, given) if os.path.isfile(opt.saved_model) else {}
    warning = relabel.noise_warning(opt, saved)
    if warning and int(os.environ.get("RANK", "0")) == 0:  # once per run, not per torchrun rank
        print(warning, file=sys.stderr)
    options.resolve_options(opt)
    strategy = query_strategies.get_strategy(opt.query)
    acquisition.check(opt.acquisition, opt.acquisition_beta, strategy, opt.candidates, opt.coreset_init)
    opt.coreset_init = coreset_init(opt)
    # "auto" is fitted once the pool is known to be non-empty, after the model is loaded.
    temperature = options.parse_temperature(opt.temperature, default="auto" if strategy.calibrated else None)
    # from here on: how the temperature is fitted ('token' or 'word'), None when it is not
    opt.calibration = options.parse_calibration(opt.calibration, temperature)
    calibration.check_level(opt.calibration, strategy.needs)
    if opt.dry_run:
        return dry_run(opt, strategy)
    with utils.distributed_session() as (rank, world_size, local_rank, distributed):
        device = utils.select_device(opt.device, local_rank)
        opt.amp = utils.effective_amp(opt.amp, device)
        utils.set_seed(opt.manualSeed)
        model, converter = load_model(opt, device)
        # Held from naming the output to publishing it: a second sampler on this root waits or
        # stops, so it neither takes the same name nor picks the same samples.
        with round_lock(opt, rank, distributed):
            plan = plan_output(opt)
            columns, pool, temperature = score_round(opt, model, converter, strategy, temperature, device,
                                                     plan, rank, world_size, distributed)
            centres = labelled_centres(opt, model, plan, device, rank, world_size, distributed) \
                if opt.coreset_init == "labelled" else None
            labelled = relabel.score_labelled(opt, model, converter, device, relabel_names(plan), rank, world_size,
                                              distributed) if opt.relabel_ratio > 0 else None
            if rank != 0:
                return None
            return write_round(opt, strategy, plan, columns, pool, temperature, start, labelled, centres)


if __name__ == "__main__":
    utils.exit_on_user_error(main)(options.parse_with_given(get_args_parser()))
