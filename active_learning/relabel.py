"""A re-annotation budget in the active-learning loop (data_sampling.py --relabel_ratio f): a share
of a round's budget goes to a second look at the labelled samples whose labels the model believes
least, instead of to new samples (ActiveLab's question, asked for sequences).

The budget. A round that would query n samples re-annotates r = round(f x n) of them (halves up),
at most as many as there are labelled samples, and queries n - r new ones as before.

Which samples. The labelled samples are those the next training round reads (dataset.
labelled_dataset over the base datasets, every query set and every relabel set under --train_data),
with the labels it trains on: the simulated annotator's errors (--noise_ratio, --noise_model,
--noise_scope, --manualSeed, as training) and earlier re-annotations included. They are scored by
label quality (annotators/label_quality.py, the score of find_label_errors.py) and the r lowest are taken,
each sample (its identity: a query set's sample by its origin) at most once.

The relabel set. `<query set>_relabel` under --train_data, written with the query set under the
same lock and by the same atomic write (published just before it): per sample the image, the
annotator's label (in simulation the clean label of the source LMDB, the oracle's answer), an
`origin-%09d` key naming the sample's identity, and a `relabel-meta` key (lmdb_format.RELABEL_META_KEY)
instead of `query-meta`, which records the round's --relabel_policy (relabel_policies; a set
without one means `replace`). Training (dataset.Batch_Balanced_Dataset, dataset.labelled_dataset)
applies every selected relabel set to the samples it names, in round order, by its policy:
`replace` trains on the re-annotation, `agree` keeps an equal label and leaves out a sample whose
two answers differ; a relabel set adds no sample. With simulated noise the re-annotation is a
fresh draw of the same annotator: the same model and ratio, exactly that share of the relabel set,
from its own stream (set_records.relabel_noise_seed: seed, "relabel", round), so it can be wrong again;
the error is applied when the set is read, as for a query set, so noise_log.csv holds the clean
label and the one trained on (and no sample `agree` dropped). The next round's --select_data names
every relabel set with the batch share 0.

With an annotation package (--export_annotation) the chosen samples go into the package instead
(annotation.second_look_records, `pending_part`), and import_annotations.py writes the relabel set
from the transcribers' answers (annotation.write_relabel_set)."""
import math
import os
from datetime import datetime, timezone

import numpy as np

from annotators import annotator_noise
import dataset
from data_layer import leaf_selection
from data_layer import lmdb_format
from data_layer import lmdb_writing
from data_layer import set_records
from annotators import label_quality
from active_learning import query_strategies
from active_learning import relabel_policies
import utils
from measurement.evaluation import concatenate_columns, rank_share

SUFFIX = "_relabel"
NOISE_SCOPES = dataset.NOISE_SCOPES


def add_args(parser):
    group = parser.add_argument_group("re-annotation (docs/noisy-labels.md: 'A re-annotation budget')")
    group.add_argument("--relabel_ratio", type=float, default=0.0,
                       help="share of the round's budget spent on re-annotating the labelled samples of lowest "
                            "label quality instead of querying new ones: round(f x budget), into the relabel set "
                            "<query set>_relabel (0: none)")
    group.add_argument("--relabel_policy", default=relabel_policies.DEFAULT,
                       help="how training combines a re-annotation with the label the sample trains on "
                            "(recorded in the relabel set): replace (train on the re-annotation) or agree (keep "
                            "an equal label, leave the sample out of training when the two differ)")
    group.add_argument("--noise_ratio", type=float, default=0.0,
                       help="the simulated annotator noise training uses (train.py --noise_ratio), so that the "
                            "labels judged are those trained on and a re-annotation can err again")
    group.add_argument("--noise_scope", choices=NOISE_SCOPES, default="queried",
                       help="which labels the noise touched (train.py --noise_scope)")
    group.add_argument("--noise_model", default=annotator_noise.DEFAULT_MODEL,
                       help="the simulated annotator's errors (train.py --noise_model): "
                            + ", ".join(annotator_noise.NOISE_MODELS))
    return group


