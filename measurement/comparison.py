"""Statistics, tables and plots that compare active-learning strategies over several seeds
(tools/experiment.py writes them; everything here is a pure function of the per-run records).

A *record* is one finished round of one active-learning loop, a dict with the keys
`query, calibrator, noise, seed, round, labelled, accuracy, ece` and optionally `noise_model`,
`relabel_ratio`, `acquisition` and `sampling_args` (train.py --noise_model, data_sampling.py
--relabel_ratio and --acquisition, and the experiment's other data_sampling.py flags; a record
without one was made with the default: `substitute`, 0, `topk`, none): `accuracy`
in percent and `ece` as a fraction, both from test.py's pooled evaluation ("total") of that round's
model, `labelled` the number of labelled samples the round trained on. A strategy (a row of the
tables) is (query, calibrator, noise, noise_model, relabel_ratio, acquisition, sampling_args):
`STRATEGY_KEYS`. The baseline (random) of a strategy is the random strategy of the same calibrator,
noise, noise model and relabel ratio, whatever its acquisition (a random ranking is drawn at random
however it is taken) and its sampling flags (the one with the same flags when several ran, else
the first: flags such as --candidates or --calibration do not change a random ranking).

Definitions used throughout:
- mean and *sample* standard deviation (ddof = 1) over seeds; with a single seed the standard
  deviation is undefined and is `None` (an empty cell in the tables), never 0;
- ALC (area under the learning curve): the trapezoid area under accuracy against labelled samples,
  divided by the labelled span (last - first), per seed; then the mean over seeds;
- `labels_to_reach`: the labelled count at which a curve first reaches a target accuracy, by linear
  interpolation between the two points around the first crossing;
- paired differences against a baseline with a two-sided 95% Student-t interval; the t quantile is
  computed here (bisection on the t CDF, which comes from the regularized incomplete beta function).

Besides the standard library: utils (atomic writes) and, for the plots only, matplotlib."""
import csv
import io
import math
import os

from annotators import annotator_noise
from safe_files import atomic_io

STRATEGY_KEYS = ("query", "calibrator", "noise", "noise_model", "relabel_ratio", "acquisition", "sampling_args")
COMPARISON_COLUMNS = STRATEGY_KEYS + ("round", "labelled", "seeds", "accuracy_mean", "accuracy_std", "ece_mean",
                                      "ece_std")
SUMMARY_COLUMNS = STRATEGY_KEYS + ("seeds", "final_accuracy_mean", "final_accuracy_std",
                   "alc_mean", "labels_saved_vs_random", "labels_saved_at_random_final", "diff_vs_random_mean",
                   "diff_vs_random_low", "diff_vs_random_high")
PAIR_COLUMNS = ("axis", "value", "reference", "query", "calibrator", "noise", "noise_model", "relabel_ratio",
                "acquisition", "sampling_args", "round", "seeds", "accuracy_diff_mean", "accuracy_diff_low",
                "accuracy_diff_high", "ece_diff_mean", "ece_diff_low", "ece_diff_high")
# The value of each strategy key that a pair is measured against when one of the two holds it
# (the original's choices and the tools' defaults); otherwise the value that appeared first.
REFERENCE_VALUES = {"query": "random", "calibrator": "CE", "noise": 0.0, "noise_model": None,
                    "relabel_ratio": 0.0, "acquisition": "topk", "sampling_args": ""}
# Decimals shown in the markdown tables (the csv files keep six).
MARKDOWN_DECIMALS = {"labelled": 0, "accuracy_mean": 2, "accuracy_std": 2, "ece_mean": 4, "ece_std": 4,
                     "final_accuracy_mean": 2, "final_accuracy_std": 2, "alc_mean": 2,
                     "labels_saved_vs_random": 0, "labels_saved_at_random_final": 0, "diff_vs_random_mean": 2, "diff_vs_random_low": 2,
                     "diff_vs_random_high": 2, "accuracy_diff_mean": 2, "accuracy_diff_low": 2,
                     "accuracy_diff_high": 2, "ece_diff_mean": 4, "ece_diff_low": 4, "ece_diff_high": 4}
BASELINE = "random"
DEFAULT_NOISE_MODEL = annotator_noise.DEFAULT_MODEL
DEFAULT_RELABEL_RATIO = 0.0  # data_sampling.py's defaults
DEFAULT_ACQUISITION = "topk"


