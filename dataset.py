"""LMDB datasets in the deep-text-recognition-benchmark format, as the original's users know them:
LmdbDataset (one leaf, its label rules, noise and re-annotations), hierarchical_dataset (the
selected leaves as one dataset), Batch_Balanced_Dataset, AlignCollate and RawDataset. The layers
below live in data_layer/ (docs/DESIGN.md, "Code layout" and "Data layer")."""
import bisect
import collections.abc
import io
import math
import os
import stat

import numpy as np
import torch
from natsort import natsorted
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from active_learning import relabel_policies
from annotators import annotator_noise
from data_layer import batch_sampling
from data_layer import leaf_selection
from data_layer import lmdb_format
from data_layer import set_records
from utils import UserError

NOISE_SCOPES = ("queried", "all")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def eight_bit(img):
    """`img` with 8-bit samples. Pillow's convert() clips a 16-bit grayscale image (mode I;16, or I
    for PNG, whose grayscale is at most 16 bits) to 255, making it all white, so it is scaled by its
    bit depth instead. Other integer or float single-channel images (mode I or F from TIFF and the
    like) have no known range: ValueError, so that they are counted as unreadable."""
    if img.mode in SIXTEEN_BIT_MODES or (img.mode == "I" and img.format == "PNG"):
        return Image.fromarray((np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8))
    if img.mode in ("I", "F") or img.mode.startswith("I;"):
        raise ValueError(f"unsupported pixel format (mode {img.mode}, value range unknown)")
    return img


def decode_image(buf, rgb):
    """PIL image in RGB or L mode, or None when the bytes are not a readable image."""
    try:
        with Image.open(io.BytesIO(buf)) as img:
            img.load()
            return eight_bit(img).convert("RGB" if rgb else "L")
    except Exception:  # Pillow raises many types for bad bytes (OSError, SyntaxError, ValueError...)
        return None


