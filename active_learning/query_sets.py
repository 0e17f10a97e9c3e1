"""Query sets under a training root: which leaf LMDBs are query sets, the round numbering of their
names, and the rules a new query set's name and folder must follow (data_sampling.py writes query
sets, import_annotations.py writes them from transcribers' answers)."""
import os
import re

from data_layer import leaf_selection
from data_layer import lmdb_format
from data_layer import set_records
import utils

ROUND_PATTERN = re.compile(r"_iter_(\d+)$")


def list_leaf_lmdbs(root):
    """{relpath: is_query_set} for every leaf LMDB below root (hidden folders, i.e. writes in
    progress, are skipped by lmdb_format.find_lmdbs)."""
    return {rel: set_records.is_query_set(os.path.join(root, rel)) for rel in lmdb_format.find_lmdbs(root)}


def unselected_query_sets(leaves, select_data, root):
    """Folder names of the query sets below root that no --select_data name selects, by round
    (k of *_iter_<k>) then name: the next training round needs them too. Empty query sets are left
    out: training has nothing to draw from them."""
    def order(name):
        match = ROUND_PATTERN.search(name)
        return (int(match.group(1)) if match else float("inf"), name)

    names = {rel.rsplit("/", 1)[-1] for rel, is_query in leaves.items()
             if is_query and not any(leaf_selection.selects(rel, n, root) for n in select_data)
             and not set_records.is_empty_query_set(os.path.join(root, rel))}
    return sorted(names, key=order)


def empty_names(select_data, leaves, root):
    """The --select_data names that select only empty query sets (every answer unreadable): they
    keep their images out of the pool but no next round's selection may name them, since training
    would find no sample there."""
    names = set()
    for name in select_data:
        chosen = [rel for rel in leaves if leaf_selection.selects(rel, name, root)]
        if chosen and all(leaves[rel] and set_records.is_empty_query_set(os.path.join(root, rel)) for rel in chosen):
            names.add(name)
    return names


def query_set_names(select_data, leaves, root):
    """The --select_data names that select only query sets (they are labelled: no pool)."""
    names = set()
    for name in select_data:
        chosen = [is_query for rel, is_query in leaves.items() if leaf_selection.selects(rel, name, root)]
        if chosen and all(chosen):
            names.add(name)
    return names


def next_round(leaves):
    """One past the largest k of the query sets named *_iter_<k>; 1 when there is none (the base
    round is round 0)."""
    rounds = [int(m.group(1)) for rel, is_query in leaves.items() if is_query
              for m in [ROUND_PATTERN.search(rel.rsplit("/", 1)[-1])] if m]
    return max(rounds, default=0) + 1


def check_out_name(name, leaves, root, flag="--out_name"):
    """A query set's name must be a folder that the LMDB finder sees (not hidden) and that
    `--select_data` can name alone: no path separator, no '-' (it splits --select_data), and no
    path component of another dataset (naming it would select that one too)."""
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise utils.UserError(f"{flag} {name!r}: give a plain folder name")
    if name.startswith("."):
        raise utils.UserError(f"{flag} {name}: names starting with '.' are hidden from the data finder "
                              f"(the next round would re-query these samples); drop the leading '.'")
    if "-" in name or any(not c.isprintable() or c.isspace() for c in name):
        raise utils.UserError(f"{flag} {name!r}: --select_data splits names at '-', and spaces or control "
                              f"characters break the next round's command; use letters, digits, '_' or '.'")
    others = sorted(rel for rel in leaves if rel != name and name in rel.split("/"))
    if others:
        raise utils.UserError(f"{flag} {name}: already a path component of {', '.join(others)} under {root}, "
                              f"so --select_data {name} would select those too; choose another name")


def replaceable_query_set(path):
    """Whether --overwrite may replace `path`: a real (not linked) leaf LMDB that this tool wrote."""
    return os.path.isdir(path) and not os.path.islink(path) and set_records.is_query_set(path)


def check_output_free(path, overwrite, flag="--out_name"):
    """The query set's path is free, or (with --overwrite) holds a query set this tool wrote."""
    if not os.path.lexists(path):
        return
    if not overwrite:
        raise utils.UserError(f"{path} already exists; choose another {flag} or pass --overwrite")
    if not replaceable_query_set(path):
        raise utils.UserError(f"--overwrite {path}: not a query set written by data_sampling.py (a base dataset, "
                              f"a link or another folder), so it is never replaced; choose another {flag}")