def check_policy_flag(policy):
    """A UserError naming --relabel_policy when `policy` is no name of relabel_policies.POLICIES."""
    if policy not in relabel_policies.POLICIES:
        raise utils.UserError(f"--relabel_policy {policy}: unknown; choose one of {relabel_policies.known()}")


def check_args(opt):
    if not (math.isfinite(opt.relabel_ratio) and 0.0 <= opt.relabel_ratio <= 1.0):
        raise utils.UserError(f"--relabel_ratio {opt.relabel_ratio}: give a share of the budget in [0, 1]")
    check_policy_flag(opt.relabel_policy)
    if not math.isfinite(opt.noise_ratio):
        raise utils.UserError(f"--noise_ratio {opt.noise_ratio}: must lie between 0 and 1")
    dataset.check_noise(opt.noise_ratio, opt.noise_scope, opt.noise_model)


def noise_warning(opt, saved):
    """The warning line for a round that re-annotates without simulated noise (--noise_ratio 0)
    while the model's training used some (`saved`: the options saved beside --saved_model), or
    None: its re-annotations would be simulated as perfect and the labels judged as clean."""
    try:
        trained = float(saved.get("noise_ratio") or 0.0)
    except (TypeError, ValueError):
        return None
    if not (opt.relabel_ratio > 0 and opt.noise_ratio == 0 and trained > 0):
        return None
    model = saved.get("noise_model") or annotator_noise.DEFAULT_MODEL
    scope = saved.get("noise_scope") or "queried"
    return (f"warning: --relabel_ratio {opt.relabel_ratio:g} without --noise_ratio, but the model's training used "
            f"annotator noise (--noise_ratio {trained:g} --noise_model {model} --noise_scope {scope}, in the options "
            f"beside --saved_model): the labels are judged as clean and the re-annotations simulated as perfect; "
            f"pass the training's --noise_ratio {trained:g} --noise_model {model} --noise_scope {scope}")


def split_budget(count, ratio, labelled):
    """(re-annotations, new queries) of a budget of `count`: round(ratio x count), halves up, at
    most `labelled`; the rest new."""
    relabels = min(annotator_noise.corrupted_count(ratio, count), labelled)
    return relabels, count - relabels


# ---------------------------------------------------------------------------------------------
# the plan: names, and what is there already


class RelabelPlan:
    """The round's relabel set (`name`, `path`, `replaced`: whether one is there to be replaced,
    `round`) and `existing`: the names of the other relabel sets under --train_data, in the order
    their labels apply."""

    def __init__(self, name, path, replaced, round_number, existing):
        self.name, self.path, self.replaced, self.round = name, path, replaced, round_number
        self.existing = existing


def relabel_name(query_set):
    return query_set + SUFFIX


def orphaned(path, root):
    """A relabel set whose query set is not under root: its round was stopped between the two
    writes (the relabel set is published first), so the round's next run may replace it."""
    query_set = (set_records.read_relabel_meta(path) or {}).get("query_set")
    return bool(query_set) and not set_records.is_query_set(os.path.join(root, query_set))


def plan(opt, query_set, leaves, round_number, check_name):
    """The RelabelPlan of a round writing `query_set`; `leaves` are the leaf relpaths under
    --train_data and `check_name(name)` data_sampling's check of an output name. Fails before any
    work when the relabel set's name is taken by something it may not replace."""
    root = opt.train_data
    name = relabel_name(query_set)
    path = os.path.join(root, name)
    relabel_sets = set_records.relabel_leaves(root, leaves)
    for given, share in zip(opt.select_data, opt.batch_ratio):
        chosen = [rel for rel in leaves if leaf_selection.selects(rel, given, root)]
        if share == 0 and not (chosen and set(chosen) <= set(relabel_sets)):
            raise utils.UserError(f"--batch_ratio: {given} has the share 0, which only a relabel set may have; give "
                                  f"it a positive share")
    existing = [rel.rsplit("/", 1)[-1] for rel in set_records.relabel_order(root, relabel_sets) if rel != name]
    replaced = os.path.lexists(path)
    if opt.relabel_ratio == 0:
        if replaced and set_records.is_relabel_set(path) and not orphaned(path, root):
            raise utils.UserError(f"{path}: the relabel set of {query_set}, which this round replaces without "
                                  f"re-annotating (--relabel_ratio 0); remove it, or give --relabel_ratio")
        return RelabelPlan(None, None, False, round_number, existing)
    check_name(name)
    check_free(path, root, opt.overwrite)
    return RelabelPlan(name, path, replaced, round_number, existing)


