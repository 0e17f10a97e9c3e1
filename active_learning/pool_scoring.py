"""The round's pool and its scores: the unlabelled samples of the pool selections (subsampled by
--pool_subsample), scored batch by batch with the per-sample quantities a query strategy needs
(confidence, margin, entropy, BALD by MC dropout), the ranks' columns merged in pool order."""
import argparse

import numpy as np
import torch
import torch.utils.data
from tqdm import tqdm

from active_learning import acquisition
from measurement import calibration
from active_learning import coreset
import dataset
from data_layer import leaf_selection
from active_learning import query_strategies
import utils
from measurement.evaluation import concatenate_columns, eval_loader, forward_logits, show_progress


class Pool(torch.utils.data.ConcatDataset):
    """The unlabelled samples of several selections; `leaves` are its non-empty leaf datasets in
    pool order (within a leaf, samples keep LMDB order). `total` counts the pool before a
    --pool_subsample draw, which leaves len(pool) samples to score."""

    def __init__(self, parts, total=None):
        super().__init__(parts)
        self.leaves = [leaf for part in parts for leaf in part.parts]
        self.total = len(self) if total is None else total

    @property
    def subsampled(self):
        return len(self) < self.total


def subsample_pool(pool, size, seed, round_name):
    """A random `size` of the pool's samples (all of them when it holds no more). Each sample's key
    comes from (seed, round name, its identity) alone and the `size` smallest keys are kept, so every
    rank of a torchrun draws the same subsample, and the same pool gives the same one on a rerun.
    Kept samples stay in pool order."""
    if size >= len(pool):
        return pool
    salt = np.uint64(query_strategies.text_salt(f"{seed}\t{round_name}\tpool_subsample"))
    keys = np.concatenate([query_strategies.mix_keys(query_strategies.leaf_keys(leaf.relpath, leaf.indices, seed),
                                                     salt) for leaf in pool.leaves])
    kept = np.zeros(len(keys), dtype=bool)
    kept[np.argpartition(keys, size - 1)[:size]] = True
    start = 0
    for leaf in pool.leaves:
        count = len(leaf)
        leaf.indices = leaf.indices[kept[start:start + count]]
        start += count
    for part in pool.datasets:
        part.refresh()
    return Pool([part for part in pool.datasets if len(part)], total=pool.total)


def build_pool(opt, pool_names, queried, round_name, whole=()):
    """The round's pool: the unlabelled part of `pool_names` (all of it for the names in `whole`,
    i.e. --pool_data) less the `queried` identities, then the --pool_subsample draw of round
    `round_name`; returns `(pool, log text)`."""
    parts, logs = [], []
    whole_opt = argparse.Namespace(**{**vars(opt), "total_data_usage_ratio": 0.0})
    for name in pool_names:
        exclude = queried
        overlap = {leaf.relpath for part in parts for leaf in part.parts
                   if leaf_selection.selects(leaf.relpath, name, opt.train_data)}
        if overlap:  # two names selecting one LMDB must not pool its samples twice
            exclude = set(queried) | {i for part in parts for i in part.identities if i[0] in overlap}
        part, log = dataset.hierarchical_dataset(opt.train_data, whole_opt if name in whole else opt, [name],
                                                 split="unlabelled", exclude=exclude, flag="--train_data")
        logs.append(log.rstrip("\n"))
        if len(part):
            parts.append(part)
    if not parts:
        raise utils.UserError(f"the pool is empty: no unlabelled sample of {'-'.join(pool_names)} under "
                              f"{opt.train_data} is left to query (all already queried, or "
                              f"--total_data_usage_ratio {opt.total_data_usage_ratio} labels everything)")
    pool = Pool(parts)
    if opt.pool_subsample is not None:
        pool = subsample_pool(pool, opt.pool_subsample, opt.manualSeed, round_name)
        logs.append(f"pool: {pool.total} samples; --pool_subsample {opt.pool_subsample}: "
                    + (f"scoring a random {len(pool)} (seed {opt.manualSeed}, round {round_name})"
                       if pool.subsampled else "scoring all of them"))
    return pool, "\n".join(logs)


# ---------------------------------------------------------------------------------------------
# scoring


def scale(logits, temperature):
    """The logits the token quantities are computed from (a word-level scaling leaves them be)."""
    return logits if temperature is None else calibration.as_scaling(temperature).logits(logits)


def mutual_information(model, images, opt, temperature, mask, device):
    """BALD: H(mean_k p_k) - mean_k H(p_k) per token, averaged over the counted tokens (the masked
    mean is linear, so it is taken per term); with one pass, the mean token entropy of that single
    stochastic pass."""
    previous = getattr(model, "mc_dropout_p", 0.0)
    model.mc_dropout_p = opt.mc_dropout
    mean_probs, mean_entropy = 0.0, 0.0
    try:
        for _ in range(opt.mc_samples):
            with utils.autocast_context(device, opt.amp):
                logits = forward_logits(model, images, opt.batch_max_length, opt.Prediction)
            probs = scale(logits.float(), temperature).softmax(-1)
            mean_probs = mean_probs + probs / opt.mc_samples
            mean_entropy = mean_entropy + utils.mean_entropy(probs, mask) / opt.mc_samples
    finally:
        model.mc_dropout_p = previous
    if opt.mc_samples == 1:
        return mean_entropy
    return utils.mean_entropy(mean_probs, mask) - mean_entropy