def read_image_file(path):
    """`(bytes, None)` for a regular file, else `(None, reason)`. A FIFO, socket or device named
    like an image is never read (reading a FIFO blocks until someone writes to it): it is opened
    without blocking and refused by its type, in one step, so a swap between a check and the open
    cannot hang the reader either."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        return None, f"unreadable file ({err.strerror or type(err).__name__})"
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a folder"
                    if stat.S_ISDIR(mode) else "special")
            return None, f"not a regular file ({kind})"
        try:
            return f.read(), None
        except OSError as err:
            return None, f"unreadable file ({err.strerror or type(err).__name__})"


def lowercases_labels(opt):
    """Whether labels are lower-cased before filtering and training.

    The original lower-cases whenever --sensitive is off. A charset that itself holds upper-case
    letters (typically from --character_file) asks for case-sensitive labels, so lower-casing
    would make those letters unreachable: only a caseless or all-lower-case charset lower-cases."""
    if getattr(opt, "sensitive", False):
        return False
    return not any(ch != ch.lower() for ch in opt.character)


class LabelRules:
    """Label normalisation and filtering derived from the options."""

    def __init__(self, opt):
        self.lower = lowercases_labels(opt)
        self.charset = frozenset(opt.character)
        self.max_length = opt.batch_max_length
        self.filtering = not getattr(opt, "data_filtering_off", False)

    def normalise(self, label):
        return label.lower() if self.lower else label

    def reject_reason(self, label):
        """None when the (normalised) label is kept, else a short reason."""
        if not label:
            return "empty"
        if len(label) > self.max_length:
            return "too long"
        if not self.charset.issuperset(label):
            return "out of charset"
        return None

    def clean(self, label):
        """Drop characters the model cannot emit (only matters with --data_filtering_off)."""
        if self.charset.issuperset(label):
            return label
        return "".join(ch for ch in label if ch in self.charset)


class LmdbDataset(Dataset):
    """One leaf LMDB. Items are `(image, label, identity)`; `image` is None when it does not decode.

    `relpath` is the leaf's path relative to the root given by the user (identity's first part).
    `noise_ratio` > 0 corrupts that share of the labels once, here (annotator_noise, with the
    noise model `noise_model`), so that a sample keeps the same wrong label every epoch."""

    def __init__(self, root, opt, relpath=".", noise_ratio=0.0, noise_seed=None,
                 noise_model=annotator_noise.DEFAULT_MODEL):
        self.root = os.fspath(root)
        self.relpath = relpath
        self.rgb = bool(getattr(opt, "rgb", False))
        self.rules = LabelRules(opt)
        self.charset = opt.character
        self.noisy_labels = {}  # LMDB index -> wrong label
        self.noise_kinds = {}  # LMDB index -> kind of error (annotator_noise)
        self.relabelled = {}  # LMDB index -> the clean label of a relabel set that replaced this one's
        self.confirmed = set()  # LMDB indices a re-annotation agreed with (--relabel_policy agree)
        self.dropped = set()  # LMDB indices left out: their re-annotation disagreed (agree)
        self.num_corrupted = 0
        self.num_undecodable = 0  # counted in this process only; loaders count skips per batch
        self.filter_counts = collections.Counter()
        self._env = None
        self._env_pid = None
        with lmdb_format.shared_env(self.root).begin(write=False) as txn:
            self.num_total = lmdb_format.read_num_samples(txn, self.root)
            self.is_query = txn.get(lmdb_format.QUERY_META_KEY) is not None
            self.is_unlabelled = txn.get(lmdb_format.UNLABELLED_KEY) is not None
            self.is_relabel = txn.get(lmdb_format.RELABEL_META_KEY) is not None
            self.indices = self._filtered_indices(txn)
        if noise_ratio:
            self.add_noise(noise_ratio, getattr(opt, "manualSeed", 0) if noise_seed is None else noise_seed,
                           noise_model)

    def _filtered_indices(self, txn):
        if not self.rules.filtering or self.is_unlabelled:  # empty labels: every image is pool
            return np.arange(1, self.num_total + 1, dtype=np.int64)
        kept = np.zeros(self.num_total + 1, dtype=bool)
        seen = 0
        for index, label in lmdb_format.iter_labels(txn, self.num_total):
            seen += 1
            reason = self.rules.reject_reason(self.rules.normalise(label))
            if reason is None:
                kept[index] = True
            else:
                self.filter_counts[reason] += 1
        if seen < self.num_total:
            self.filter_counts["missing label"] += self.num_total - seen
        return np.flatnonzero(kept).astype(np.int64)

    @property
    def num_filtered(self):
        return sum(self.filter_counts.values())

    def restrict(self, start, stop):
        """Keep only filtered positions [start, stop) (the labelled/unlabelled split)."""
        self.indices = self.indices[start:stop]

    def exclude(self, indices):
        """Drop the given 1-based LMDB indices; returns how many were present."""
        if not len(indices):
            return 0
        drop = np.isin(self.indices, np.fromiter(indices, dtype=np.int64))
        self.indices = self.indices[~drop]
        return int(drop.sum())

    def add_noise(self, noise_ratio, seed, model=annotator_noise.DEFAULT_MODEL):
        """Corrupt exactly round(noise_ratio x n) of the n current labels with the noise model
        `model` (annotator_noise) and count them; the samples are given in index order (the order
        `mixed` takes its neighbouring words from).

        Query sets key the noise by each sample's origin, so a sample gets the same annotator
        error whichever set it is read from."""
        wanted = np.zeros(self.num_total + 1, dtype=bool)
        wanted[self.indices] = True
        samples, index_of = [], {}
        with lmdb_format.shared_env(self.root).begin(write=False) as txn:
            for index, raw in lmdb_format.iter_labels(txn, self.num_total):
                if not wanted[index]:
                    continue
                identity = (lmdb_format.read_origin(txn, index, self.root) if self.is_query or self.is_relabel else None) \
                    or (self.relpath, index)
                index_of[identity] = index
                samples.append((identity, self.rules.clean(self.rules.normalise(raw))))
        # a wrong label must still fit the model's decoder
        max_length = self.rules.max_length if self.rules.filtering else None
        wrong = annotator_noise.noisy_labels(samples, noise_ratio, self.charset, seed, max_length, model=model)
        self.noisy_labels = {index_of[identity]: wrong[identity].label for identity in wrong}
        self.noise_kinds = {index_of[identity]: wrong[identity].kind for identity in wrong}
        self.num_corrupted = len(self.noisy_labels)

    def apply_relabels(self, relabels):
        """Apply the re-annotations `relabels` (`read_relabels`) of this leaf's samples, each
        sample's in round order, by each relabel set's policy (relabel_policies), comparing the
        re-annotation's answer (the relabel set's clean label, or its own simulated error) with the
        label the sample trains on then. `replace` trains on the answer, whose error replaces the
        first annotation's (so noise_records stay the truth of what is trained on); `agree` keeps
        an equal label and drops the sample when they differ: it leaves `indices`, its noise
        records and its relabelled label, and no later re-annotation brings it back."""
        if not relabels:
            return
        with lmdb_format.shared_env(self.root).begin(write=False) as txn:
            if self.is_query:
                hits = {}
                for index in self.indices.tolist():
                    origin = lmdb_format.read_origin(txn, index, self.root)
                    if origin in relabels:
                        hits[index] = relabels[origin]
            else:
                present = set(self.indices.tolist())
                hits = {index: relabels[(rel, index)] for rel, index in relabels
                        if rel == self.relpath and index in present}
            raw = {index: txn.get(lmdb_format.label_key(index)) for index in hits}
        for index, entries in hits.items():
            for entry in entries:
                if entry.clean_label is None:  # the annotator found the image unreadable: no label to trust
                    decision = relabel_policies.DROP
                else:
                    answer = entry.clean_label if entry.noisy_label is None else entry.noisy_label
                    decision = relabel_policies.decide(entry.policy, self._trained_label(index, raw[index]), answer)
                if decision == relabel_policies.KEEP:
                    self.confirmed.add(index)
                    continue
                self.noisy_labels.pop(index, None)
                self.noise_kinds.pop(index, None)
                if decision == relabel_policies.DROP:
                    self.relabelled.pop(index, None)
                    self.confirmed.discard(index)
                    self.dropped.add(index)
                    break
                self.relabelled[index] = entry.clean_label
                if entry.noisy_label is not None:
                    self.noisy_labels[index] = entry.noisy_label
                    self.noise_kinds[index] = entry.kind
        if self.dropped:
            self.indices = self.indices[~np.isin(self.indices, np.fromiter(self.dropped, dtype=np.int64))]
        self.num_corrupted = len(self.noisy_labels)

    def _trained_label(self, index, raw_label):
        """The label training reads for LMDB `index` (stored label `raw_label`, bytes or None): the
        simulated error, else a relabel set's label, else the stored one normalised."""
        if index in self.noisy_labels:
            return self.noisy_labels[index]
        if index in self.relabelled:
            return self.relabelled[index]
        return self.rules.clean(self.rules.normalise((raw_label or b"").decode("utf-8", errors="replace")))

    def noise_records(self):
        """One dict per corrupted label, in index order: `relpath, index` (the sample here),
        `origin_relpath, origin_index` (a query set's record of where it came from; None
        elsewhere), `clean_label` (as read, normalised; a relabel set's for a re-annotated
        sample), `noisy_label`, `kind`."""
        records = []
        with lmdb_format.shared_env(self.root).begin(write=False) as txn:
            for index in sorted(self.noisy_labels):
                raw = (txn.get(lmdb_format.label_key(index)) or b"").decode("utf-8", errors="replace")
                origin = lmdb_format.read_origin(txn, index, self.root) if self.is_query else None
                clean = self.relabelled.get(index)
                records.append({"relpath": self.relpath, "index": index,
                                "origin_relpath": origin[0] if origin else None,
                                "origin_index": origin[1] if origin else None,
                                "clean_label": self.rules.clean(self.rules.normalise(raw)) if clean is None else clean,
                                "noisy_label": self.noisy_labels[index], "kind": self.noise_kinds[index]})
        return records

    @property
    def identities(self):
        return IdentityView([self])

    def __len__(self):
        return len(self.indices)

    def _txn(self):
        # Looked up on first use in each process (each DataLoader worker), then kept.
        if self._env is None or self._env_pid != os.getpid():
            self._env = lmdb_format.shared_env(self.root)
            self._env_pid = os.getpid()
        return self._env.begin(write=False)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_env"] = None
        state["_env_pid"] = None
        return state

    def __getitem__(self, i):
        index = int(self.indices[i])
        with self._txn() as txn:
            raw_label = txn.get(lmdb_format.label_key(index))
            buf = txn.get(lmdb_format.image_key(index))
        label = self._trained_label(index, raw_label)
        image = decode_image(buf, self.rgb) if buf is not None else None
        if image is None:
            self.num_undecodable += 1
        return image, label, (self.relpath, index)