# ---------------------------------------------------------------------------------------------
# basic statistics


def mean_std(values):
    """`(mean, std)` of a non-empty sequence: the arithmetic mean and the sample standard deviation
    (ddof = 1). With one value the standard deviation is undefined: `None` (an empty table cell)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std needs at least one value")
    mean = math.fsum(values) / len(values)
    if len(values) == 1:
        return mean, None
    variance = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance)


def alc(labelled, accuracy):
    """Area under the accuracy-against-labelled curve (trapezoids between consecutive points, in
    increasing labelled order) divided by the labelled span `max - min`: the curve's mean height.
    A curve of one point, or one whose points all share one labelled count, has no span: its
    (mean) accuracy is returned, the limit of the normalized area as the span shrinks."""
    points = sorted(zip((float(x) for x in labelled), (float(y) for y in accuracy)))
    if not points:
        raise ValueError("alc needs at least one point")
    span = points[-1][0] - points[0][0]
    if span <= 0:
        return math.fsum(y for _, y in points) / len(points)
    area = math.fsum((x1 - x0) * (y0 + y1) / 2.0 for (x0, y0), (x1, y1) in zip(points, points[1:]))
    return area / span


def labels_to_reach(curve_labelled, curve_accuracy, target):
    """The labelled count at which the curve first reaches `target` accuracy: the first point with
    accuracy >= target gives the crossing, read by linear interpolation between it and the point
    before it. When the first point already reaches the target, its own labelled count. `None`
    when no point reaches the target. Points are taken in increasing labelled order."""
    points = sorted(zip((float(x) for x in curve_labelled), (float(y) for y in curve_accuracy)))
    for i, (x1, y1) in enumerate(points):
        if y1 >= target:
            if i == 0:
                return x1
            x0, y0 = points[i - 1]
            return x0 + (target - y0) / (y1 - y0) * (x1 - x0)  # y0 < target <= y1, so y1 > y0
    return None


# ---------------------------------------------------------------------------------------------
# Student's t distribution


def _beta_continued_fraction(a, b, x):
    """The continued fraction of the incomplete beta function (modified Lentz evaluation):
    I_x(a, b) = x^a (1-x)^b / (a B(a, b)) * 1 / (1 + d1 / (1 + d2 / (1 + ...))), with
    d_{2m+1} = -(a+m)(a+b+m) x / ((a+2m)(a+2m+1)) and d_{2m} = m (b-m) x / ((a+2m-1)(a+2m));
    returned is the part after the prefactor, times a. Converges fast for x < (a+1)/(a+b+2)."""
    tiny = 1e-300

    def guard(value):
        return tiny if abs(value) < tiny else value

    c = 1.0
    d = 1.0 / guard(1.0 - (a + b) * x / (a + 1.0))
    result = d
    for m in range(1, 1000):
        # even step d_{2m}
        numerator = m * (b - m) * x / ((a + 2 * m - 1.0) * (a + 2 * m))
        d = 1.0 / guard(1.0 + numerator * d)
        c = guard(1.0 + numerator / c)
        result *= d * c
        # odd step d_{2m+1}
        numerator = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1.0))
        d = 1.0 / guard(1.0 + numerator * d)
        c = guard(1.0 + numerator / c)
        step = d * c
        result *= step
        if abs(step - 1.0) < 1e-15:
            break
    return result


def regularized_incomplete_beta(a, b, x):
    """I_x(a, b) = B(x; a, b) / B(a, b) for a, b > 0 and 0 <= x <= 1, by its continued fraction
    (on the side where it converges fast, using I_x(a, b) = 1 - I_{1-x}(b, a))."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t, df):
    """P(T <= t) for Student's t with `df` > 0 degrees of freedom:
    the two tails together hold I_{df/(df+t^2)}(df/2, 1/2)."""
    if df <= 0:
        raise ValueError("t_cdf needs df > 0")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tails = regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tails / 2.0 if t >= 0 else tails / 2.0


