"""Collect one row per active-learning round of a run made by scripts/al_loop.sh into
`<run>/rounds.csv` and `<run>/rounds.md`, and plot `<root>/learning_curve.png` (accuracy and ECE
against labelled samples, one line per run found under the run's parent folder).

    python tools/al_report.py --run runs/al/random
"""
import argparse
import csv
import io
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from safe_files import atomic_io  # noqa: E402
import utils  # noqa: E402


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def round_numbers(run):
    models = os.path.join(run, "models")
    found = []
    for name in os.listdir(models) if os.path.isdir(models) else []:
        if name.startswith("round") and name[5:].isdigit():
            found.append(int(name[5:]))
    return sorted(found)


def round_times(run):
    times = {}
    path = os.path.join(run, "round_times.txt")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2:
                    times[int(parts[0])] = int(parts[1])
    return times


def collect_rows(run, query):
    """One dict per finished round: the round's training summary, query summary and test results."""
    rows = []
    times = round_times(run)
    for k in round_numbers(run):
        train_summary = os.path.join(run, "models", f"round{k}", "train_summary.json")
        results = os.path.join(run, "eval", f"round{k}", "results.json")
        if not (os.path.isfile(train_summary) and os.path.isfile(results)):
            continue
        trained = read_json(train_summary)
        evaluated = read_json(results)
        row = {"round": k, "strategy": query, "labelled": trained["labelled_total"], "queried": 0,
               "picked_accuracy": None}
        if k > 0:
            sampled = read_json(os.path.join(run, "train_data", f"{query}_iter_{k}", "summary.json"))
            row["queried"] = sampled["num_picked"]
            row["picked_accuracy"] = sampled["accuracy"]["picked"]
        for record in evaluated["sets"]:
            for metric in ("accuracy", "ece", "ace"):
                row[f"{record['name']}:{metric}"] = record[metric]
        for metric in ("accuracy", "ece", "ace"):
            row[f"total:{metric}"] = evaluated["total"][metric]
        row["seconds"] = times.get(k)
        rows.append(row)
    return rows


def columns_of(rows):
    columns = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    return columns


def cell(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1.5 else f"{value:.2f}"
    return str(value)


def write_tables(run, rows):
    columns = columns_of(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: cell(row.get(c)) for c in columns})
    atomic_io.atomic_write_text(os.path.join(run, "rounds.csv"), buffer.getvalue())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    atomic_io.atomic_write_text(os.path.join(run, "rounds.md"), "\n".join(lines) + "\n")


def read_csv_rows(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def plot_learning_curves(root):
    """Accuracy and ECE (pooled over the test sets) against labelled samples, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(name for name in os.listdir(root) if os.path.isfile(os.path.join(root, name, "rounds.csv")))
    if not runs:
        return None
    fig, (ax_acc, ax_ece) = plt.subplots(1, 2, figsize=(10, 4))
    for name in runs:
        rows = read_csv_rows(os.path.join(root, name, "rounds.csv"))
        labelled = [int(r["labelled"]) for r in rows]
        ax_acc.plot(labelled, [float(r["total:accuracy"]) for r in rows], marker="o", label=name)
        ax_ece.plot(labelled, [float(r["total:ece"]) for r in rows], marker="o", label=name)
    ax_acc.set(xlabel="labelled samples", ylabel="word accuracy (%)", title="accuracy on the test sets")
    ax_ece.set(xlabel="labelled samples", ylabel="ECE", title="expected calibration error")
    for ax in (ax_acc, ax_ece):
        ax.grid(alpha=0.3)
        ax.legend(title="query strategy")
    fig.tight_layout()
    path = os.path.join(root, "learning_curve.png")
    with atomic_io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


@utils.exit_on_user_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run folder of scripts/al_loop.sh (<out>/<query>)")
    parser.add_argument("--query", default="", help="the run's query strategy (default: the folder's name)")
    args = parser.parse_args(argv)
    run = os.path.normpath(args.run)
    if not os.path.isdir(os.path.join(run, "models")):
        raise utils.UserError(f"--run {run}: not a run folder of scripts/al_loop.sh (no models/ inside)")
    rows = collect_rows(run, args.query or os.path.basename(run))
    write_tables(run, rows)
    plot_learning_curves(os.path.dirname(run) or ".")
    return 0


if __name__ == "__main__":
    sys.exit(main())