class IdentityView(collections.abc.Sequence):
    """Read-only list of `(relpath, index)` over datasets, built on demand (millions of samples
    would otherwise cost a tuple each)."""

    def __init__(self, parts):
        self.parts = [p for p in parts if len(p)]
        self.ends = np.cumsum([len(p) for p in self.parts]).tolist()

    def __len__(self):
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = bisect.bisect_right(self.ends, i)
        part = self.parts[k]
        local = i - (self.ends[k - 1] if k else 0)
        return (part.relpath, int(part.indices[local]))

    def __iter__(self):
        for part in self.parts:
            for index in part.indices.tolist():
                yield (part.relpath, index)


class SelectedDataset(Dataset):
    """Concatenation of leaf LmdbDatasets in natural order of their relative paths."""

    def __init__(self, leaves):
        self.leaves = list(leaves)
        self.refresh()

    def refresh(self):
        self.parts = [leaf for leaf in self.leaves if len(leaf)]
        self.ends = np.cumsum([len(p) for p in self.parts]).tolist()

    def __len__(self):
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, i):
        if i < 0:
            i += len(self)
        k = bisect.bisect_right(self.ends, i)
        return self.parts[k][i - (self.ends[k - 1] if k else 0)]

    @property
    def identities(self):
        return IdentityView(self.parts)

    @property
    def num_corrupted(self):
        return sum(leaf.num_corrupted for leaf in self.leaves)

    @property
    def num_filtered(self):
        return sum(leaf.num_filtered for leaf in self.leaves)

    @property
    def num_dropped(self):
        return sum(len(leaf.dropped) for leaf in self.leaves)


def hierarchical_dataset(root, opt, select_data="/", split=None, exclude=None, noise_ratio=0.0,
                         noise_scope="queried", flag=None, noise_model=annotator_noise.DEFAULT_MODEL, relabels=None):
    """Every selected leaf LMDB below root as one dataset; returns `(dataset, log_text)`.

    The labelled/unlabelled boundary is taken on the filtered samples before `exclude`, so it
    stays put when queried samples are later excluded from the pool. Relabel sets are never
    samples: they are left out here, and `relabels` (`read_relabels`) is applied after the noise
    (LmdbDataset.apply_relabels): new labels, or samples dropped by a disagreeing `agree`
    re-annotation, which leave the labelled part without moving the boundary (so never to the pool)."""
    if split not in (None, "labelled", "unlabelled"):
        raise ValueError(f"split must be None, 'labelled' or 'unlabelled', not {split!r}")
    check_noise(noise_ratio, noise_scope, noise_model)
    relpaths = leaf_selection.select_leaves(root, select_data, flag)
    if split != "unlabelled":
        leaf_selection.refuse_unlabelled(root, relpaths, flag)
    leaves = [LmdbDataset(os.path.join(root, rel), opt, relpath=rel) for rel in relpaths]
    leaves = [leaf for leaf in leaves if not leaf.is_relabel]

    ratio = float(getattr(opt, "total_data_usage_ratio", 1.0))
    # an unlabelled LMDB is pool whole: --total_data_usage_ratio labels nothing of it
    pool = [leaf for leaf in leaves if not leaf.is_query and not leaf.is_unlabelled]
    total = sum(len(leaf) for leaf in pool)
    boundary = int(total * ratio)
    labelled_count = {}
    offset = 0
    for leaf in pool:
        start = min(max(boundary - offset, 0), len(leaf))
        labelled_count[leaf.relpath] = start
        offset += len(leaf)
        if split == "labelled":
            leaf.restrict(0, start)
        elif split == "unlabelled":
            leaf.restrict(start, len(leaf))
    if split == "unlabelled":
        leaves = [leaf for leaf in leaves if not leaf.is_query]

    excluded = collections.Counter()
    if exclude:
        for rel, indices in leaf_selection.group_by_relpath(exclude).items():
            for leaf in leaves:
                if leaf.relpath == rel:
                    excluded[rel] += leaf.exclude(indices)

    for leaf in leaves:
        if noise_ratio and (noise_scope == "all" or leaf.is_query):
            leaf.add_noise(noise_ratio, getattr(opt, "manualSeed", 0), noise_model)
    for leaf in leaves:
        leaf.apply_relabels(relabels)

    dataset = SelectedDataset(leaves)
    lines = []
    for leaf in leaves:
        lines.append(describe_leaf(leaf, split, labelled_count.get(leaf.relpath), excluded[leaf.relpath]))
    return dataset, "\n".join(lines) + "\n"