def t_quantile(p, df):
    """The p-quantile of Student's t with `df` degrees of freedom (0 < p < 1), by bisection on
    `t_cdf` (t(0.975, 1) = 12.706, t(0.975, 2) = 4.303, t(0.975, 10) = 2.228)."""
    if not 0.0 < p < 1.0:
        raise ValueError("t_quantile needs 0 < p < 1")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, high * 2.0
    for _ in range(200):
        middle = (low + high) / 2.0
        if t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
        if high - low <= 1e-13 * high:
            break
    return (low + high) / 2.0


def paired_difference(values, baseline, confidence=0.95):
    """`(mean, low, high)` of the paired differences `values[i] - baseline[i]`: their mean and the
    two-sided Student-t interval mean -+ t((1+confidence)/2, n-1) * std / sqrt(n) (sample std,
    ddof = 1). One pair gives no interval: `(mean, None, None)`; no pair: `(None, None, None)`."""
    if len(values) != len(baseline):
        raise ValueError("paired_difference needs sequences of one length")
    differences = [float(v) - float(b) for v, b in zip(values, baseline)]
    if not differences:
        return None, None, None
    mean, std = mean_std(differences)
    if std is None:
        return mean, None, None
    half = t_quantile((1.0 + confidence) / 2.0, len(differences) - 1) * std / math.sqrt(len(differences))
    return mean, mean - half, mean + half


# ---------------------------------------------------------------------------------------------
# tables


def _groups(records, key):
    """Records grouped by `key(record)`, groups in order of first appearance."""
    groups = {}
    for record in records:
        groups.setdefault(key(record), []).append(record)
    return groups


def _strategy(record):
    """The record's strategy: its values of STRATEGY_KEYS, defaults filled in."""
    relabel_ratio = record.get("relabel_ratio")
    return (record["query"], record["calibrator"], float(record["noise"]),
            record.get("noise_model") or DEFAULT_NOISE_MODEL,
            DEFAULT_RELABEL_RATIO if relabel_ratio is None else float(relabel_ratio),
            record.get("acquisition") or DEFAULT_ACQUISITION, record.get("sampling_args") or "")


def _baseline_key(strategy):
    """What a strategy shares with its baseline: all but the query, the acquisition and the
    sampling flags."""
    return strategy[1:5]


def _baseline_of(strategy, candidates):
    """The value of `candidates` ({baseline strategy: value}) that is `strategy`'s baseline: among
    the random strategies of its `_baseline_key`, the one with its sampling flags, else the first."""
    matching = [s for s in candidates if _baseline_key(s) == _baseline_key(strategy)]
    for candidate in matching:
        if candidate[6] == strategy[6]:
            return candidates[candidate]
    return candidates[matching[0]] if matching else None


def aggregate(records):
    """One row per (STRATEGY_KEYS, round) over the seeds that finished that round: STRATEGY_KEYS,
    `round, labelled, seeds, accuracy_mean, accuracy_std, ece_mean, ece_std` (mean and sample std,
    ddof = 1; the std is None for a single seed). `labelled` is the
    mean over the seeds (they agree when every loop queries the same number per round). Groups
    come in the order they first appear in `records`, rounds in increasing order."""
    rows = []
    for strategy, group in _groups(records, _strategy).items():
        by_round = _groups(group, lambda r: int(r["round"]))
        for k in sorted(by_round):
            finished = by_round[k]
            accuracy_mean, accuracy_std = mean_std([r["accuracy"] for r in finished])
            ece_mean, ece_std = mean_std([r["ece"] for r in finished])
            rows.append({**dict(zip(STRATEGY_KEYS, strategy)), "round": k,
                         "labelled": mean_std([r["labelled"] for r in finished])[0],
                         "seeds": len({r["seed"] for r in finished}),
                         "accuracy_mean": accuracy_mean, "accuracy_std": accuracy_std,
                         "ece_mean": ece_mean, "ece_std": ece_std})
    return rows


def _curves(group):
    """seed -> list of (round, labelled, accuracy), rounds in increasing order."""
    curves = {}
    for record in group:
        curves.setdefault(record["seed"], []).append(
            (int(record["round"]), float(record["labelled"]), float(record["accuracy"])))
    return {seed: sorted(points) for seed, points in curves.items()}


