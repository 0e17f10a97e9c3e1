"""Batch acquisition: how a query strategy's ranking becomes the batch of samples to label.

`topk` takes the strategy's first `count` samples (the original behaviour). Top-k of a score tends
to pick near-duplicates (the same hard font, the same blur), so the stochastic acquisitions of
Kirsch et al. ("Stochastic Batch Acquisition", TMLR 2023) draw the batch instead, without
replacement, each sample with a weight that grows with how useful the strategy finds it:
  power     w = s ** beta            s = the strategy's informativeness (>= 0; 0 is never drawn
                                     while samples of positive weight remain)
  softmax   w = exp(beta * s)
  softrank  w = rank ** -beta        rank = 1 for the strategy's first choice
A large beta approaches top-k; beta = 0 is uniform. Drawing k samples without replacement with
probabilities proportional to w is done at once with the Gumbel-top-k trick: the k largest
log w + G, G standard Gumbel noise. The noise comes from a key of (seed, query set name, sample
identity) alone, so a draw is repeatable, differs from round to round, and does not depend on the
order or the number of processes that scored the pool."""
import hashlib

import numpy as np

import query_strategies
from utils import UserError

ACQUISITIONS = ("topk", "power", "softmax", "softrank")


def check(name, beta, strategy):
    """One error line for an acquisition that cannot run with this strategy and beta."""
    if name not in ACQUISITIONS:
        raise UserError(f"--acquisition {name}: unknown; choose one of {', '.join(ACQUISITIONS)}")
    if not np.isfinite(beta) or beta < 0:
        raise UserError(f"--acquisition_beta {beta}: give a finite number of at least 0")
    if name in ("power", "softmax") and strategy.informativeness is None:
        raise UserError(f"--acquisition {name} weights by a score, which --query {strategy.name} does not have; "
                        f"use --acquisition softrank or topk")


def round_keys(tie_keys, seed, round_name):
    """Uniform numbers in (0, 1), one per sample, fixed by (seed, round name, sample identity)."""
    salt = int.from_bytes(hashlib.blake2b(f"{seed}\t{round_name}".encode("utf-8"), digest_size=8).digest(), "little")
    mixed = query_strategies.mix_keys(np.asarray(tie_keys, dtype=np.uint64), salt)
    # the top 53 bits as a double in [0, 1), shifted off 0
    return ((mixed >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def log_weights(name, strategy, scores, tie_keys, beta, params):
    """log w per sample for a stochastic acquisition (see the module docstring)."""
    if name == "softrank":
        order = strategy.rank(scores, tie_keys, **params)
        ranks = np.empty(len(order), dtype=np.float64)
        ranks[order] = np.arange(1, len(order) + 1)
        return -beta * np.log(ranks)
    check(name, beta, strategy)
    value = np.asarray(strategy.informativeness(scores), dtype=np.float64)
    if name == "softmax":
        return beta * value
    with np.errstate(divide="ignore"):
        return beta * np.log(np.clip(value, 0.0, None)) if beta > 0 else np.zeros_like(value)


def select(name, beta, strategy, scores, tie_keys, count, seed, round_name, **params):
    """Indices of the `count` samples to query, the first drawn first."""
    if name == "topk":
        return strategy.select(scores, tie_keys, count, **params)
    weights = log_weights(name, strategy, scores, tie_keys, beta, params)
    uniform = round_keys(tie_keys, seed, round_name)
    gumbel = -np.log(-np.log(uniform))
    perturbed = weights + gumbel  # -inf for a zero weight: drawn only after every positive one
    # largest first; ties (only among -inf) by the tie key, as the rankings break them
    return np.lexsort((np.asarray(tie_keys), -perturbed))[:count]