def describe_leaf(leaf, split, labelled, excluded):
    text = f"sub-directory:\t/{leaf.relpath}\t num samples: {len(leaf)}"
    details = [f"of {leaf.num_total} in the LMDB"]
    if leaf.num_filtered:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(leaf.filter_counts.items()))
        details.append(f"filtered out {leaf.num_filtered} ({reasons})")
    if leaf.is_query:
        details.append("query set, used in full")
    elif leaf.is_unlabelled:
        details.append("unlabelled LMDB, all of it pool")
    elif split is not None:
        kept = leaf.num_total - leaf.num_filtered
        details.append(f"labelled {labelled}, unlabelled {kept - labelled}")
    if excluded:
        details.append(f"excluded {excluded} already queried")
    if leaf.relabelled or leaf.confirmed:
        details.append(f"re-annotated labels {len(leaf.confirmed.union(leaf.relabelled))}")
    if leaf.dropped:
        details.append(f"dropped {len(leaf.dropped)} whose re-annotation disagreed (--relabel_policy agree)")
    if leaf.num_corrupted:
        details.append(f"corrupted labels {leaf.num_corrupted}")
    return f"{text} ({'; '.join(details)})"


def read_relabels(root, opt, relpaths, noise_ratio=0.0, noise_model=annotator_noise.DEFAULT_MODEL):
    """{identity: [RelabelEntry, ...]} of the relabel sets `relpaths` below root: each sample's
    re-annotations in the order they apply (relabel_order; LmdbDataset.apply_relabels applies them
    by each set's policy).

    A relabel set's labels are the annotator's answers (in simulation the clean labels); with
    `noise_ratio` > 0 the simulated annotator errs again on exactly that share of each set, from
    `relabel_noise_seed` of the set's round, with the same noise model, whatever --noise_scope
    (a re-annotation is always an annotation of the loop). Labels the filters reject are dropped
    (the earlier label stays). The origins a relabel set records as unreadable (a human answer
    left empty or ###, import_annotations.py) take their samples out of training."""
    seed = getattr(opt, "manualSeed", 0)
    relabels = {}
    for rel in set_records.relabel_order(root, relpaths):
        leaf = LmdbDataset(os.path.join(root, rel), opt, relpath=rel)
        meta = set_records.read_relabel_meta(leaf.root)
        policy = set_records.relabel_policy(leaf.root, meta)
        if noise_ratio:
            round_number = (meta or {}).get("round", rel)
            leaf.add_noise(noise_ratio, set_records.relabel_noise_seed(seed, round_number), noise_model)
        with lmdb_format.shared_env(leaf.root).begin(write=False) as txn:
            for index in leaf.indices.tolist():
                origin = lmdb_format.read_origin(txn, index, leaf.root)
                if origin is None:
                    raise UserError(f"{leaf.root}: relabel set sample {index} has no origin key; rebuild it with "
                                    f"data_sampling.py")
                raw = (txn.get(lmdb_format.label_key(index)) or b"").decode("utf-8", errors="replace")
                relabels.setdefault(origin, []).append(
                    set_records.RelabelEntry(leaf.rules.clean(leaf.rules.normalise(raw)), leaf.noisy_labels.get(index),
                                             leaf.noise_kinds.get(index), rel, index, policy))
            for origin in set_records.read_unreadable_origins(txn, leaf.root):  # import_annotations.py: answered empty or ###
                relabels.setdefault(origin, []).append(set_records.RelabelEntry(None, None, None, rel, None, policy))
    return relabels


def labelled_dataset(root, opt, select_data, noise_ratio=0.0, noise_scope="queried",
                     noise_model=annotator_noise.DEFAULT_MODEL, flag="--train_data", required=True):
    """`(data, log)`: every labelled sample of `select_data`, with the labels `train.py --mode al`
    trains on (Batch_Balanced_Dataset): per name, `hierarchical_dataset(split="labelled")` with the
    selected query sets' origins excluded, the noise applied and the selected relabel sets applied
    over it (new labels; an `agree` set's disagreeing samples left out). A sample that two names
    select is kept once (the first name's). Items are `(image, label, identity)`; UserError when
    there is none (with `required`; else an empty list)."""
    queried = leaf_selection.selected_query_origins(root, select_data, flag)
    selected = natsorted({rel for name in select_data for rel in leaf_selection.select_leaves(root, [name], flag)})
    relabels = read_relabels(root, opt, set_records.relabel_leaves(root, selected), noise_ratio, noise_model)
    parts, logs, earlier = [], [], []  # earlier: (relpaths, identities) of the parts kept so far
    for name in select_data:
        data, log = hierarchical_dataset(root, opt, [name], split="labelled", exclude=queried or None, flag=flag,
                                         noise_ratio=noise_ratio, noise_scope=noise_scope, noise_model=noise_model,
                                         relabels=relabels)
        if log.strip():
            logs.append(log.rstrip("\n"))
        identities = data.identities
        relpaths = {leaf.relpath for leaf in data.parts}
        overlap = relpaths & {rel for kept, _ in earlier for rel in kept}
        if overlap:  # rare: two names select one LMDB; only then are identities listed
            taken = {identity for kept, ids in earlier if kept & overlap for identity in ids if identity[0] in overlap}
            keep = [i for i, identity in enumerate(identities) if identity not in taken]
            identities = [identities[i] for i in keep]
            relpaths = {rel for rel, _ in identities}
            data = Subset(data, keep)
        if len(data):
            parts.append(data)
            earlier.append((relpaths, identities))
    if not parts and not required:
        return [], "\n".join(logs)
    if not parts:
        raise UserError(f"--select_data {'-'.join(select_data)}: no labelled sample under {root} (after filtering "
                        f"and --total_data_usage_ratio {getattr(opt, 'total_data_usage_ratio', 1.0)}); give the "
                        f"ratio training used, or name a query set")
    return torch.utils.data.ConcatDataset(parts), "\n".join(logs)