def per_character(confidence, texts):
    """Word confidences to the power 1 / characters of each reading (at least one character)."""
    lengths = torch.tensor([max(len(text), 1) for text in texts], dtype=torch.float32, device=confidence.device)
    return confidence.float().clamp(min=0.0) ** (1.0 / lengths)


def score_batch(model, images, converter, opt, needs, temperature, device):
    """Predictions and the per-sample quantities in `needs` for one batch (all vectorised)."""
    with coreset.capture_embeddings(model, "embedding" in needs) as embeddings, \
            utils.autocast_context(device, opt.amp):
        logits = forward_logits(model, images, opt.batch_max_length, opt.Prediction)
    logits = logits.float()
    texts, confidence, _ = utils.decode_predictions(logits, converter)
    values = {"confidence": confidence}
    if "char_confidence" in needs:
        values["char_confidence"] = per_character(confidence, texts)
    scaling = calibration.as_scaling(temperature, getattr(opt, "calibration", None))
    scaled = scale(logits, scaling)
    if temperature is not None:
        values["cal_confidence"] = calibration.decode_calibrated(logits, converter, scaling)[1]
    elif "cal_confidence" in needs:
        values["cal_confidence"] = confidence
    if {"margin", "entropy", "mc"} & set(needs):
        # Counted steps come from the deterministic pass: the stochastic ones are compared on them.
        mask = utils.token_mask(logits, converter)
        probs = scaled.softmax(-1)
        if "margin" in needs:
            values["margin"] = utils.mean_margin(probs, mask)
        if "entropy" in needs:
            values["entropy"] = utils.mean_entropy(probs, mask)
        if "mc" in needs:
            values["mc"] = mutual_information(model, images, opt, scaling, mask, device)
    values = {k: v.detach().float().cpu().numpy() for k, v in values.items()}
    if embeddings is not None:
        values["embedding"] = embeddings[0]
    return texts, values


class ScoreTable:
    """Per-sample records, column-wise: identity, prediction, correctness and the float quantities."""

    def __init__(self, capacity=0):
        self.relpaths, self.indices, self.predictions, self.correct = [], [], [], []
        self.values = {}
        self.capacity, self.rows = capacity, {}  # (B, d) quantities (embeddings): one array each, no copies

    def extend(self, identities, predictions, labels, values):
        self.relpaths.extend(r for r, _ in identities)
        self.indices.extend(i for _, i in identities)
        self.predictions.extend(predictions)
        self.correct.extend(p == g for p, g in zip(predictions, labels))
        for key, column in values.items():
            if column.ndim == 2:
                self.rows.setdefault(key, coreset.RowStore(self.capacity)).add(column)
            else:
                self.values.setdefault(key, []).append(column)

    def columns(self):
        return {
            "relpath": self.relpaths, "index": np.asarray(self.indices, dtype=np.int64),
            "prediction": self.predictions, "correct": np.asarray(self.correct, dtype=bool),
            **{k: np.concatenate(v) for k, v in self.values.items()},
            **{k: v.array() for k, v in self.rows.items()},
        }


def score_pool(model, data, converter, opt, strategy, temperature, device, rank=0):
    table = ScoreTable(capacity=len(data))
    needs = strategy.needs + acquisition.needs(opt.acquisition)
    loader = eval_loader(data, opt, device)
    bar = tqdm(loader, total=len(loader), desc="scoring", unit="batch", disable=not show_progress(opt, rank),
               dynamic_ncols=True)
    with torch.no_grad():
        for images, labels, identities in bar:
            if not labels:
                continue
            texts, values = score_batch(model, images.to(device, non_blocking=True), converter, opt,
                                        needs, temperature, device)
            table.extend(identities, texts, labels, values)
    bar.close()
    return table.columns()


def merge_columns(parts, leaf_relpaths):
    """Concatenate the ranks' columns and sort them into pool order."""
    merged = parts[0] if len(parts) == 1 else concatenate_columns(parts)
    leaf_order = {rel: k for k, rel in enumerate(leaf_relpaths)}
    # Within one leaf the pool keeps LMDB order, so (leaf position, index) is the pool order.
    leaf_rank = np.fromiter((leaf_order[r] for r in merged["relpath"]), dtype=np.int64, count=len(merged["relpath"]))
    order = np.lexsort((merged["index"], leaf_rank))
    if np.array_equal(order, np.arange(len(order))):
        return merged  # one process scores in pool order: no copy (the embeddings can be large)
    return {k: v[order] if isinstance(v, np.ndarray) else [v[i] for i in order] for k, v in merged.items()}
