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
order or the number of processes that scored the pool.

`coreset` seeks diversity instead: greedy k-centre over an embedding of every pool sample taken in
the scoring pass (active_learning/coreset.py), starting from the labelled samples' embeddings as centres
(`--coreset_init labelled`, Sener and Savarese's core-set) or from the strategy's first choice
(`top`), optionally among the strategy's top `--candidates M` only (as cluster-margin does:
diversity among the informative). It is deterministic: the same embeddings and ranking give the
same batch."""
import hashlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from active_learning import coreset
from active_learning import query_strategies
from utils import UserError


@dataclass(frozen=True)
class Acquisition:
    """`pick(request)` returns the indices of `request.count` samples, the first picked first."""
    name: str
    pick: Callable
    help: str
    uses_beta: bool = False
    needs: tuple = ()  # per-sample quantities it needs from the scoring pass beside the strategy's


@dataclass(frozen=True)
class Request:
    strategy: object
    scores: dict
    tie_keys: np.ndarray
    count: int
    beta: float
    seed: int
    round_name: str
    candidates: int
    params: dict
    centres: object = None  # coreset: the (m, d) embeddings of the labelled samples, or None


ACQUISITIONS = {}


def register(entry):
    ACQUISITIONS[entry.name] = entry
    return entry


def get(name):
    if name not in ACQUISITIONS:
        raise UserError(f"--acquisition {name}: unknown; choose one of {', '.join(ACQUISITIONS)}")
    return ACQUISITIONS[name]


def check(name, beta, strategy, candidates=None, coreset_init=None):
    """One error line for an acquisition that cannot run with this strategy, beta, candidates and
    coreset starting centres (None: not given)."""
    entry = get(name)
    if not np.isfinite(beta) or beta < 0:
        raise UserError(f"--acquisition_beta {beta}: give a finite number of at least 0")
    if name in ("power", "softmax") and strategy.informativeness is None:
        raise UserError(f"--acquisition {name} weights by a score, which --query {strategy.name} does not have; "
                        f"use --acquisition softrank or topk")
    if candidates is not None:
        if "embedding" not in entry.needs:
            # an error, not a warning: the number would be recorded and silently change nothing
            raise UserError(f"--candidates {candidates}: only --acquisition coreset picks among candidates; "
                            f"drop it or give --acquisition coreset")
        if candidates < 1:
            raise UserError(f"--candidates {candidates}: give at least 1 (or leave it out: all samples)")
    if coreset_init is not None:
        if "embedding" not in entry.needs:
            raise UserError(f"--coreset_init {coreset_init}: only --acquisition coreset starts from centres; "
                            f"drop it or give --acquisition coreset")
        if coreset_init not in coreset.INITS:
            raise UserError(f"--coreset_init {coreset_init}: unknown; choose one of {', '.join(coreset.INITS)}")


def check_candidates(candidates, count):
    """--candidates must leave `count` samples to pick from."""
    if candidates is not None and candidates < count:
        raise UserError(f"--candidates {candidates} is fewer than the {count} samples to query; give at least "
                        f"{count} (or leave it out: all samples)")


def needs(name):
    return get(name).needs


def uses_beta(name):
    return get(name).uses_beta


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


def _topk(r):
    return r.strategy.select(r.scores, r.tie_keys, r.count, **r.params)


def _draw(name):
    def pick(r):
        weights = log_weights(name, r.strategy, r.scores, r.tie_keys, r.beta, r.params)
        uniform = round_keys(r.tie_keys, r.seed, r.round_name)
        gumbel = -np.log(-np.log(uniform))
        perturbed = weights + gumbel  # -inf for a zero weight: drawn only after every positive one
        # largest first; ties (only among -inf) by the tie key, as the rankings break them
        return np.lexsort((np.asarray(r.tie_keys), -perturbed))[:r.count]
    return pick


def _coreset(r):
    order = r.strategy.rank(r.scores, r.tie_keys, **r.params)
    check_candidates(r.candidates, r.count)
    if r.candidates is not None:
        order = order[:r.candidates]
    return coreset.k_centre(r.scores["embedding"], order, r.count, labelled=r.centres)


register(Acquisition("topk", _topk, "the strategy's first ones (the original behaviour)"))
register(Acquisition("power", _draw("power"), "drawn without replacement with weight informativeness**beta",
                     uses_beta=True))
register(Acquisition("softmax", _draw("softmax"), "drawn with weight exp(beta x informativeness)", uses_beta=True))
register(Acquisition("softrank", _draw("softrank"), "drawn with weight rank**-beta", uses_beta=True))
register(Acquisition("coreset", _coreset, "greedy k-centre over the pool's sequence-feature embeddings, from the "
                     "labelled samples as centres or the strategy's first choice (--coreset_init), among its top "
                     "--candidates", needs=("embedding",)))


def select(name, beta, strategy, scores, tie_keys, count, seed, round_name, candidates=None, centres=None,
           **params):
    """Indices of the `count` samples to query, the first picked first; `centres` are coreset's
    starting centres (the labelled samples' embeddings; None: none); `params` are the strategy's
    (cali's threshold)."""
    return get(name).pick(Request(strategy, scores, tie_keys, count, beta, seed, round_name, candidates, params,
                                  centres))
