"""LMDB datasets in the deep-text-recognition-benchmark format: reading, selecting, splitting,
batch-balanced loading, collation and atomic writing (see docs/DESIGN.md, "Data layer")."""
import bisect
import ctypes
import collections.abc
import io
import json
import math
import os
import shutil
import signal
import stat

import lmdb
import numpy as np
import torch
from natsort import natsorted
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

import annotator_noise
import atomic_io
import relabel_policies
from utils import UserError

NUM_SAMPLES_KEY = b"num-samples"
QUERY_META_KEY = b"query-meta"
# An LMDB of images without labels (create_lmdb_dataset.py --unlabelled): a pool to query, never
# training or evaluation data. Its `path-%09d` keys keep each image's path below the input folder.
UNLABELLED_KEY = b"unlabelled"
# Query-set keys of the samples transcribers marked unreadable (import_annotations.py): 1-based,
# `unreadable-%09d` -> origin, outside the `num-samples` range, so training never reads them and
# later pools still leave them out.
NUM_UNREADABLE_KEY = b"num-unreadable"
# A relabel set (data_sampling.py --relabel_ratio) carries this key instead of query-meta: its
# samples are new labels for samples trained on already, never samples of their own.
RELABEL_META_KEY = b"relabel-meta"
NOISE_SCOPES = ("queried", "all")
COMMIT_EVERY = 1000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def image_key(index):
    return b"image-%09d" % index


def label_key(index):
    return b"label-%09d" % index


def origin_key(index):
    return b"origin-%09d" % index


def path_key(index):
    return b"path-%09d" % index


def unreadable_key(index):
    return b"unreadable-%09d" % index


def open_lmdb(path):
    """Read-only environment tuned for many readers (one per DataLoader worker)."""
    try:
        return lmdb.open(os.fspath(path), readonly=True, lock=False, readahead=False, meminit=False,
                         max_readers=64)
    except lmdb.Error as err:
        raise UserError(f"{path}: cannot open the LMDB ({err}); check the dataset path") from None


# py-lmdb refuses to open one environment twice in a process, so every reader of an LMDB in this
# process shares one, keyed by the data file's identity (a rebuilt LMDB at the same path is new).
_ENVS = {}


def env_key(path):
    try:
        st = os.stat(os.path.join(path, "data.mdb"))
    except OSError:
        raise UserError(f"{path}: not an LMDB folder (no data.mdb); check the dataset path") from None
    return (os.path.realpath(path), st.st_dev, st.st_ino)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def loader_worker_init(worker_id):
    """DataLoader worker set-up: serve allocations above 128 KiB (collated batches and their pickled
    copies) by mmap, so they go back to the OS when freed. With glibc's adaptive threshold a worker's
    heap grew by about 6 KB per image read (tools/benchmark.py: +234 MB from a 2k to a 32k pool)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def shared_env(path):
    """This process's read-only environment for the LMDB at path, opened on first use."""
    key = env_key(path)
    cached = _ENVS.get(key)
    if cached is not None:
        owner, env = cached
        if owner == os.getpid():
            return env
        # Inherited through fork: it is read-only and lock-free, so closing it here only unmaps
        # this process's copy; the parent's stays usable.
        env.close()
    env = open_lmdb(path)
    _ENVS[key] = (os.getpid(), env)
    return env


def forget_env(path):
    """Close this process's environments of path (before the LMDB there is replaced)."""
    real = os.path.realpath(path)
    for key in [k for k in _ENVS if k[0] == real]:
        owner, env = _ENVS.pop(key)
        if owner == os.getpid():
            env.close()


def read_num_samples(txn, path):
    raw = txn.get(NUM_SAMPLES_KEY)
    if raw is None:
        raise UserError(f"{path}: LMDB without a 'num-samples' key; rebuild it with create_lmdb_dataset.py")
    try:
        count = int(raw)
    except ValueError:
        raise UserError(f"{path}: 'num-samples' is not an integer ({raw[:20]!r}); rebuild the LMDB") from None
    if count < 0:
        raise UserError(f"{path}: 'num-samples' is negative ({count}); rebuild the LMDB with create_lmdb_dataset.py")
    return count


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


