"""What each query strategy picked, per round, over the cells of tools/experiment.py folders: how
well the model that picked them read them, their mean confidence, and how long their labels are,
against the pool. It answers "why does this strategy trail random?" from what the loop recorded
(each query set's summary.json and labels); nothing is scored again.

    python tools/pick_profile.py --out runs/pre-replay [--out runs/pre-picks ...] [--csv FILE]

One row per (strategy with its acquisition, round): the mean over seeds of the picking model's
accuracy on the picks and on the pool, the picks' mean confidence, the picks' mean label length and
the share of picks with 10 or more characters; the pool's label length comes from the labels of the
base datasets' leaves, unlabelled part included, as simulation holds them. Bad input: one `error:`
line, exit 2."""
import argparse
import collections
import csv
import glob
import io
import json
import os
import statistics
import sys


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from data_layer import lmdb_format  # noqa: E402
import utils  # noqa: E402
from utils import UserError  # noqa: E402

LONG = 10  # characters: a "long" label in the table


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--out", action="append", required=True,
                        help="a tools/experiment.py output folder (give several to pool their cells)")
    parser.add_argument("--csv", default="", help="also write the table as CSV here")
    return parser


def read_labels(path):
    """The labels of the LMDB at `path`, in index order."""
    with lmdb_format.shared_env(path).begin() as txn:
        return [label for _, label in lmdb_format.iter_labels(txn, lmdb_format.read_num_samples(txn, path))]


def cell_rows(out):
    """(strategy, round, record) for every finished query set of the folder's cells."""
    record_path = os.path.join(out, "experiment.json")
    if not os.path.isfile(record_path):
        raise UserError(f"--out {out}: no experiment.json there; name a tools/experiment.py output folder")
    with open(record_path, encoding="utf-8") as f:
        settings = json.load(f)["settings"]
    for summary_path in sorted(glob.glob(os.path.join(glob.escape(out), "cells", "*", "train_data", "*_iter_*",
                                                      "summary.json"))):
        query_set = os.path.dirname(summary_path)
        if query_set.endswith("_relabel"):
            continue
        with open(summary_path, encoding="utf-8") as f:
            summary = json.load(f)
        cell = os.path.basename(os.path.dirname(os.path.dirname(query_set)))
        acquisition = summary.get("acquisition") or next(
            (name for name in ("power", "softmax", "softrank", "coreset") if f"-{name}-" in cell), "topk")
        strategy = summary["strategy"] + ("" if acquisition == "topk" else f" ({acquisition})")
        round_index = int(query_set.rsplit("_iter_", 1)[1])
        labels = read_labels(query_set)
        yield strategy, round_index, summary, labels, settings


def pool_lengths(settings):
    lengths = []
    for name in settings["select_data"].split("-"):
        for data in glob.glob(os.path.join(glob.escape(settings["train_data"]), "**", "data.mdb"), recursive=True):
            leaf = os.path.dirname(data)
            if name in os.path.relpath(leaf, settings["train_data"]).split(os.sep):
                lengths += [len(label) for label in read_labels(leaf)]
    return lengths


def profile(outs):
    groups = collections.defaultdict(list)
    pools = {}
    for out in outs:
        for strategy, round_index, summary, labels, settings in cell_rows(os.path.abspath(out)):
            key = (settings["train_data"], settings["select_data"])
            if key not in pools:
                pools[key] = pool_lengths(settings)
            groups[(strategy, round_index)].append((summary, labels, pools[key]))
    if not groups:
        raise UserError(f"--out {', '.join(outs)}: no finished query set under cells/ yet")
    rows = []
    for (strategy, round_index), entries in sorted(groups.items(), key=lambda item: (item[0][1], item[0][0])):
        def mean(values):
            values = [v for v in values if v is not None]
            return statistics.fmean(values) if values else None
        lengths = [len(label) for _, labels, _ in entries for label in labels]
        pool = entries[0][2]
        rows.append({
            "strategy": strategy, "round": round_index, "seeds": len(entries),
            "picked_accuracy": mean([100 * s["accuracy"]["picked"] for s, _, _ in entries if s.get("accuracy")]),
            "pool_accuracy": mean([100 * s["accuracy"]["pool"] for s, _, _ in entries if s.get("accuracy")]),
            "picked_confidence": mean([s["mean_confidence"]["picked"] for s, _, _ in entries
                                       if s.get("mean_confidence")]),
            "picked_length": statistics.fmean(lengths) if lengths else None,
            "picked_long_share": 100 * sum(n >= LONG for n in lengths) / len(lengths) if lengths else None,
            "pool_length": statistics.fmean(pool) if pool else None,
            "pool_long_share": 100 * sum(n >= LONG for n in pool) / len(pool) if pool else None})
    return rows


def show(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def main(opt):
    rows = profile(opt.out)
    print("| strategy | round | seeds | picking model's accuracy on picks / pool (%) | picks' mean confidence | "
          f"label length, picks / pool | labels of {LONG}+ characters, picks / pool (%) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['strategy']} | {row['round']} | {row['seeds']} | {show(row['picked_accuracy'], 1)} / "
              f"{show(row['pool_accuracy'], 1)} | {show(row['picked_confidence'], 3)} | "
              f"{show(row['picked_length'], 1)} / {show(row['pool_length'], 1)} | "
              f"{show(row['picked_long_share'], 1)} / {show(row['pool_long_share'], 1)} |")
    if opt.csv:
        from safe_files import atomic_io
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_io.atomic_write_text(opt.csv, text.getvalue())


if __name__ == "__main__":
    utils.exit_on_user_error(main)(get_args_parser().parse_args())
