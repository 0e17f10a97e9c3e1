"""The DTRB LMDB layout and its reading: keys (`num-samples`, `image-%09d`, `label-%09d`, 1-based;
origins, meta keys), one shared read-only environment per LMDB and process, counts, labels and
origins, and the leaf LMDBs below a folder (docs/DESIGN.md, "LMDB format")."""
import json
import os

import lmdb
from natsort import natsorted

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


def has_key(path, key):
    """Whether path holds an LMDB with `key` (False for a folder without data.mdb)."""
    if not os.path.isfile(os.path.join(path, "data.mdb")):
        return False
    with shared_env(path).begin(write=False) as txn:
        return txn.get(key) is not None