def summarize(records, baseline=BASELINE):
    """One row per strategy: STRATEGY_KEYS, `seeds, final_accuracy_mean, final_accuracy_std, alc_mean, labels_saved_vs_random, diff_vs_random_mean,
    diff_vs_random_low, diff_vs_random_high`.

    The group's final round is the largest round any of its seeds finished; `seeds` counts the
    seeds that finished it, and every figure uses those seeds only (while a grid still runs, a
    seed behind the others is left out rather than compared at another round).
    - final_accuracy_mean/std: over those seeds at the final round (std None for one seed);
    - alc_mean: the mean over those seeds of `alc` of each seed's curve;
    - labels_saved_vs_random: `labels_to_reach` on the baseline's mean curve (same calibrator,
      noise, noise model and relabel ratio; `aggregate`'s accuracy_mean against labelled) for this
      group's final_accuracy_mean,
      minus this group's mean labelled count at its final round; None when the baseline is not in
      the grid or its mean curve never reaches that accuracy;
    - labels_saved_at_random_final: the other way round, which can show a saving when every
      strategy covers the same labelled span: the baseline's mean labelled count at its final
      round minus `labels_to_reach` on this group's mean curve for the baseline's final mean
      accuracy; positive when this strategy reaches random's final accuracy with fewer labels,
      None when its curve never reaches it (or no baseline);
    - diff_vs_random_mean/low/high: `paired_difference` of this group's final accuracy against the
      baseline's at the same round and seed, over the seeds both finished."""
    records = list(records)
    all_curves = {}
    for row in aggregate(records):
        all_curves.setdefault(tuple(row[key] for key in STRATEGY_KEYS), []).append(
            (row["labelled"], row["accuracy_mean"]))
    mean_curves = {strategy: curve for strategy, curve in all_curves.items() if strategy[0] == baseline}
    groups = _groups(records, _strategy)
    baseline_groups = {strategy: group for strategy, group in groups.items() if strategy[0] == baseline}
    rows = []
    for strategy, group in groups.items():
        curves = _curves(group)
        final = max(points[-1][0] for points in curves.values())
        finished = {seed: points for seed, points in curves.items() if points[-1][0] == final}
        seeds = sorted(finished)
        final_mean, final_std = mean_std([finished[s][-1][2] for s in seeds])
        alc_mean = mean_std([alc([p[1] for p in finished[s]], [p[2] for p in finished[s]]) for s in seeds])[0]
        final_labelled = mean_std([finished[s][-1][1] for s in seeds])[0]
        saved = None
        curve = _baseline_of(strategy, mean_curves)
        if curve:
            reach = labels_to_reach([x for x, _ in curve], [y for _, y in curve], final_mean)
            saved = None if reach is None else reach - final_labelled
        saved_at_final = None
        own_curve = all_curves.get(strategy)
        if curve and own_curve:
            random_labelled, random_accuracy = max(curve)
            reach = labels_to_reach([x for x, _ in own_curve], [y for _, y in own_curve], random_accuracy)
            saved_at_final = None if reach is None else random_labelled - reach
        baseline_final = {}
        for seed, points in _curves(_baseline_of(strategy, baseline_groups) or []).items():
            for k, _, accuracy in points:
                if k == final:
                    baseline_final[seed] = accuracy
        paired = [s for s in seeds if s in baseline_final]
        diff = paired_difference([finished[s][-1][2] for s in paired], [baseline_final[s] for s in paired])
        rows.append({**dict(zip(STRATEGY_KEYS, strategy)), "seeds": len(seeds),
                     "final_accuracy_mean": final_mean, "final_accuracy_std": final_std, "alc_mean": alc_mean,
                     "labels_saved_vs_random": saved, "labels_saved_at_random_final": saved_at_final,
                     "diff_vs_random_mean": diff[0],
                     "diff_vs_random_low": diff[1], "diff_vs_random_high": diff[2]})
    return rows


def _reference_first(axis, a, b):
    """`(other, reference)` of two strategies that differ only in `axis` (a STRATEGY_KEYS name;
    `a` appeared first): the reference holds the axis' REFERENCE_VALUES entry (the default noise
    model for `noise_model`), else it is `a`."""
    position = STRATEGY_KEYS.index(axis)
    reference = DEFAULT_NOISE_MODEL if axis == "noise_model" else REFERENCE_VALUES[axis]
    return (a, b) if b[position] == reference else (b, a)


