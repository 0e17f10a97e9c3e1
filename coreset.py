"""Diverse batches: an embedding of every pool sample, taken during the scoring pass, and greedy
k-centre selection over it (farthest-first traversal; Sener and Savarese, "Active Learning for
Convolutional Neural Networks: A Core-Set Approach", ICLR 2018).

Embedding: the mean over time of the sequence-modelling stage's output, the features the
prediction stage reads (BiLSTM: its last projection, d = --hidden_size; --SequenceModeling None:
the visual features averaged over the height, d = the extractor's output channels). A forward
hook takes it from the scoring pass itself, so no second pass runs. It is kept as float16 (finite:
NaN becomes 0, magnitudes beyond float16's range are clipped to it), in one array of the shard's
size allocated once: n x d x 2 bytes, nothing per batch that outlives the batch.

Selection: the first centre is the strategy's first choice; then, again and again, the candidate
farthest (squared Euclidean distance) from its nearest centre, ties to the one the strategy ranks
first. So the batch depends on the embeddings and the strategy's ranking alone, not on the order
or the number of processes that scored the pool. Distances are float32, |x|^2 - 2 x.c + |c|^2,
computed CHUNK rows at a time: besides the embeddings, memory holds two float32 numbers per
candidate and one chunk, never an n x n matrix; time grows as picks x candidates x d. The
already-labelled samples do not serve as centres (that would need an embedding pass over the
labelled set too): the first centre is the top-scoring pick."""
import contextlib

import numpy as np
import torch

from model import unwrap

CHUNK = 1024  # rows per distance block: 1024 x d float32, a few hundred KB for d = 256
FLOAT16_MAX = float(np.finfo(np.float16).max)


def to_float16(features):
    """(B, d) float16 numpy of a float tensor, finite (see the module docstring)."""
    features = torch.nan_to_num(features.detach().float(), nan=0.0, posinf=FLOAT16_MAX, neginf=-FLOAT16_MAX)
    return features.clamp(-FLOAT16_MAX, FLOAT16_MAX).half().cpu().numpy()


@contextlib.contextmanager
def capture_embeddings(model, enabled=True):
    """While the block runs, every forward pass of `model` appends the (B, d) float16 embedding of
    its batch to the yielded list (None when not `enabled`: no hook at all)."""
    if not enabled:
        yield None
        return
    found = []

    def hook(module, inputs, output):
        found.append(to_float16(output.mean(dim=1)))  # (B, T, d) -> mean over time

    handle = unwrap(model).SequenceModeling.register_forward_hook(hook)
    try:
        yield found
    finally:
        handle.remove()


class RowStore:
    """Rows of one width, added a batch at a time into one array allocated for `capacity` rows
    (pages never written are never resident); past the capacity it doubles."""

    def __init__(self, capacity=0):
        self.capacity, self.data, self.size = capacity, None, 0

    def add(self, rows):
        rows = np.asarray(rows)
        if self.data is None:
            self.data = np.empty((max(self.capacity, len(rows)), rows.shape[1]), dtype=rows.dtype)
        end = self.size + len(rows)
        if end > len(self.data):
            grown = np.empty((max(2 * len(self.data), end), self.data.shape[1]), dtype=self.data.dtype)
            grown[:self.size] = self.data[:self.size]
            self.data = grown
        self.data[self.size:end] = rows
        self.size = end

    def array(self):
        """The rows added so far: a view of the store, not a copy."""
        return np.zeros((0, 0), dtype=np.float16) if self.data is None else self.data[:self.size]


def _squared_norms(points, chunk):
    norms = torch.empty(len(points), dtype=torch.float32)
    for start in range(0, len(points), chunk):
        block = points[start:start + chunk].float()
        norms[start:start + chunk] = (block * block).sum(1)
    return norms


def k_centre(embeddings, order, count, chunk=CHUNK):
    """Indices (into the rows of the (n, d) `embeddings`) of `count` samples picked by greedy
    k-centre among the candidates `order` (row indices, the strategy's first choice first), in
    the order picked. See the module docstring for the rule, its ties and its cost."""
    order = np.asarray(order, dtype=np.int64)
    if not 0 <= count <= len(order):
        raise ValueError(f"cannot pick {count} of {len(order)} candidates")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    # Candidates in row order, each with its position in the strategy's ranking (for ties); all
    # of them: the embeddings as they are, no copy; fewer: a float16 copy of theirs.
    by_row = np.argsort(order, kind="stable")
    rows = order[by_row]
    whole = len(rows) == len(embeddings) and np.array_equal(rows, np.arange(len(rows)))
    points = torch.from_numpy(np.ascontiguousarray(embeddings if whole else embeddings[rows]))
    position = torch.from_numpy(by_row)
    norms = _squared_norms(points, chunk)
    nearest = torch.full((len(rows),), float("inf"), dtype=torch.float32)
    last = len(position)  # larger than every position: never the tie-break winner
    centre = int(torch.argmin(position))
    picks = [centre]
    for _ in range(count - 1):
        c = points[centre].float()
        for start in range(0, len(rows), chunk):
            end = start + chunk
            distance = torch.mv(points[start:end].float(), c).mul_(-2.0).add_(norms[start:end]).add_(norms[centre])
            torch.minimum(nearest[start:end], distance.clamp_(min=0.0), out=nearest[start:end])
        nearest[centre] = -1.0  # taken: below every distance, never picked again
        farthest = nearest == nearest.max()
        centre = int(torch.argmin(torch.where(farthest, position, last)))
        picks.append(centre)
    return rows[np.asarray(picks, dtype=np.int64)]
