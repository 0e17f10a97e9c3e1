"""What the loop writes beside the data, read back: query sets (meta, origins, unreadable answers),
relabel sets (meta, policy, order, the annotator's stream) and unlabelled pools."""
import collections.abc
import os

from natsort import natsorted

from active_learning import relabel_policies
from data_layer import lmdb_format
from utils import UserError


def is_unlabelled(path):
    """Whether the leaf LMDB at path was built without labels (create_lmdb_dataset.py --unlabelled)."""
    return lmdb_format.has_key(path, lmdb_format.UNLABELLED_KEY)


# ---------------------------------------------------------------------------------------------
# relabel sets: new labels for samples trained on already (data_sampling.py --relabel_ratio)


class RelabelEntry(collections.namedtuple("RelabelEntry", "clean_label noisy_label kind relpath index policy")):
    """A re-annotation: the relabel set's label (None when a human annotator found the image
    unreadable: the sample leaves training, whatever the policy), the simulated annotator's error
    on it (None when it got it right), where the relabel set holds it (index None for an unreadable
    answer) and the set's policy (relabel_policies)."""


def is_relabel_set(path):
    """Whether the leaf LMDB at path carries a `relabel-meta` key (a relabel set)."""
    return lmdb_format.has_key(path, lmdb_format.RELABEL_META_KEY)


def read_relabel_meta(path):
    """The decoded `relabel-meta` dict of a relabel set, or None."""
    with lmdb_format.shared_env(path).begin(write=False) as txn:
        return lmdb_format.read_meta(txn, lmdb_format.RELABEL_META_KEY, path)


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


def relabel_leaves(root, relpaths):
    """The relabel sets among `relpaths` (relative to root)."""
    return [rel for rel in relpaths if is_relabel_set(os.path.join(root, rel))]


def is_query_set(path):
    """Whether the leaf LMDB at path carries a `query-meta` key (written by data_sampling.py)."""
    return lmdb_format.has_key(path, lmdb_format.QUERY_META_KEY)


def is_empty_query_set(path):
    """Whether the leaf LMDB at path is a query set that holds no sample (every answer of its import
    was unreadable): it counts as queried, its `unreadable-%09d` origins stay out of later pools, but
    it has nothing to train on."""
    if not is_query_set(path):
        return False
    with lmdb_format.shared_env(path).begin(write=False) as txn:
        return lmdb_format.read_num_samples(txn, path) == 0


def read_query_meta(path):
    """The decoded `query-meta` dict of a query set, or None."""
    with lmdb_format.shared_env(path).begin(write=False) as txn:
        return lmdb_format.read_meta(txn, lmdb_format.QUERY_META_KEY, path)


def read_query_origins(root, skip=()):
    """Union of the origins `(relpath, index)` of every query set below root but those in `skip`
    (relpaths)."""
    origins = set()
    if not os.path.isdir(root):
        raise UserError(f"--train_data {root}: no such folder")
    for rel in lmdb_format.find_lmdbs(root):
        if rel in skip:
            continue
        path = os.path.join(root, rel)
        with lmdb_format.shared_env(path).begin(write=False) as txn:
            if txn.get(lmdb_format.QUERY_META_KEY) is None:
                continue
            for index in range(1, lmdb_format.read_num_samples(txn, path) + 1):
                origin = lmdb_format.read_origin(txn, index, path)
                if origin is not None:
                    origins.add(origin)
            origins.update(read_unreadable_origins(txn, path))
    return origins


def read_unreadable_origins(txn, path=None):
    """The origins the query set at `path` records as unreadable (`unreadable-%09d`): queried,
    never trained on."""
    raw = txn.get(lmdb_format.NUM_UNREADABLE_KEY) or b"0"
    if not raw.isdigit():
        raise UserError(f"{lmdb_format._lmdb_name(path)}: its key {lmdb_format.NUM_UNREADABLE_KEY.decode()} holds {raw[:40]!r}, not a count; "
                        f"the LMDB is damaged: rebuild it (query and relabel sets: run their round again)")
    origins = []
    for index in range(1, int(raw) + 1):
        origin = lmdb_format.parse_origin(txn.get(lmdb_format.unreadable_key(index)), path, lmdb_format.unreadable_key(index))
        if origin is not None:
            origins.append(origin)
    return origins