def iter_labels(txn, num_samples):
    """(index, label) for every label key 1..num_samples, by one cursor sweep (keys sort by index)."""
    cursor = txn.cursor()
    if not cursor.set_range(b"label-"):
        return
    for key, value in cursor:
        if not key.startswith(b"label-"):
            break
        try:
            index = int(key[6:])
        except ValueError:
            continue
        if 1 <= index <= num_samples:
            yield index, value.decode("utf-8", errors="replace")


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
        with shared_env(self.root).begin(write=False) as txn:
            self.num_total = read_num_samples(txn, self.root)
            self.is_query = txn.get(QUERY_META_KEY) is not None
            self.is_unlabelled = txn.get(UNLABELLED_KEY) is not None
            self.is_relabel = txn.get(RELABEL_META_KEY) is not None
            self.indices = self._filtered_indices(txn)
        if noise_ratio:
            self.add_noise(noise_ratio, getattr(opt, "manualSeed", 0) if noise_seed is None else noise_seed,
                           noise_model)

    def _filtered_indices(self, txn):
        if not self.rules.filtering or self.is_unlabelled:  # empty labels: every image is pool
            return np.arange(1, self.num_total + 1, dtype=np.int64)
        kept = np.zeros(self.num_total + 1, dtype=bool)
        seen = 0
        for index, label in iter_labels(txn, self.num_total):
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
        with shared_env(self.root).begin(write=False) as txn:
            for index, raw in iter_labels(txn, self.num_total):
                if not wanted[index]:
                    continue
                identity = (read_origin(txn, index, self.root) if self.is_query or self.is_relabel else None) \
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
        with shared_env(self.root).begin(write=False) as txn:
            if self.is_query:
                hits = {}
                for index in self.indices.tolist():
                    origin = read_origin(txn, index, self.root)
                    if origin in relabels:
                        hits[index] = relabels[origin]
            else:
                present = set(self.indices.tolist())
                hits = {index: relabels[(rel, index)] for rel, index in relabels
                        if rel == self.relpath and index in present}
            raw = {index: txn.get(label_key(index)) for index in hits}
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
        with shared_env(self.root).begin(write=False) as txn:
            for index in sorted(self.noisy_labels):
                raw = (txn.get(label_key(index)) or b"").decode("utf-8", errors="replace")
                origin = read_origin(txn, index, self.root) if self.is_query else None
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
            self._env = shared_env(self.root)
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
            raw_label = txn.get(label_key(index))
            buf = txn.get(image_key(index))
        label = self._trained_label(index, raw_label)
        image = decode_image(buf, self.rgb) if buf is not None else None
        if image is None:
            self.num_undecodable += 1
        return image, label, (self.relpath, index)


def read_origin(txn, index, path=None):
    """The origin `(relpath, index)` recorded for sample `index` of the LMDB at `path` (opened as
    txn; named in the error of a damaged key), or None when it records none."""
    return parse_origin(txn.get(origin_key(index)), path, origin_key(index))


def parse_origin(raw, path, key):
    """`(relpath, index)` from a stored `<relpath>TAB<index>` value (None stays None); anything else
    is a UserError naming the LMDB and the key, since a damaged key must not pass as a sample."""
    if raw is None:
        return None
    try:
        relpath, tab, idx = raw.decode("utf-8").rpartition("\t")
        if tab and relpath and idx.isdigit():
            return (relpath, int(idx))
    except UnicodeDecodeError:
        pass
    raise UserError(f"{_lmdb_name(path)}: its key {key.decode()} holds {raw[:40]!r}, not '<dataset>TAB<index>'; "
                    f"the LMDB is damaged: rebuild it (query and relabel sets: run their round again)")


def _lmdb_name(path):
    return "an LMDB" if path is None else os.path.normpath(path)


def read_meta(txn, key, path):
    """The JSON dict stored under `key` (query-meta, relabel-meta) of the LMDB at `path`, or None;
    a value that is not a JSON object is a UserError naming the LMDB and the key."""
    raw = txn.get(key)
    if raw is None:
        return None
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        meta = None
    if not isinstance(meta, dict):
        raise UserError(f"{_lmdb_name(path)}: its key {key.decode()} holds {raw[:40]!r}, not a JSON object; the LMDB "
                        f"is damaged: rebuild it (query and relabel sets: run their round again)")
    return meta


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