def check_free(path, root, overwrite, flag="--out_name"):
    """A relabel set may be written at path: nothing is there, or a relabel set that --overwrite
    or its orphaning (its query set never appeared) lets this round replace."""
    if not os.path.lexists(path):
        return
    if not (os.path.isdir(path) and not os.path.islink(path) and set_records.is_relabel_set(path)):
        raise utils.UserError(f"{path} already exists and is not a relabel set written by data_sampling.py or "
                              f"import_annotations.py; choose another {flag}")
    if not (overwrite or orphaned(path, root)):
        raise utils.UserError(f"{path} already exists; choose another {flag} or pass --overwrite")


# ---------------------------------------------------------------------------------------------
# scoring the labelled samples


def labelled_names(plan_names, relabel_plan, replaced_query_set):
    """The --select_data names whose labelled samples the next round trains on, this round's
    outputs left out: the base datasets, the query sets and the other relabel sets."""
    names = [n for n in plan_names if n != replaced_query_set]
    return names + [n for n in relabel_plan.existing if n not in names]


def labelled_data(opt, names, required=True):
    return dataset.labelled_dataset(opt.train_data, opt, names, noise_ratio=opt.noise_ratio,
                                    noise_scope=opt.noise_scope, noise_model=opt.noise_model, required=required)


def score_labelled(opt, model, converter, device, names, rank, world_size, distributed):
    """The label-quality columns of every labelled sample (rank 0; None elsewhere) and how many
    there are; each rank scores every world_size-th sample."""
    data, log = labelled_data(opt, names)
    if rank == 0:
        print(f"scoring the label quality of {len(data)} labelled samples (--relabel_ratio {opt.relabel_ratio:g})")
    columns = label_quality.score_dataset(model, rank_share(data, rank, world_size), converter, opt, device, rank,
                                          desc="scoring labels")
    parts = utils.all_gather_object(columns) if distributed else [columns]
    if rank != 0:
        return None
    return concatenate_columns(parts)


# ---------------------------------------------------------------------------------------------
# choosing, drawing the re-annotations, writing


def sample_identities(root, relpaths, indices):
    """Each sample's identity: a query set's sample by its origin, any other by where it is."""
    identities, query_set = [], {}
    for rel, index in zip(relpaths, indices):
        path = os.path.join(root, rel)
        origin = None
        if rel not in query_set:  # one look per dataset, not per sample
            query_set[rel] = set_records.is_query_set(path)
        if query_set[rel]:
            with lmdb_format.shared_env(path).begin(write=False) as txn:
                origin = lmdb_format.read_origin(txn, int(index), path)
        identities.append(origin or (rel, int(index)))
    return identities


def choose(columns, count, identities):
    """Row positions of the `count` lowest label qualities (label_quality.worst_first: ties by
    relpath then index), one per identity."""
    chosen, seen = [], set()
    for row in label_quality.worst_first(columns).tolist():
        if len(chosen) == count:
            break
        if identities[row] in seen:
            continue
        seen.add(identities[row])
        chosen.append(row)
    return chosen


def read_sources(root, rows, columns, identities):
    """[(image bytes, clean label as stored, identity)] of the chosen rows, from where training
    reads them (the oracle's answer is the label the LMDB holds)."""
    samples = []
    for row in rows:
        rel, index = columns["relpath"][row], int(columns["index"][row])
        path = os.path.join(root, rel)
        with lmdb_format.shared_env(path).begin(write=False) as txn:
            image = txn.get(lmdb_format.image_key(index))
            label = txn.get(lmdb_format.label_key(index))
        if image is None or label is None:
            raise utils.UserError(f"{path}: sample {index} vanished while sampling; was the dataset rewritten?")
        samples.append((image, label.decode("utf-8"), identities[row]))
    return samples


