"""Diverse batches: an embedding of every pool sample, taken during the scoring pass, and greedy
k-centre selection over it (farthest-first traversal; Sener and Savarese, "Active Learning for
Convolutional Neural Networks: A Core-Set Approach", ICLR 2018).

Embedding: the mean over time of the sequence-modelling stage's output, the features the
prediction stage reads (BiLSTM: its last projection, d = --hidden_size; --SequenceModeling None:
the visual features averaged over the height, d = the extractor's output channels). A forward
hook takes it from the scoring pass itself, so no second pass runs. It is kept as float16 (finite:
NaN becomes 0, magnitudes beyond float16's range are clipped to it), in one array of the shard's
size allocated once: n x d x 2 bytes, nothing per batch that outlives the batch.

Selection (Sener and Savarese's greedy): the centres start as the already-labelled samples'
embeddings when given (`data_sampling.py --coreset_init labelled`, the default: the labelled set
the next round trains on, embedded by the same model and hook as the pool), else as none
(`--coreset_init top`: the first pick is the strategy's first choice, whatever is labelled).
Then, again and again, the candidate farthest (squared Euclidean distance) from its nearest
centre is picked and becomes a centre, ties to the one the strategy ranks first (with no centre
every distance is infinite, so the strategy's first choice comes first). So the batch depends on
the embeddings and the strategy's ranking alone, not on the order or the number of processes that
scored the pool. Distances are float32, |x|^2 - 2 x.c + |c|^2, computed in blocks of CHUNK rows:
besides the embeddings, memory holds two float32 numbers per candidate and one block (CHUNK x
CHUNK against the labelled centres), never an n x n or n x m matrix; time grows as
(labelled + picks) x candidates x d."""
import contextlib

import numpy as np
import torch

from model import unwrap

CHUNK = 1024  # rows per distance block: 1024 x d float32, a few hundred KB for d = 256
INITS = ("labelled", "top")  # --coreset_init: the starting centres (see the module docstring)
DEFAULT_INIT = "labelled"
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


def embed_loader(model, loader, forward, capacity=0):
    """`((n, d) float16 embeddings, [identity])` of every sample of `loader` (batches of (images,
    labels, identities), an empty batch skipped), taken as the scoring pass takes the pool's:
    `forward(images)` runs the model on a batch while `capture_embeddings` holds."""
    store, identities = RowStore(capacity), []
    with torch.no_grad(), capture_embeddings(model) as found:
        for images, labels, batch_identities in loader:
            if len(labels) == 0:
                continue
            forward(images)
            store.add(np.concatenate(found))
            found.clear()
            identities.extend(batch_identities)
    return store.array(), identities


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


def nearest_distances(points, norms, centres, chunk=CHUNK):
    """(n,) float32 squared distance of each of the (n, d) `points` (with their squared `norms`) to
    its nearest row of the (m, d) `centres`; inf where m = 0. Blocks of chunk x chunk distances at
    a time."""
    nearest = torch.full((len(points),), float("inf"), dtype=torch.float32)
    if centres is None or len(centres) == 0:
        return nearest
    centres = torch.from_numpy(np.ascontiguousarray(centres))
    centre_norms = _squared_norms(centres, chunk)
    for first in range(0, len(centres), chunk):
        block = centres[first:first + chunk].float()
        block_norms = centre_norms[first:first + chunk]
        for start in range(0, len(points), chunk):
            end = start + chunk
            distance = torch.mm(points[start:end].float(), block.t()).mul_(-2.0)
            distance.add_(norms[start:end].unsqueeze(1)).add_(block_norms.unsqueeze(0)).clamp_(min=0.0)
            torch.minimum(nearest[start:end], distance.min(1).values, out=nearest[start:end])
    return nearest


def k_centre(embeddings, order, count, chunk=CHUNK, labelled=None):
    """Indices (into the rows of the (n, d) `embeddings`) of `count` samples picked by greedy
    k-centre among the candidates `order` (row indices, the strategy's first choice first), in
    the order picked; the (m, d) `labelled` embeddings (None: none) are the starting centres.
    See the module docstring for the rule, its ties and its cost."""
    order = np.asarray(order, dtype=np.int64)
    if not 0 <= count <= len(order):
        raise ValueError(f"cannot pick {count} of {len(order)} candidates")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    if labelled is not None and len(labelled) and np.shape(labelled)[1] != np.shape(embeddings)[1]:
        raise ValueError(f"labelled embeddings of width {np.shape(labelled)[1]} against the pool's "
                         f"{np.shape(embeddings)[1]}")
    # Candidates in row order, each with its position in the strategy's ranking (for ties); all
    # of them: the embeddings as they are, no copy; fewer: a float16 copy of theirs.
    by_row = np.argsort(order, kind="stable")
    rows = order[by_row]
    whole = len(rows) == len(embeddings) and np.array_equal(rows, np.arange(len(rows)))
    points = torch.from_numpy(np.ascontiguousarray(embeddings if whole else embeddings[rows]))
    position = torch.from_numpy(by_row)
    norms = _squared_norms(points, chunk)
    nearest = nearest_distances(points, norms, labelled, chunk)
    last = len(position)  # larger than every position: never the tie-break winner
    picks = []
    while True:
        farthest = nearest == nearest.max()
        centre = int(torch.argmin(torch.where(farthest, position, last)))
        picks.append(centre)
        nearest[centre] = -1.0  # taken: below every distance, never picked again
        if len(picks) == count:
            return rows[np.asarray(picks, dtype=np.int64)]
        c = points[centre].float()
        for start in range(0, len(rows), chunk):
            end = start + chunk
            distance = torch.mv(points[start:end].float(), c).mul_(-2.0).add_(norms[start:end]).add_(norms[centre])
            torch.minimum(nearest[start:end], distance.clamp_(min=0.0), out=nearest[start:end])