def find_lmdbs(root):
    """Relative POSIX paths of every leaf LMDB (a folder holding data.mdb) below root, natural order.

    Hidden folders are skipped: they hold writes in progress (see write_lmdb). Symbolic links are
    followed, but a folder reached twice (a link to a dataset beside it, or to a folder above it)
    is a UserError: its samples would count twice (a query set trained at double weight, a test
    set scored twice) and a link to an ancestor would make the walk endless."""
    found = []
    seen = {os.path.realpath(root): "."}  # each folder's real path -> the first path it was reached by
    aliases = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        rel = _relpath(dirpath, root)
        kept = []
        for name in sorted(d for d in dirnames if not d.startswith(".")):
            real = os.path.realpath(os.path.join(dirpath, name))
            child = name if rel == "." else f"{rel}/{name}"
            if real in seen:
                aliases.append((child, seen[real]))
            else:
                seen[real] = child
                kept.append(name)
        dirnames[:] = kept
        if "data.mdb" in filenames:
            found.append(rel)
    for alias, first in aliases:
        # only an alias of a folder that holds an LMDB would count samples twice
        if any(_within(leaf, first) for leaf in found):
            link = first if _through_link(root, first) and not _through_link(root, alias) else alias
            raise UserError(f"{root}: {first} and {alias} are one folder (reached twice through a symbolic link), "
                            f"so its samples would count twice; remove the link {os.path.join(root, link)}")
    return natsorted(found)


def _through_link(root, rel):
    """Whether the relative path `rel` below root passes through a symbolic link."""
    parts = [] if rel == "." else rel.split("/")
    return any(os.path.islink(os.path.join(root, *parts[:k])) for k in range(1, len(parts) + 1))


def _relpath(path, root):
    rel = os.path.relpath(path, root)
    return "." if rel == "." else rel.replace(os.sep, "/")


def _within(rel, folder):
    """Whether the relative path `rel` is `folder` or lies below it ("." holds everything)."""
    return folder == "." or rel == folder or rel.startswith(folder + "/")


def selects(relpath, name, root):
    if name == "/":
        return True
    parts = relpath.split("/") if relpath != "." else [os.path.basename(os.path.abspath(root))]
    return name in parts


def check_root(root, flag):
    what = f"{flag} {root}" if flag else f"data folder {root}"
    if not root:
        raise UserError(f"{flag or 'data folder'} is not set; give the folder that holds the LMDBs")
    if not os.path.isdir(root):
        raise UserError(f"{what}: no such folder")
    leaves = find_lmdbs(root)
    if not leaves:
        raise UserError(f"{what}: holds no LMDB (no data.mdb below it); build one with create_lmdb_dataset.py "
                        "or `make data`")
    return leaves


def select_leaves(root, select_data, flag=None):
    leaves = check_root(root, flag)
    names = [select_data] if isinstance(select_data, str) else list(select_data)
    chosen = []
    for name in names:
        hits = [leaf for leaf in leaves if selects(leaf, name, root)]
        if not hits:
            raise UserError(f"--select_data {name}: no LMDB below {root} has a path component '{name}'; "
                            f"found: {', '.join(leaves)}")
        chosen.extend(h for h in hits if h not in chosen)
    return natsorted(chosen)


def group_by_relpath(identities):
    grouped = collections.defaultdict(list)
    for relpath, index in identities:
        grouped[relpath].append(int(index))
    return grouped


def is_unlabelled(path):
    """Whether the leaf LMDB at path was built without labels (create_lmdb_dataset.py --unlabelled)."""
    return has_key(path, UNLABELLED_KEY)


def refuse_unlabelled(root, relpaths, flag=None):
    """Training and evaluation need labels: an unlabelled LMDB among `relpaths` is a UserError."""
    for rel in relpaths:
        path = os.path.normpath(os.path.join(root, rel))
        if is_unlabelled(path):
            raise UserError(f"{flag + ' ' if flag else ''}{path}: an unlabelled LMDB (create_lmdb_dataset.py "
                            f"--unlabelled) has no labels to train or evaluate on; leave it out here, query it "
                            f"with data_sampling.py and train on the query set import_annotations.py writes")


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
    relpaths = select_leaves(root, select_data, flag)
    if split != "unlabelled":
        refuse_unlabelled(root, relpaths, flag)
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
        for rel, indices in group_by_relpath(exclude).items():
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