def check_noise(noise_ratio, noise_scope, noise_model=annotator_noise.DEFAULT_MODEL):
    if not 0.0 <= float(noise_ratio) <= 1.0:
        raise UserError(f"--noise_ratio {noise_ratio}: must lie between 0 and 1")
    if noise_scope not in NOISE_SCOPES:
        raise UserError(f"--noise_scope {noise_scope}: unknown; choose one of {', '.join(NOISE_SCOPES)}")
    annotator_noise.get_model(noise_model)


# A batch whose images all fail to decode is drawn again; after this many undecodable images in a
# row from one name the data is declared unreadable instead of being retried for ever.
MAX_UNDECODABLE_RUN = 1000
# the stream of --replay_data in Batch_Balanced_Dataset.names (no LMDB path component has parentheses
# in --select_data's sense: it names no dataset under --train_data)
REPLAY_STREAM = "(replay)"


class Batch_Balanced_Dataset:
    """One shuffled loader per --select_data name; `get_batch()` draws the batch_ratio share of
    each and concatenates them. `opt.batch_size` is the batch of this rank.

    `query_sets=False` (train.py --mode base) leaves query sets out; with query sets, the samples
    they hold (their origins) are left out of the base datasets' labelled parts, so no sample is
    trained on twice. `warnings` lists what the caller should tell the user. `state_dict()` /
    `load_state_dict()` save and restore every stream's position (exact resume)."""

    def __init__(self, opt, log=None, rank=0, world_size=1, query_sets=True):
        names = list(opt.select_data)
        ratios = [float(r) for r in opt.batch_ratio]
        if not names:
            raise UserError("--select_data is empty; name at least one dataset under --train_data")
        if len(names) != len(ratios):
            raise UserError(f"--select_data names {len(names)} datasets but --batch_ratio gives {len(ratios)} "
                            "shares; give one share per dataset")
        noise_ratio = float(getattr(opt, "noise_ratio", 0.0) or 0.0)
        noise_scope = getattr(opt, "noise_scope", "queried") or "queried"
        noise_model = getattr(opt, "noise_model", None) or annotator_noise.DEFAULT_MODEL
        check_noise(noise_ratio, noise_scope, noise_model)
        self.names = names
        self.rgb = bool(getattr(opt, "rgb", False))
        replay_root = getattr(opt, "replay_data", "") or ""
        replay = float(getattr(opt, "replay_ratio", 0.0) or 0.0) if replay_root else 0.0
        self.replay_samples = 0  # labelled samples of --replay_data: drawn, never counted as the loop's labels

        def batch_of(ratio):
            return max(round(opt.batch_size * (1.0 - replay) * ratio), 1)

        self.num_samples = {}
        self.batch_sizes = {}
        self.corrupted = {}
        self.dropped = {}  # per name: samples left out because their re-annotation disagreed
        self.skipped_images = 0
        self.skipped_by_name = collections.Counter()
        self.datasets = {}
        self.warnings = []
        self.data_loader_list = []
        self.samplers = []
        self.positions = []  # per name: [epoch, batches of it already drawn]
        self.iterators = []
        root = opt.train_data
        collate = AlignCollate(opt.imgH, opt.imgW, opt.PAD, channels=3 if self.rgb else 1)
        rule = "-" * 80
        lines = [rule, f"dataset_root: {root}", f"opt.select_data: {names}", f"opt.batch_ratio: {ratios}"]
        if noise_ratio:
            lines.append(f"label noise: ratio {noise_ratio} on {noise_scope} samples, model {noise_model}, "
                         f"seed {opt.manualSeed}")

        selected = {name: leaf_selection.select_leaves(root, [name], "--train_data") for name in names}
        leaf_selection.check_selected_once(names, selected)
        relabel_sets = {name: set_records.relabel_leaves(root, rels) for name, rels in selected.items()}
        only_relabels = self.relabel_names(names, ratios, selected, relabel_sets, query_sets)
        if only_relabels:  # a relabel set is no stream: its name is dropped, it relabels the others
            names = [name for name in names if name not in only_relabels]
            ratios = [ratio for ratio in ratios if ratio > 0]
            self.names = names
        relabel_paths = set_records.relabel_order(root, {rel for rels in relabel_sets.values() for rel in rels})
        relabels = {}
        if relabel_paths and query_sets:
            relabels = read_relabels(root, opt, relabel_paths, noise_ratio, noise_model)
            policies = {rel: set_records.relabel_policy(os.path.join(root, rel), set_records.read_relabel_meta(os.path.join(root, rel)))
                        for rel in relabel_paths}
            lines.append("relabel sets (re-annotations of earlier samples, by policy; no batch share): "
                         + ", ".join(f"{rel} ({policies[rel]})" for rel in relabel_paths))
        query_leaves = {name: [rel for rel in rels if set_records.is_query_set(os.path.join(root, rel))]
                        for name, rels in selected.items()}
        for name in names:
            if not query_sets and len(query_leaves[name]) == len(selected[name]):
                raise UserError(f"--select_data {name} selects only query sets ({', '.join(query_leaves[name])}), "
                                "which --mode base does not train on; use --mode al, or drop the name (and its "
                                "share) from --select_data and --batch_ratio")
        streams, skipped_batch = list(zip(names, ratios)), 0
        if query_sets:
            # A query set whose every answer was unreadable counts as queried but holds nothing to
            # draw: an older summary (or a hand-made selection) may still name it, which must not
            # stop a round, so its stream is left out and its share of the batch stays unused.
            streams = []
            for name, ratio in zip(names, ratios):
                rels = query_leaves[name]
                if not (rels and len(rels) == len(selected[name])
                        and all(set_records.is_empty_query_set(os.path.join(root, rel)) for rel in rels)):
                    streams.append((name, ratio))
                    continue
                skipped_batch += batch_of(ratio)
                self.warnings.append(f"--select_data {name}: the query set {', '.join(rels)} holds no sample (every "
                                     f"answer was unreadable; it only keeps those images out of later pools), so it is "
                                     f"skipped and its batch share {ratio:g} stays unused; drop it and its share from "
                                     f"--select_data and --batch_ratio")
            if not streams:
                raise UserError(f"--select_data {'-'.join(names)}: only empty query sets, nothing to train on; name "
                                f"the labelled datasets and the query sets that hold samples")
            self.names = [name for name, _ in streams]
        queried = set()
        if query_sets:
            ratio = float(getattr(opt, "total_data_usage_ratio", 1.0))
            for rel in natsorted({rel for rels in query_leaves.values() for rel in rels}):
                path = os.path.join(root, rel)
                queried |= set_records.read_query_origins(path)
                drawn_at = (set_records.read_query_meta(path) or {}).get("total_data_usage_ratio")
                if drawn_at is not None and abs(float(drawn_at) - ratio) > 1e-9:
                    self.warnings.append(
                        f"query set {rel} was drawn with --total_data_usage_ratio {float(drawn_at):g}, this run "
                        f"uses {ratio:g}: samples it holds that now fall in a base dataset's labelled part are "
                        "left out there, so each is trained on once (log_dataset.txt: 'excluded ... already queried')")

        for k, (name, ratio) in enumerate(streams):
            batch = batch_of(ratio)
            dataset, leaf_log = hierarchical_dataset(root, opt, select_data=[name], split="labelled",
                                                     exclude=queried or None, noise_ratio=noise_ratio,
                                                     noise_scope=noise_scope, flag="--train_data",
                                                     noise_model=noise_model, relabels=relabels)
            left_out = [] if query_sets else query_leaves[name]
            if left_out:
                dataset = SelectedDataset([leaf for leaf in dataset.leaves if not leaf.is_query])
                leaf_log = "\n".join(line for line in leaf_log.splitlines()
                                     if not any(f"\t/{rel}\t" in line for rel in left_out))
                note = (f"--mode base leaves out the query set(s) {', '.join(left_out)} that --select_data {name} "
                        "selects (--mode al trains on them)")
                self.warnings.append(note)
                leaf_log += "\n" + note
            lines.append(rule)
            lines.append(leaf_log.rstrip("\n"))
            # a sample dropped by its re-annotation was labelled: it is counted as dropped, not unlabelled
            unlabelled = sum(leaf.num_total - leaf.num_filtered - len(leaf) - len(leaf.dropped)
                             for leaf in dataset.leaves if not leaf.is_query)
            lines.append(f"num total samples of {name}: {len(dataset)} labelled (total_data_usage_ratio "
                         f"{opt.total_data_usage_ratio}), {unlabelled} unlabelled, "
                         f"{dataset.num_filtered} filtered out, {dataset.num_corrupted} corrupted labels"
                         + (f", {dataset.num_dropped} dropped (re-annotation disagreed)" if dataset.num_dropped
                            else ""))
            if len(dataset) == 0 and dataset.num_dropped:
                # re-annotations (agree) left nothing of it: a round's data, not a wrong command
                skipped_batch += batch
                self.dropped[name] = dataset.num_dropped
                self.warnings.append(f"--select_data {name}: every labelled sample of it was dropped (its "
                                     f"re-annotation disagreed, --relabel_policy agree), so it is skipped and its "
                                     f"batch share {ratio:g} stays unused")
                continue
            if len(dataset) == 0:
                raise UserError(f"--select_data {name}: no labelled sample (after filtering and "
                                f"--total_data_usage_ratio {opt.total_data_usage_ratio}); raise the ratio or "
                                "check --batch_max_length / --character")
            shard = batch_sampling.shard_dataset(dataset, rank, world_size, opt.manualSeed)
            if batch_sampling.first_readable(shard) is None:
                where = ", ".join(leaf.relpath for leaf in dataset.parts)
                raise UserError(f"--select_data {name}: none of its {len(shard)} labelled images"
                                f"{' of this process' if world_size > 1 else ''} decodes (LMDB {where} under "
                                "--train_data); rebuild it with create_lmdb_dataset.py or drop the name")
            small = len(shard) < batch
            if small:
                # A query set can be smaller than its batch share in early rounds: draw it with
                # replacement so every batch keeps its mix instead of stopping the run.
                lines.append(f"{name}: {len(shard)} labelled samples per process, fewer than its batch of "
                             f"{batch}; drawn with replacement")
            lines.append(f"num samples of {name} per batch: {opt.batch_size} x {ratio} (batch_ratio)"
                         + (f" x {1.0 - replay:g} (1 - replay_ratio)" if replay else "") + f" = {batch}")
            self.num_samples[name] = len(dataset)
            self.batch_sizes[name] = batch
            self.corrupted[name] = dataset.num_corrupted
            self.dropped[name] = dataset.num_dropped
            self.datasets[name] = dataset
            self.add_loader(opt, shard, batch, small, k, rank, collate)
        self.names = [name for name in self.names if name in self.datasets]
        if not self.names:
            raise UserError(f"--select_data {'-'.join(names)}: re-annotations (--relabel_policy agree) dropped every "
                            f"labelled sample; nothing to train on")
        if replay:
            self.add_replay_stream(opt, replay_root, replay, len(streams), rank, world_size, collate, lines, rule)
        lines.append(rule)
        total = sum(self.batch_sizes.values())
        lines.append(f"Total_batch_size: {'+'.join(str(b) for b in self.batch_sizes.values())} = {total}")
        if total + skipped_batch != opt.batch_size:  # a skipped share has its own warning
            shares = "-".join(f"{r:g}" for r in ratios)
            self.warnings.append(f"--batch_ratio {shares} (sum {sum(ratios):g}) of --batch_size {opt.batch_size} "
                                 f"gives batches of {'+'.join(str(b) for b in self.batch_sizes.values())} = "
                                 f"{total} images, not {opt.batch_size}")
        lines.append(rule)
        self.log_text = "\n".join(lines) + "\n"
        print(self.log_text, end="")
        if log is not None:
            log.write(self.log_text)
            log.flush()

    def add_replay_stream(self, opt, root, replay, k, rank, world_size, collate, lines, rule):
        """Rehearsal: the stream REPLAY_STREAM draws `replay` of every batch from every labelled
        sample below --replay_data (clean labels, whatever --noise_ratio: it is data the start was
        trained on, not the loop's annotations). Its samples never join the pool or the loop's
        label count."""
        train_root = os.path.realpath(opt.train_data)
        replay_real = os.path.realpath(root)
        if os.path.commonpath([train_root, replay_real]) in (train_root, replay_real):
            raise UserError(f"--replay_data {root}: overlaps --train_data {opt.train_data}, so pool or queried samples "
                            "would be replayed with their labels; give a folder beside it (e.g. the source LMDBs)")
        dataset, leaf_log = hierarchical_dataset(root, opt, select_data="/", flag="--replay_data")
        batch = max(round(opt.batch_size * replay), 1)
        lines.append(rule)
        lines.append(leaf_log.rstrip("\n"))
        lines.append(f"num total samples of --replay_data {root}: {len(dataset)} labelled (all of it, clean labels), "
                     f"{dataset.num_filtered} filtered out; per batch: {opt.batch_size} x {replay:g} (replay_ratio) "
                     f"= {batch}")
        if len(dataset) == 0:
            raise UserError(f"--replay_data {root}: no labelled sample after filtering; check --batch_max_length / "
                            "--character, or give the LMDBs the start was trained on")
        shard = batch_sampling.shard_dataset(dataset, rank, world_size, opt.manualSeed)
        if batch_sampling.first_readable(shard) is None:
            raise UserError(f"--replay_data {root}: none of its {len(shard)} images decodes; rebuild its LMDBs with "
                            "create_lmdb_dataset.py")
        small = len(shard) < batch
        self.names.append(REPLAY_STREAM)
        self.replay_samples = len(dataset)
        self.batch_sizes[REPLAY_STREAM] = batch
        self.corrupted[REPLAY_STREAM] = 0
        self.dropped[REPLAY_STREAM] = 0
        self.datasets[REPLAY_STREAM] = dataset
        self.add_loader(opt, shard, batch, small, k, rank, collate)

    def add_loader(self, opt, shard, batch, small, k, rank, collate):
        """The shuffled loader of stream `k` (seeded by the run's seed, the rank and k)."""
        sampler = batch_sampling.EpochBatchSampler(len(shard), batch, small, (opt.manualSeed, rank, k))
        # The loader's own generator seeds its workers; without one it would draw from the global
        # torch generator at every new epoch and so shift the model's random numbers.
        loader = DataLoader(shard, batch_sampler=sampler, num_workers=int(opt.workers), collate_fn=collate,
                            pin_memory=torch.cuda.is_available(), persistent_workers=int(opt.workers) > 0,
                            worker_init_fn=batch_sampling.train_worker_init,
                            generator=torch.Generator().manual_seed(batch_sampling.stream_seed(opt.manualSeed, rank, k)))
        self.data_loader_list.append(loader)
        self.samplers.append(sampler)
        self.positions.append([0, 0])
        self.iterators.append(None)  # started on first use, at the position then current

    @staticmethod
    def relabel_names(names, ratios, selected, relabel_sets, query_sets):
        """The names that select relabel sets only: their share must be 0 (they add no sample),
        and a 0 share is theirs alone. --mode base (`query_sets` False) trains on none."""
        only = [name for name in names if relabel_sets[name] and len(relabel_sets[name]) == len(selected[name])]
        for name, ratio in zip(names, ratios):
            if name in only and ratio > 0:
                raise UserError(f"--select_data {name} selects relabel sets only ({', '.join(relabel_sets[name])}), "
                                f"which give earlier samples new labels and add none: give it the share 0 in "
                                f"--batch_ratio")
            if name not in only and ratio == 0:
                raise UserError(f"--batch_ratio: {name} has the share 0, which only a relabel set may have; give it "
                                f"a positive share")
        if only and not query_sets:
            raise UserError(f"--select_data {'-'.join(only)}: relabel sets, which --mode base does not train on; use "
                            f"--mode al, or drop the name (and its share) from --select_data and --batch_ratio")
        if len(only) == len(names):
            raise UserError("--select_data names relabel sets only; name the datasets they relabel too")
        return only

    @property
    def num_corrupted(self):
        return sum(self.corrupted.values())

    @property
    def num_dropped(self):
        return sum(self.dropped.values())

    def noise_records(self):
        """`LmdbDataset.noise_records` of every training leaf (a leaf two names select, once), in
        the order of --select_data and the leaves."""
        records, seen = [], set()
        for name in self.names:
            if name == REPLAY_STREAM:
                continue
            for leaf in self.datasets[name].leaves:
                if leaf.relpath not in seen:
                    seen.add(leaf.relpath)
                    records += leaf.noise_records()
        return records

    def next_from(self, k):
        position = self.positions[k]
        while True:
            if self.iterators[k] is None:
                self.samplers[k].epoch, self.samplers[k].start = position
                self.iterators[k] = iter(self.data_loader_list[k])
            try:
                batch = next(self.iterators[k])
            except StopIteration:
                position[0] += 1
                position[1] = 0
                self.iterators[k] = None
                continue
            position[1] += 1
            return batch

    def get_batch(self):
        images, labels, identities = [], [], []
        for k, name in enumerate(self.names):
            undecodable_run = 0
            while True:
                batch_images, batch_labels, batch_ids = self.next_from(k)
                skipped = self.batch_sizes[name] - len(batch_labels)
                if skipped:
                    self.skipped_images += skipped
                    self.skipped_by_name[name] += skipped
                if batch_labels:
                    break
                undecodable_run += skipped
                if undecodable_run >= MAX_UNDECODABLE_RUN:
                    source = "--replay_data" if name == REPLAY_STREAM else f"--select_data {name}"
                    raise UserError(f"{source}: the last {undecodable_run} images drawn from it did not "
                                    "decode; rebuild its LMDB with create_lmdb_dataset.py or drop the name")
            images.append(batch_images)
            labels.extend(batch_labels)
            identities.extend(batch_ids)
        return torch.cat(images, 0), labels, identities

    def skipped_report(self):
        """One line for the logs: undecodable images met so far (skipped, never trained on)."""
        per_name = ", ".join(f"{n} {c}" for n, c in self.skipped_by_name.items()) or "none"
        return f"undecodable images skipped: {self.skipped_images} ({per_name})"

    def stream_states(self):
        return [{"name": name, "epoch": position[0], "batch": position[1], "size": sampler.size,
                 "batch_size": sampler.batch_size, "replacement": sampler.replacement}
                for name, position, sampler in zip(self.names, self.positions, self.samplers)]

    def state_dict(self):
        """Where each stream stands (epoch, batches of it drawn; with the size and batch that fix its
        order) and the skip counters: plain Python values, for a checkpoint."""
        return {"streams": self.stream_states(), "skipped_by_name": dict(self.skipped_by_name)}

    def load_state_dict(self, state):
        """Continue every stream where `state` left it; UserError when the data or the batch shares
        differ from those it was taken with (the positions would not mean the same samples)."""
        saved = state.get("streams") if isinstance(state, collections.abc.Mapping) else None
        if not isinstance(saved, list) or not all(isinstance(s, collections.abc.Mapping) for s in saved):
            raise UserError("the data loaders' state is malformed")
        now = self.stream_states()
        if [s.get("name") for s in saved] != self.names:
            raise UserError(f"the training data were {[s.get('name') for s in saved]}, now {self.names}")
        changed = [f"{n['name']} {key} {s.get(key)} -> {n[key]}" for s, n in zip(saved, now)
                   for key in ("size", "batch_size", "replacement") if s.get(key) != n[key]]
        if changed:
            raise UserError("the labelled data per process or the batch shares changed since the checkpoint "
                            f"({'; '.join(changed)}); resume on the same data")
        for k, s in enumerate(saved):
            self.positions[k] = [int(s["epoch"]), int(s["batch"])]
            self.iterators[k] = None
        self.skipped_by_name = collections.Counter({n: int(c) for n, c in state.get("skipped_by_name", {}).items()})
        self.skipped_images = sum(self.skipped_by_name.values())