def pairs(records):
    """Paired comparisons of every two strategies that differ in exactly one strategy key (the
    `axis`): per round both reached, the per-seed differences `value - reference` of accuracy and
    of ECE over the seeds both finished, with 95% Student-t intervals (`paired_difference`; empty
    for one seed). One row per (pair, round): PAIR_COLUMNS, where `value` and `reference` are the
    two values of the axis (the reference by REFERENCE_VALUES) and the strategy columns hold the
    values the two share (the axis' column holds the value compared). Pairs come in the order
    their strategies first appear, rounds in increasing order."""
    groups = _groups(records, _strategy)
    runs = {strategy: {(int(r["round"]), r["seed"]): r for r in group} for strategy, group in groups.items()}
    strategies = list(groups)
    rows = []
    for i, first in enumerate(strategies):
        for second in strategies[i + 1:]:
            differing = [k for k, (x, y) in enumerate(zip(first, second)) if x != y]
            if len(differing) != 1:
                continue
            axis = STRATEGY_KEYS[differing[0]]
            other, reference = _reference_first(axis, first, second)
            shared = runs[other].keys() & runs[reference].keys()
            for k in sorted({k for k, _ in shared}):
                seeds = sorted(seed for kk, seed in shared if kk == k)
                row = {**dict(zip(STRATEGY_KEYS, other)), "axis": axis, "value": other[differing[0]],
                       "reference": reference[differing[0]], "round": k, "seeds": len(seeds)}
                for metric in ("accuracy", "ece"):
                    diff = paired_difference([runs[other][k, s][metric] for s in seeds],
                                             [runs[reference][k, s][metric] for s in seeds])
                    row.update(zip((f"{metric}_diff_mean", f"{metric}_diff_low", f"{metric}_diff_high"), diff))
                rows.append(row)
    return rows


def format_value(value, decimals=6):
    """A table cell: '' for None or NaN, integers (and integral floats) without decimals, other
    floats rounded to `decimals` with trailing zeros dropped (noise 0.3 -> '0.3')."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if decimals == 0 or value == int(value):
            return str(int(round(value)))
        text = f"{value:.{decimals}f}".rstrip("0").rstrip(".")
        return "0" if text in ("-0", "") else text
    return str(value)


def atomic_write(path, text):
    """Write `text` under a temporary name in `path`'s folder, then rename it onto `path`, so
    readers see the old file or the new one, never a part."""
    with atomic_io.atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)


def csv_text(rows, columns):
    """The rows as CSV (header first, six decimals at most, empty cells for None)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([format_value(row.get(c)) for c in columns])
    return buffer.getvalue()