# ---------------------------------------------------------------------------------------------
# relabel sets: new labels for samples trained on already (data_sampling.py --relabel_ratio)


class RelabelEntry(collections.namedtuple("RelabelEntry", "clean_label noisy_label kind relpath index policy")):
    """A re-annotation: the relabel set's label (None when a human annotator found the image
    unreadable: the sample leaves training, whatever the policy), the simulated annotator's error
    on it (None when it got it right), where the relabel set holds it (index None for an unreadable
    answer) and the set's policy (relabel_policies)."""


def is_relabel_set(path):
    """Whether the leaf LMDB at path carries a `relabel-meta` key (a relabel set)."""
    return has_key(path, RELABEL_META_KEY)


def read_relabel_meta(path):
    """The decoded `relabel-meta` dict of a relabel set, or None."""
    with shared_env(path).begin(write=False) as txn:
        return read_meta(txn, RELABEL_META_KEY, path)


def relabel_policy(path, meta):
    """The policy of the relabel set at path (its `relabel-meta` dict `meta`): `policy`, or
    `replace` for a set written before the policy existed; one this version does not know is a
    UserError."""
    policy = (meta or {}).get("policy", relabel_policies.DEFAULT)
    if policy not in relabel_policies.POLICIES:
        raise UserError(f"{path}: its relabel-meta names the policy {policy!r}, which this version does not know "
                        f"(known: {relabel_policies.known()}); leave the relabel set out of --select_data or "
                        f"update this code")
    return policy


def relabel_noise_seed(seed, round_number):
    """The simulated annotator's stream for a round's re-annotations: its own seed text, so the
    second look at a sample is a fresh draw, independent of the first annotation's."""
    return f"{seed}\trelabel\t{round_number}"


def relabel_order(root, relpaths):
    """Relabel set relpaths in the order their labels apply (a later one wins over an earlier
    one): by round (the `round` of their meta), a review (find_label_errors.py, made before the
    sampling of the round it is numbered by) before that round's own set, then natural order of the
    path."""
    metas = {rel: read_relabel_meta(os.path.join(root, rel)) or {} for rel in relpaths}
    ranked = natsorted(relpaths)
    return sorted(ranked, key=lambda rel: (metas[rel].get("round") is None, metas[rel].get("round") or 0,
                                           not metas[rel].get("review")))


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
    for rel in relabel_order(root, relpaths):
        leaf = LmdbDataset(os.path.join(root, rel), opt, relpath=rel)
        meta = read_relabel_meta(leaf.root)
        policy = relabel_policy(leaf.root, meta)
        if noise_ratio:
            round_number = (meta or {}).get("round", rel)
            leaf.add_noise(noise_ratio, relabel_noise_seed(seed, round_number), noise_model)
        with shared_env(leaf.root).begin(write=False) as txn:
            for index in leaf.indices.tolist():
                origin = read_origin(txn, index, leaf.root)
                if origin is None:
                    raise UserError(f"{leaf.root}: relabel set sample {index} has no origin key; rebuild it with "
                                    f"data_sampling.py")
                raw = (txn.get(label_key(index)) or b"").decode("utf-8", errors="replace")
                relabels.setdefault(origin, []).append(
                    RelabelEntry(leaf.rules.clean(leaf.rules.normalise(raw)), leaf.noisy_labels.get(index),
                                 leaf.noise_kinds.get(index), rel, index, policy))
            for origin in read_unreadable_origins(txn, leaf.root):  # import_annotations.py: answered empty or ###
                relabels.setdefault(origin, []).append(RelabelEntry(None, None, None, rel, None, policy))
    return relabels


def relabel_leaves(root, relpaths):
    """The relabel sets among `relpaths` (relative to root)."""
    return [rel for rel in relpaths if is_relabel_set(os.path.join(root, rel))]


def selected_query_origins(root, select_data, flag="--train_data"):
    """Origins held by the query sets that `select_data` selects: training leaves them out of the
    base datasets' labelled parts (each sample is trained on once)."""
    queried = set()
    leaves = {rel for name in select_data for rel in select_leaves(root, [name], flag)}
    for rel in sorted(leaves):
        path = os.path.join(root, rel)
        if is_query_set(path):
            queried |= read_query_origins(path)
    return queried