class AlignCollate:
    """Collate `(image, label, identity)` items into `(images (B, C, imgH, imgW) in [-1, 1], labels,
    identities)`, dropping items whose image is None."""

    def __init__(self, imgH=32, imgW=100, keep_ratio_with_pad=False, channels=None):
        self.imgH = imgH
        self.imgW = imgW
        self.keep_ratio_with_pad = keep_ratio_with_pad
        self.channels = channels

    def __call__(self, batch):
        batch = [item for item in batch if item is not None and item[0] is not None]
        if not batch:
            return torch.empty(0, self.channels or 1, self.imgH, self.imgW), [], []
        images, labels, identities = zip(*batch)
        arrays = self.padded(images) if self.keep_ratio_with_pad else self.resized(images)
        if arrays.ndim == 3:
            arrays = arrays[:, :, :, None]
        tensor = torch.from_numpy(arrays).permute(0, 3, 1, 2).float()
        return tensor.div_(127.5).sub_(1.0), list(labels), list(identities)

    def resized(self, images):
        size = (self.imgW, self.imgH)
        return np.stack([np.asarray(img.resize(size, Image.BICUBIC)) for img in images])

    def padded(self, images):
        """Resize to imgH keeping the ratio (at most imgW wide), then fill the right side with
        copies of the last column, as the original NormalizePAD."""
        widths = [min(self.imgW, math.ceil(self.imgH * img.width / img.height)) for img in images]
        first = np.asarray(images[0])
        canvas = np.zeros((len(images), self.imgH, self.imgW) + first.shape[2:], dtype=np.uint8)
        for k, (img, w) in enumerate(zip(images, widths)):
            canvas[k, :, :w] = np.asarray(img.resize((w, self.imgH), Image.BICUBIC))
        last = np.minimum(np.arange(self.imgW)[None, :], np.asarray(widths)[:, None] - 1)
        shape = (len(images), 1, self.imgW) + (1,) * (canvas.ndim - 3)
        return np.take_along_axis(canvas, last.reshape(shape), axis=2)