def draw(opt, samples, round_number):
    """{identity: annotator_noise.Corruption} of the simulated re-annotation of `samples`, as
    dataset.read_relabels draws it from the written relabel set (same samples in the same order,
    normalised labels, seed and bound)."""
    if not opt.noise_ratio:
        return {}
    rules = dataset.LabelRules(opt)
    labelled = [(identity, rules.clean(rules.normalise(label))) for _, label, identity in samples]
    bound = rules.max_length if rules.filtering else None
    return annotator_noise.noisy_labels(labelled, opt.noise_ratio, opt.character,
                                        set_records.relabel_noise_seed(opt.manualSeed, round_number), bound,
                                        model=opt.noise_model)


def outcome(opt, rows, columns, samples, draws):
    """Per chosen sample: the label training saw, the re-annotation's answer (after its simulated
    error), the clean label."""
    rules = dataset.LabelRules(opt)
    before, after, clean = [], [], []
    for row, (_, label, identity) in zip(rows, samples):
        truth = rules.clean(rules.normalise(label))
        before.append(columns["label"][row])
        after.append(draws[identity].label if identity in draws else truth)
        clean.append(truth)
    return before, after, clean


def trained_after(policy, before, after):
    """Per re-annotated sample, the label training will see by `policy` (relabel_policies), or None
    when the sample is dropped."""
    trained = []
    for old, answer in zip(before, after):
        decision = relabel_policies.decide(policy, old, answer)
        trained.append(None if decision == relabel_policies.DROP else old if decision == relabel_policies.KEEP
                       else answer)
    return trained