def labelled_dataset(root, opt, select_data, noise_ratio=0.0, noise_scope="queried",
                     noise_model=annotator_noise.DEFAULT_MODEL, flag="--train_data", required=True):
    """`(data, log)`: every labelled sample of `select_data`, with the labels `train.py --mode al`
    trains on (Batch_Balanced_Dataset): per name, `hierarchical_dataset(split="labelled")` with the
    selected query sets' origins excluded, the noise applied and the selected relabel sets applied
    over it (new labels; an `agree` set's disagreeing samples left out). A sample that two names
    select is kept once (the first name's). Items are `(image, label, identity)`; UserError when
    there is none (with `required`; else an empty list)."""
    queried = selected_query_origins(root, select_data, flag)
    selected = natsorted({rel for name in select_data for rel in select_leaves(root, [name], flag)})
    relabels = read_relabels(root, opt, relabel_leaves(root, selected), noise_ratio, noise_model)
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


# A dataset smaller than its batch share is drawn with replacement; an "epoch" of it is this many
# batches, so that its loader (and the prefetching of its workers) is not restarted every batch.
REPLACEMENT_EPOCH_BATCHES = 100
# A batch whose images all fail to decode is drawn again; after this many undecodable images in a
# row from one name the data is declared unreadable instead of being retried for ever.
MAX_UNDECODABLE_RUN = 1000


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


def check_selected_once(names, selected):
    """Each LMDB in one stream only: two --select_data names selecting one LMDB (a name given
    twice, or a folder and a dataset inside it) would train its samples at double weight.
    `selected` maps each name to its leaves."""
    owner = {}
    for k, name in enumerate(names):
        if name in names[:k]:
            raise UserError(f"--select_data names {name} twice; name each dataset once (and give one --batch_ratio "
                            f"share per name)")
        for rel in selected[name]:
            if rel in owner:
                raise UserError(f"--select_data {owner[rel]} and {name} both select {rel}, whose samples would train "
                                f"at double weight; name each dataset once")
            owner[rel] = name


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

        selected = {name: select_leaves(root, [name], "--train_data") for name in names}
        check_selected_once(names, selected)
        relabel_sets = {name: relabel_leaves(root, rels) for name, rels in selected.items()}
        only_relabels = self.relabel_names(names, ratios, selected, relabel_sets, query_sets)
        if only_relabels:  # a relabel set is no stream: its name is dropped, it relabels the others
            names = [name for name in names if name not in only_relabels]
            ratios = [ratio for ratio in ratios if ratio > 0]
            self.names = names
        relabel_paths = relabel_order(root, {rel for rels in relabel_sets.values() for rel in rels})
        relabels = {}
        if relabel_paths and query_sets:
            relabels = read_relabels(root, opt, relabel_paths, noise_ratio, noise_model)
            policies = {rel: relabel_policy(os.path.join(root, rel), read_relabel_meta(os.path.join(root, rel)))
                        for rel in relabel_paths}
            lines.append("relabel sets (re-annotations of earlier samples, by policy; no batch share): "
                         + ", ".join(f"{rel} ({policies[rel]})" for rel in relabel_paths))
        query_leaves = {name: [rel for rel in rels if is_query_set(os.path.join(root, rel))]
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
                        and all(is_empty_query_set(os.path.join(root, rel)) for rel in rels)):
                    streams.append((name, ratio))
                    continue
                skipped_batch += max(round(opt.batch_size * ratio), 1)
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
                queried |= read_query_origins(path)
                drawn_at = (read_query_meta(path) or {}).get("total_data_usage_ratio")
                if drawn_at is not None and abs(float(drawn_at) - ratio) > 1e-9:
                    self.warnings.append(
                        f"query set {rel} was drawn with --total_data_usage_ratio {float(drawn_at):g}, this run "
                        f"uses {ratio:g}: samples it holds that now fall in a base dataset's labelled part are "
                        "left out there, so each is trained on once (log_dataset.txt: 'excluded ... already queried')")

        for k, (name, ratio) in enumerate(streams):
            batch = max(round(opt.batch_size * ratio), 1)
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
            shard = shard_dataset(dataset, rank, world_size, opt.manualSeed)
            if first_readable(shard) is None:
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
            lines.append(f"num samples of {name} per batch: {opt.batch_size} x {ratio} (batch_ratio) = {batch}")
            self.num_samples[name] = len(dataset)
            self.batch_sizes[name] = batch
            self.corrupted[name] = dataset.num_corrupted
            self.dropped[name] = dataset.num_dropped
            self.datasets[name] = dataset
            sampler = EpochBatchSampler(len(shard), batch, small, (opt.manualSeed, rank, k))
            # The loader's own generator seeds its workers; without one it would draw from the global
            # torch generator at every new epoch and so shift the model's random numbers.
            loader = DataLoader(shard, batch_sampler=sampler, num_workers=int(opt.workers), collate_fn=collate,
                                pin_memory=torch.cuda.is_available(), persistent_workers=int(opt.workers) > 0,
                                worker_init_fn=train_worker_init,
                                generator=torch.Generator().manual_seed(stream_seed(opt.manualSeed, rank, k)))
            self.data_loader_list.append(loader)
            self.samplers.append(sampler)
            self.positions.append([0, 0])
            self.iterators.append(None)  # started on first use, at the position then current
        self.names = [name for name in self.names if name in self.datasets]
        if not self.names:
            raise UserError(f"--select_data {'-'.join(names)}: re-annotations (--relabel_policy agree) dropped every "
                            f"labelled sample; nothing to train on")
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
                    raise UserError(f"--select_data {name}: the last {undecodable_run} images drawn from it did not "
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


def shard_dataset(dataset, rank, world_size, seed):
    """This rank's disjoint share: a permutation shared by all ranks (same seed), every world_size-th."""
    if world_size <= 1:
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(int(seed)))
    return Subset(dataset, order[rank::world_size].tolist())


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