class RawDataset(Dataset):
    """Image files below a folder, naturally sorted, for inference: items `(image, path, path)`."""

    def __init__(self, root, opt):
        if not os.path.isdir(root):
            raise UserError(f"--image_folder {root}: no such folder")
        self.rgb = bool(getattr(opt, "rgb", False))
        paths = []
        for dirpath, _, filenames in os.walk(root):
            paths.extend(os.path.join(dirpath, f) for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS))
        self.paths = []
        self.skipped = []
        for path in natsorted(paths):
            reason = check_image_file(path)
            if reason:
                self.skipped.append((path, reason))
            else:
                self.paths.append(path)
        for path, reason in self.skipped:
            print(f"skipped {path}: {reason}")
        if not self.paths:
            raise UserError(f"--image_folder {root}: holds no readable image ({', '.join(IMAGE_EXTENSIONS)})")

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = self.paths[i]
        data, _ = read_image_file(path)
        return (None if data is None else decode_image(data, self.rgb)), path, path


def check_image_file(path):
    """None when the path is a regular file whose image header and data Pillow reads, else the
    reason (read_image_file's for anything but a regular file)."""
    data, reason = read_image_file(path)
    if reason:
        return reason
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except Exception as err:
        return f"undecodable image ({type(err).__name__}: {err})"
    return None