def relabel_meta(opt, relabel_plan, query_set, rows, columns):
    return {"name": relabel_plan.name, "query_set": query_set, "round": relabel_plan.round,
            "model": os.path.abspath(opt.saved_model), "relabel_ratio": opt.relabel_ratio,
            "policy": opt.relabel_policy,
            "num_relabelled": len(rows), "seed": opt.manualSeed, "select_data": "-".join(opt.select_data),
            "total_data_usage_ratio": opt.total_data_usage_ratio,
            "label_quality": [round(float(label_quality.quality(columns["log_quality"][r])), 6) for r in rows],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def mean_quality(log_q):
    return float(np.mean(label_quality.quality(log_q))) if len(log_q) else None


def summary_part(opt, relabel_plan, rows, columns, before, after, clean):
    """The `relabel` entry of the round's summary: `changed` counts labels the re-annotations change
    and `dropped` the samples they leave out of training (--relabel_policy agree, where the two
    answers differ); with noise, `wrong_after` counts the wrong labels still trained on among the
    re-annotated, `fixed` / `made_wrong` the labels turned right / wrong, `dropped_wrong` /
    `dropped_right` the wrong / right labels dropped (wrong_before - fixed - dropped_wrong +
    made_wrong = wrong_after)."""
    trained = trained_after(opt.relabel_policy, before, after)
    kept = [(b, t, c) for b, t, c in zip(before, trained, clean) if t is not None]
    gone = [(b, c) for b, t, c in zip(before, trained, clean) if t is None]
    part = {"relabel_set": relabel_plan.name,
            "path": os.path.abspath(relabel_plan.path) if relabel_plan.path else None,
            "ratio": opt.relabel_ratio, "policy": opt.relabel_policy,
            "labelled": int(len(columns["index"])) if columns else 0,
            "num_relabelled": len(rows), "changed": int(sum(b != t for b, t, _ in kept)), "dropped": len(gone),
            "mean_label_quality": {
                "relabelled": mean_quality(columns["log_quality"][rows]) if rows else None,
                "labelled": mean_quality(columns["log_quality"]) if columns else None}}
    if opt.noise_ratio:
        part["noise"] = {"ratio": opt.noise_ratio, "scope": opt.noise_scope, "model": opt.noise_model,
                         "seed": set_records.relabel_noise_seed(opt.manualSeed, relabel_plan.round),
                         "wrong_before": int(sum(b != c for b, c in zip(before, clean))),
                         "wrong_after": int(sum(t != c for _, t, c in kept)),
                         "fixed": int(sum(b != c and t == c for b, t, c in kept)),
                         "made_wrong": int(sum(b == c and t != c for b, t, c in kept)),
                         "dropped_wrong": int(sum(b != c for b, c in gone)),
                         "dropped_right": int(sum(b == c for b, c in gone))}
    return part


def pending_part(opt, relabel_plan, rows, columns):
    """The `relabel` entry of a round that exports its re-annotations to human annotators
    (an annotation package): what was chosen; import_annotations.py counts what the answers changed."""
    return {"relabel_set": relabel_plan.name, "path": None, "ratio": opt.relabel_ratio, "policy": opt.relabel_policy,
            "labelled": int(len(columns["index"])), "num_relabelled": len(rows), "exported": True,
            "mean_label_quality": {"relabelled": mean_quality(columns["log_quality"][rows]) if rows else None,
                                   "labelled": mean_quality(columns["log_quality"])}}


def format_part(part):
    policy = part.get("policy", relabel_policies.DEFAULT)
    if part.get("exported"):
        return (f"exported {part['num_relabelled']} of {part['labelled']} labelled samples (lowest label quality) "
                f"for a second look, policy {policy}; import_annotations.py writes their relabel set "
                f"{part['relabel_set']}")
    line = (f"re-annotated {part['num_relabelled']} of {part['labelled']} labelled samples (lowest label quality, "
            f"policy {policy})" + (f" -> {part['path']}" if part["path"] and part["num_relabelled"] else "")
            + f"; {part['changed']} labels changed")
    if part.get("dropped"):
        line += f", {part['dropped']} samples dropped (the two answers differ)"
    noise = part.get("noise")
    if noise:
        line += (f"; wrong before {noise['wrong_before']}, after {noise['wrong_after']} (simulated annotator: "
                 f"{noise['fixed']} fixed, {noise['made_wrong']} made wrong, {noise['dropped_wrong']} wrong and "
                 f"{noise['dropped_right']} right dropped)")
    return line


def write(opt, relabel_plan, query_set, rows, columns, samples):
    """Publish the relabel set (atomic, replacing an earlier or orphaned one of that name)."""
    meta = relabel_meta(opt, relabel_plan, query_set, rows, columns)
    lmdb_writing.write_lmdb(relabel_plan.path, iter(samples), meta=meta, overwrite=relabel_plan.replaced,
                            meta_key=lmdb_format.RELABEL_META_KEY)


def next_selection(opt, query_names, query_set, relabel_plan, written, query_set_empty, skip=()):
    """The next round's (--select_data names, --batch_ratio shares): query_strategies'
    next_round_selection (the base names halve their shares, the query sets split the other half)
    over the names that are no relabel sets, leaving out the query sets that hold no sample (this
    one when `query_set_empty`: a round that only re-annotated) and the --select_data names in
    `skip` (those that select only empty query sets), then every relabel set (the earlier ones, then
    this round's when `written`) with the share 0."""
    relabels = list(relabel_plan.existing) + ([relabel_plan.name] if written else [])
    given = [(n, r) for n, r in zip(opt.select_data, opt.batch_ratio) if n not in relabels and r > 0 and n not in skip]
    empty = empty_query_sets(opt.train_data, query_names)
    queries = [n for n in query_names if n not in empty and n != query_set]
    given = [(n, r) for n, r in given if n not in empty]
    if not query_set_empty:
        newest = query_set
    elif queries:
        newest = queries[-1]  # no new query set: the latest one stays last
    else:  # nothing queried yet: the base names keep their shares
        return [n for n, _ in given] + relabels, [r for _, r in given] + [0.0] * len(relabels)
    names, shares = query_strategies.next_round_selection([n for n, _ in given], [r for _, r in given], queries,
                                                          newest)
    return names + relabels, list(shares) + [0.0] * len(relabels)


def empty_query_sets(root, names):
    """The names among `names` that are query sets holding no sample (set_records.is_empty_query_set)."""
    return {name for name in names if set_records.is_empty_query_set(os.path.join(root, name))}