def write_lmdb(output_path, samples, meta=None, overwrite=False, extra_files=None, extra_keys=None,
               meta_key=QUERY_META_KEY):
    """Write `(image_bytes, label, origin)` samples as a new LMDB at output_path; returns the count.

    Built in a hidden sibling folder and renamed into place, so an interrupted run leaves nothing
    half-written. `meta` (a dict) makes it a query set (`query-meta` key), or with
    `meta_key=RELABEL_META_KEY` a relabel set. `extra_files` ({file
    name: text}) are written into the folder before the rename, so they appear with the LMDB. A
    sample may carry a fourth item, {key prefix: bytes}, stored as `<prefix>-%09d` beside its image;
    `extra_keys` ({key: bytes}) are stored once."""
    output_path = os.path.abspath(os.fspath(output_path))
    check_output(output_path, overwrite)
    parent = os.path.dirname(output_path)
    try:
        tmp = atomic_io.make_temp_dir(parent, os.path.basename(output_path))
    except OSError as err:
        raise atomic_io.blame_output(err, output_path)
    try:
        count = write_into(tmp, samples, meta, name=output_path, extra_keys=extra_keys, meta_key=meta_key)
        for file_name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, file_name), "w", encoding="utf-8") as f:
                f.write(text)
        replace_dir(tmp, output_path)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            atomic_io.blame_output(err, output_path)
        raise
    return count


def check_output(path, overwrite):
    if not os.path.exists(path):
        return
    if not os.path.isdir(path):
        raise UserError(f"output {path} exists and is not a folder; choose another output path")
    contents = os.listdir(path)
    if not contents:
        return
    if "data.mdb" not in contents:
        raise UserError(f"output {path} is a non-empty folder that is not an LMDB; choose another output path")
    if not overwrite:
        raise UserError(f"output {path} already holds an LMDB; remove it or choose another output path")


def replace_dir(src, dst):
    if os.path.isdir(dst):
        forget_env(dst)
        # A folder cannot be renamed onto a non-empty one: move the old one aside first.
        trash = atomic_io.make_temp_dir(os.path.dirname(dst), os.path.basename(dst), suffix=".old")
        os.replace(dst, os.path.join(trash, "old"))
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dst)


