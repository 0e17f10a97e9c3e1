"""Query strategies for active learning: a registry from name to a small strategy object that turns
per-sample scores into a ranking (the samples to query first come first).

Scoring (data_sampling.py) computes only the per-sample quantities a strategy `needs`:
    confidence      raw word confidence of the greedy reading (utils.decode_predictions). Attn: the
                    product of the per-step maximum probabilities up to and including the first
                    [s]. CTC: the probability of the collapsed greedy text summed over all its
                    alignments, exp(-CTC loss of that text); not a product of per-frame maxima
    cal_confidence  the same after temperature scaling (token level: of the logits divided by T;
                    word level: confidence ** (1 / T))
    char_confidence per-character confidence: confidence ** (1 / characters of the reading), one
                    character for an empty reading (a word's confidence falls with its length, so
                    the lowest word confidences are mostly the longest words)
    margin          mean over counted tokens of top-1 minus top-2 probability
    entropy         mean over counted tokens of the token entropy
    mc              mutual information (BALD) from stochastic passes
Ties break by a key drawn from (seed, sample identity), so a ranking depends neither on the order
the samples were scored in nor on how many processes scored them."""
import hashlib
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from utils import UserError

QUANTITIES = ("confidence", "cal_confidence", "char_confidence", "margin", "entropy", "mc")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class Strategy:
    """`sort_keys(scores, params)` returns arrays, primary first; ascending order = queried first."""
    name: str
    needs: tuple
    sort_keys: Callable
    score_field: str = ""  # the quantity recorded as the sample's score ("" = the tie key)
    calibrated: bool = False  # True: --temperature defaults to auto
    help: str = ""
    params: dict = field(default_factory=dict)  # parameter name -> default
    # scores -> how useful each sample is, higher = more (power and softmax acquisition weight by
    # it); None where the ranking is not one score (random, cali)
    informativeness: Callable = None

    def rank(self, scores, tie_key, **params):
        """Indices of all samples, the one to query first at position 0."""
        merged = {**self.params, **{k: v for k, v in params.items() if k in self.params}}
        keys = [np.asarray(k, dtype=np.float64) for k in self.sort_keys(scores, merged)]
        # np.lexsort sorts by its last key first.
        return np.lexsort(tuple([np.asarray(tie_key)] + keys[::-1]))

    def select(self, scores, tie_key, count, **params):
        return self.rank(scores, tie_key, **params)[:count]

    def score(self, scores, tie_key):
        """The per-sample number recorded in the query set's metadata."""
        if self.score_field:
            return np.asarray(scores[self.score_field], dtype=np.float64)
        return np.asarray(tie_key, dtype=np.float64) / 2.0 ** 64


def _cali_keys(scores, params):
    # Samples at or above the threshold come first, least confident first; when they run out,
    # those below follow closest-to-the-threshold first, so the hopeless (likely mislabelled or
    # unreadable) samples are the last ones queried.
    conf = np.asarray(scores["cal_confidence"], dtype=np.float64)
    below = conf < params["threshold"]
    return [below, np.where(below, -conf, conf)]


STRATEGIES = {}


def register(strategy):
    STRATEGIES[strategy.name] = strategy
    return strategy


register(Strategy("random", (), lambda s, p: [],
                  help="uniformly at random (keyed by seed and sample identity)"))
register(Strategy("uncali", ("confidence",), lambda s, p: [s["confidence"]], "confidence",
                  help="lowest raw word confidence first (never temperature-scaled)",
                  informativeness=lambda s: 1.0 - np.asarray(s["confidence"], dtype=np.float64)))
register(Strategy("uncali_char", ("char_confidence",), lambda s, p: [s["char_confidence"]], "char_confidence",
                  help="lowest per-character confidence first (uncali without its pull towards long words)",
                  informativeness=lambda s: 1.0 - np.asarray(s["char_confidence"], dtype=np.float64)))
register(Strategy("margin", ("margin",), lambda s, p: [s["margin"]], "margin",
                  help="smallest mean top-1/top-2 probability margin first",
                  informativeness=lambda s: 1.0 - np.asarray(s["margin"], dtype=np.float64)))
register(Strategy("entropy", ("entropy",), lambda s, p: [-np.asarray(s["entropy"], dtype=np.float64)], "entropy",
                  help="highest mean token entropy first",
                  informativeness=lambda s: np.asarray(s["entropy"], dtype=np.float64)))
