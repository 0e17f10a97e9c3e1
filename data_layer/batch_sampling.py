"""How training draws batches: the epoch batch sampler (exact resume), this rank's shard, seeds mixed
per stream, and the DataLoader workers' set-up."""
import ctypes
import signal

import numpy as np
import torch
from torch.utils.data import Subset

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def loader_worker_init(worker_id):
    """DataLoader worker set-up: serve allocations above 128 KiB (collated batches and their pickled
    copies) by mmap, so they go back to the OS when freed. With glibc's adaptive threshold a worker's
    heap grew by about 6 KB per image read (tools/benchmark.py: +234 MB from a 2k to a 32k pool)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


# A dataset smaller than its batch share is drawn with replacement; an "epoch" of it is this many
# batches, so that its loader (and the prefetching of its workers) is not restarted every batch.
REPLACEMENT_EPOCH_BATCHES = 100


def stream_seed(*parts):
    """A 64-bit seed mixed from integers (seed, rank, dataset position, epoch)."""
    words = np.random.SeedSequence([int(p) % 2 ** 64 for p in parts]).generate_state(2, dtype=np.uint32)
    return int(words[0]) | int(words[1]) << 32


def first_readable(data):
    """Position of the first item of `data` whose image decodes, or None when none does (items
    are read in order until one does, so a readable dataset costs one decode)."""
    for i in range(len(data)):
        if data[i][0] is not None:
            return i
    return None


def train_worker_init(worker_id):
    """Training loader workers ignore SIGINT: Ctrl-C in a terminal reaches the whole process group,
    and train.py stops only after finishing the current step, for which its workers must live on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    loader_worker_init(worker_id)


class EpochBatchSampler:
    """The full batches of one shard, one epoch at a time, from batch `start` of epoch `epoch` on.

    An epoch's order depends on `seed_parts` and the epoch number alone, so the stream can be
    rebuilt at any batch without drawing, or reading, the batches before it (exact resume)."""

    def __init__(self, size, batch_size, replacement, seed_parts):
        self.size = size
        self.batch_size = batch_size
        self.replacement = replacement
        self.seed_parts = tuple(int(p) for p in seed_parts)
        self.epoch = 0
        self.start = 0

    @property
    def batches_per_epoch(self):
        return REPLACEMENT_EPOCH_BATCHES if self.replacement else self.size // self.batch_size

    def order(self, epoch):
        generator = torch.Generator().manual_seed(stream_seed(*self.seed_parts, epoch))
        if self.replacement:
            return torch.randint(self.size, (self.batches_per_epoch * self.batch_size,), generator=generator)
        return torch.randperm(self.size, generator=generator)

    def __iter__(self):
        order = self.order(self.epoch)
        for k in range(self.start, self.batches_per_epoch):
            yield order[k * self.batch_size:(k + 1) * self.batch_size].tolist()

    def __len__(self):
        return max(self.batches_per_epoch - self.start, 0)


def shard_dataset(dataset, rank, world_size, seed):
    """This rank's disjoint share: a permutation shared by all ranks (same seed), every world_size-th."""
    if world_size <= 1:
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(int(seed)))
    return Subset(dataset, order[rank::world_size].tolist())