def write_into(path, samples, meta, name=None, extra_keys=None, meta_key=QUERY_META_KEY):
    """Write the samples into a new LMDB at path. An LMDB error of the writes (a full disk, mostly)
    becomes a UserError naming `name` (default: path); one of reading `samples` passes as it is."""
    env = _lmdb_write(name or path, lmdb.open, path, map_size=64 << 20, meminit=False)
    try:
        count = 0
        pending = list((extra_keys or {}).items())
        for sample in samples:
            image_bytes, label, origin = sample[:3]
            count += 1
            for prefix, value in (sample[3] if len(sample) > 3 else {}).items():
                pending.append((b"%s-%09d" % (prefix, count), value))
            pending.append((image_key(count), bytes(image_bytes)))
            pending.append((label_key(count), label.encode("utf-8")))
            if origin is not None:
                pending.append((origin_key(count), f"{origin[0]}\t{int(origin[1])}".encode("utf-8")))
            if len(pending) >= 2 * COMMIT_EVERY:
                _lmdb_write(name or path, put_all, env, pending)
                pending = []
        pending.append((NUM_SAMPLES_KEY, str(count).encode()))
        if meta is not None:
            pending.append((meta_key, json.dumps(meta, sort_keys=True).encode("utf-8")))
        _lmdb_write(name or path, put_all, env, pending)
        _lmdb_write(name or path, env.sync)
    finally:
        env.close()
    return count


def _lmdb_write(name, operation, *args, **kwargs):
    try:
        return operation(*args, **kwargs)
    except lmdb.Error as err:
        raise UserError(f"{name}: writing the LMDB failed ({err}); free some space or choose another "
                        f"output folder") from None


def put_all(env, items):
    """Commit items in one transaction, doubling the map size until they fit."""
    while True:
        try:
            with env.begin(write=True) as txn:
                for key, value in items:
                    txn.put(key, value)
            return
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)


def has_key(path, key):
    """Whether path holds an LMDB with `key` (False for a folder without data.mdb)."""
    if not os.path.isfile(os.path.join(path, "data.mdb")):
        return False
    with shared_env(path).begin(write=False) as txn:
        return txn.get(key) is not None


def is_query_set(path):
    """Whether the leaf LMDB at path carries a `query-meta` key (written by data_sampling.py)."""
    return has_key(path, QUERY_META_KEY)


def is_empty_query_set(path):
    """Whether the leaf LMDB at path is a query set that holds no sample (every answer of its import
    was unreadable): it counts as queried, its `unreadable-%09d` origins stay out of later pools, but
    it has nothing to train on."""
    if not is_query_set(path):
        return False
    with shared_env(path).begin(write=False) as txn:
        return read_num_samples(txn, path) == 0


def read_query_meta(path):
    """The decoded `query-meta` dict of a query set, or None."""
    with shared_env(path).begin(write=False) as txn:
        return read_meta(txn, QUERY_META_KEY, path)


def read_query_origins(root, skip=()):
    """Union of the origins `(relpath, index)` of every query set below root but those in `skip`
    (relpaths)."""
    origins = set()
    if not os.path.isdir(root):
        raise UserError(f"--train_data {root}: no such folder")
    for rel in find_lmdbs(root):
        if rel in skip:
            continue
        path = os.path.join(root, rel)
        with shared_env(path).begin(write=False) as txn:
            if txn.get(QUERY_META_KEY) is None:
                continue
            for index in range(1, read_num_samples(txn, path) + 1):
                origin = read_origin(txn, index, path)
                if origin is not None:
                    origins.add(origin)
            origins.update(read_unreadable_origins(txn, path))
    return origins


def read_unreadable_origins(txn, path=None):
    """The origins the query set at `path` records as unreadable (`unreadable-%09d`): queried,
    never trained on."""
    raw = txn.get(NUM_UNREADABLE_KEY) or b"0"
    if not raw.isdigit():
        raise UserError(f"{_lmdb_name(path)}: its key {NUM_UNREADABLE_KEY.decode()} holds {raw[:40]!r}, not a count; "
                        f"the LMDB is damaged: rebuild it (query and relabel sets: run their round again)")
    origins = []
    for index in range(1, int(raw) + 1):
        origin = parse_origin(txn.get(unreadable_key(index)), path, unreadable_key(index))
        if origin is not None:
            origins.append(origin)
    return origins