register(Strategy("bald", ("mc",), lambda s, p: [-np.asarray(s["mc"], dtype=np.float64)], "mc",
                  help="highest mutual information over stochastic (MC-dropout) passes first",
                  informativeness=lambda s: np.clip(np.asarray(s["mc"], dtype=np.float64), 0.0, None)))
register(Strategy("cali", ("cal_confidence",), _cali_keys, "cal_confidence", calibrated=True,
                  params={"threshold": 0.5},
                  help="least calibrated confidence at or above --cali_threshold first, then those just below"))


def get_strategy(name):
    if name not in STRATEGIES:
        raise UserError(f"--query {name}: unknown strategy; choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def _splitmix64(x):
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def mix_keys(keys, salt):
    """uint64 keys mixed with a salt: as random as the keys, and independent of them across salts."""
    with np.errstate(over="ignore"):
        return _splitmix64(np.asarray(keys, dtype=np.uint64) ^ np.uint64(salt))


def text_salt(text):
    """A uint64 drawn from a text (a seed and names), the same on every machine and process."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def identity_keys(identities, seed):
    """A pseudo-random uint64 per `(relpath, index)`, fixed by `seed` and the identity alone."""
    if len(identities) == 0:
        return np.zeros(0, dtype=np.uint64)
    relpaths, indices = zip(*identities)
    names, inverse = np.unique(np.asarray(relpaths, dtype=str), return_inverse=True)
    bases = np.array([text_salt(f"{seed}\t{name}") for name in names], dtype=np.uint64)
    with np.errstate(over="ignore"):
        mixed = bases[inverse.reshape(-1)] ^ (np.asarray(indices, dtype=np.uint64) * _GOLDEN)
    return _splitmix64(mixed)


def leaf_keys(relpath, indices, seed):
    """`identity_keys` of the samples `indices` of the one LMDB `relpath`, vectorised (a pool of
    millions would otherwise cost a tuple per sample)."""
    with np.errstate(over="ignore"):
        mixed = np.uint64(text_salt(f"{seed}\t{relpath}")) ^ (np.asarray(indices, dtype=np.uint64) * _GOLDEN)
    return _splitmix64(mixed)


def query_count(pool_size, ratio=None, num_query=None):
    """How many samples to query: `num_query` when given (at most the pool), else
    floor(pool_size * ratio) (as the original's int(); a tiny tolerance absorbs float error)."""
    if num_query is not None:
        if num_query < 1:
            raise UserError(f"--num_query {num_query}: must be at least 1")
        return min(num_query, pool_size)
    if not 0.0 < ratio <= 1.0:
        raise UserError(f"--ratio {ratio}: must lie in (0, 1]")
    count = math.floor(pool_size * ratio + 1e-9)
    if count < 1:
        raise UserError(f"--ratio {ratio} of a pool of {pool_size} samples picks nothing; "
                        f"raise --ratio to at least {1.0 / pool_size:.3g} or give --num_query")
    return count


def next_round_selection(select_data, batch_ratio, query_names, new_name):
    """`--select_data` names and `--batch_ratio` shares for the next `train.py --mode al`.

    `query_names` lists every query set already under --train_data (their samples have left the
    pool, so the next round trains on all of them, whether --select_data named them or not).
    The original's rule: the base (non-query) names of --select_data share half of every batch in
    the proportions they had; the other half is split equally among all query sets, the new one
    last. With no base name the query sets share the whole batch."""
    known = list(dict.fromkeys([*query_names, new_name]))
    base = [(n, r) for n, r in zip(select_data, batch_ratio) if n not in known]
    named = [n for n in select_data if n in known]
    queries = list(dict.fromkeys(named + [n for n in known if n != new_name] + [new_name]))
    base_total = sum(r for _, r in base)
    query_share = (0.5 if base else 1.0) / len(queries)
    names = [n for n, _ in base] + queries
    shares = [0.5 * r / base_total for _, r in base] + [query_share] * len(queries)
    return names, shares


def format_selection(names, shares):
    """The command-line strings: ('CVPR2016-NIPS2014-random_iter_1', '0.25-0.25-0.5')."""
    return "-".join(names), "-".join(f"{s:.6g}" for s in shares)