def markdown_text(rows, columns, decimals=None):
    """The rows as a markdown table; `decimals` maps a column to its shown decimals
    (default `MARKDOWN_DECIMALS`, others six)."""
    decimals = MARKDOWN_DECIMALS if decimals is None else decimals
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(format_value(row.get(c), decimals.get(c, 6)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path, rows, columns):
    atomic_write(path, csv_text(rows, columns))


def write_markdown(path, rows, columns, decimals=None):
    atomic_write(path, markdown_text(rows, columns, decimals))


def write_tables(folder, records, baseline=BASELINE, suffix=""):
    """`comparison<suffix>.csv/.md` (`aggregate`), `summary<suffix>.csv/.md` (`summarize`) and
    `pairs<suffix>.csv/.md` (`pairs`) in `folder`, each written atomically. Returns
    `(comparison_rows, summary_rows)`."""
    comparison_rows = aggregate(records)
    summary_rows = summarize(records, baseline)
    for name, rows, columns in (("comparison", comparison_rows, COMPARISON_COLUMNS),
                                ("summary", summary_rows, SUMMARY_COLUMNS),
                                ("pairs", pairs(records), PAIR_COLUMNS)):
        write_csv(os.path.join(folder, f"{name}{suffix}.csv"), rows, columns)
        write_markdown(os.path.join(folder, f"{name}{suffix}.md"), rows, columns)
    return comparison_rows, summary_rows


# ---------------------------------------------------------------------------------------------
# plots


def _save_figure(fig, path):
    with atomic_io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(rows, path):
    """Mean test accuracy (top) and ECE (bottom) against labelled samples from `aggregate`'s rows,
    one line per query strategy (and acquisition, named when not topk) with a band of +-1 std (none
    where the std is undefined), one column of panels per (calibrator, noise, noise model, relabel
    ratio). Written atomically; returns `path` (None without rows)."""
    if not rows:
        return None
    plt = _pyplot()

    def panel(r):
        return _strategy(r)[1:5]

    panels = list(_groups(rows, panel))
    fig, axes = plt.subplots(2, len(panels), figsize=(4.5 * len(panels) + 0.5, 7), squeeze=False)
    for column, (calibrator, noise, noise_model, relabel_ratio) in enumerate(panels):
        panel_rows = [r for r in rows if panel(r) == (calibrator, noise, noise_model, relabel_ratio)]
        for query, lines in _groups(panel_rows, _line_name).items():
            lines = sorted(lines, key=lambda r: r["round"])
            x = [r["labelled"] for r in lines]
            for ax, metric in ((axes[0][column], "accuracy"), (axes[1][column], "ece")):
                mean = [r[f"{metric}_mean"] for r in lines]
                (line,) = ax.plot(x, mean, marker="o", label=query)
                if all(r[f"{metric}_std"] is not None for r in lines):
                    std = [r[f"{metric}_std"] for r in lines]
                    ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                    color=line.get_color(), alpha=0.15)
        title = f"{calibrator}, noise {format_value(noise)}"
        if noise_model != DEFAULT_NOISE_MODEL:
            title += f" ({noise_model})"
        if relabel_ratio != DEFAULT_RELABEL_RATIO:
            title += f", relabel {format_value(relabel_ratio)}"
        axes[0][column].set(title=title, ylabel="test accuracy (%)")
        axes[1][column].set(xlabel="labelled samples", ylabel="ECE")
        for ax in (axes[0][column], axes[1][column]):
            ax.grid(alpha=0.3)
            ax.legend(title="query", fontsize="small")
    fig.suptitle("mean over seeds; band: \u00b11 std")
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path


def _line_name(r):
    """A plot line's name: the query, with its acquisition when not topk and its sampling flags
    when there are any."""
    acquisition = r.get("acquisition") or DEFAULT_ACQUISITION
    extras = [value for value in (None if acquisition == DEFAULT_ACQUISITION else acquisition,
                                  r.get("sampling_args") or None) if value]
    return r["query"] + (f" ({', '.join(extras)})" if extras else "")


def plot_noise(summary_rows, path):
    """Final mean test accuracy (error bars +-1 std) against the noise ratio, one panel per query
    strategy (and acquisition), one line per calibrator (and noise model and relabel ratio, when
    there are several), from `summarize`'s rows. At ratio 0 the noise model changes nothing: a line without a point of its own there
    starts from its calibrator's point at 0. Drawn only when more than one noise ratio is present:
    returns `path`, or None when nothing was drawn."""
    if len({r["noise"] for r in summary_rows}) < 2:
        return None
    plt = _pyplot()

    def model(r):
        noise_model, relabel_ratio = _strategy(r)[3:5]
        return noise_model + ("" if relabel_ratio == DEFAULT_RELABEL_RATIO else f", relabel {format_value(relabel_ratio)}")

    several = len({model(r) for r in summary_rows}) > 1
    queries = list(_groups(summary_rows, _line_name))
    fig, axes = plt.subplots(1, len(queries), figsize=(4.5 * len(queries) + 0.5, 4), squeeze=False)
    for ax, query in zip(axes[0], queries):
        rows = [r for r in summary_rows if _line_name(r) == query]
        for (calibrator, noise_model), lines in _groups(rows, lambda r: (r["calibrator"], model(r))).items():
            if not any(r["noise"] == 0 for r in lines):
                lines = lines + [r for r in rows if r["calibrator"] == calibrator and r["noise"] == 0][:1]
            lines = sorted(lines, key=lambda r: r["noise"])
            ax.errorbar([r["noise"] for r in lines], [r["final_accuracy_mean"] for r in lines],
                        yerr=[r["final_accuracy_std"] or 0.0 for r in lines], marker="o", capsize=3,
                        label=f"{calibrator}, {noise_model}" if several else calibrator)
        ax.set(title=f"query {query}", xlabel="annotator noise ratio", ylabel="final test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(title="calibrator, noise model" if several else "calibrator", fontsize="small")
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path
