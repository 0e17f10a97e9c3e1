"""Selecting leaf LMDBs: --select_data names against path components, the data folder checks,
identities grouped by leaf, unlabelled pools refused where labels are needed, and the origins the
selected query sets hold."""
import collections.abc
import os

from natsort import natsorted

from data_layer import lmdb_format
from data_layer import set_records
from utils import UserError


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
    leaves = lmdb_format.find_lmdbs(root)
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


def refuse_unlabelled(root, relpaths, flag=None):
    """Training and evaluation need labels: an unlabelled LMDB among `relpaths` is a UserError."""
    for rel in relpaths:
        path = os.path.normpath(os.path.join(root, rel))
        if set_records.is_unlabelled(path):
            raise UserError(f"{flag + ' ' if flag else ''}{path}: an unlabelled LMDB (create_lmdb_dataset.py "
                            f"--unlabelled) has no labels to train or evaluate on; leave it out here, query it "
                            f"with data_sampling.py and train on the query set import_annotations.py writes")


def selected_query_origins(root, select_data, flag="--train_data"):
    """Origins held by the query sets that `select_data` selects: training leaves them out of the
    base datasets' labelled parts (each sample is trained on once)."""
    queried = set()
    leaves = {rel for name in select_data for rel in select_leaves(root, [name], flag)}
    for rel in sorted(leaves):
        path = os.path.join(root, rel)
        if set_records.is_query_set(path):
            queried |= set_records.read_query_origins(path)
    return queried


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
