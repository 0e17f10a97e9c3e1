"""Writing LMDBs: samples into a new LMDB built in a hidden temporary folder and renamed into place
(atomic_io), never over an existing one unless asked to."""
import json
import os
import shutil

import lmdb

from data_layer import lmdb_format
from safe_files import atomic_io
from utils import UserError

COMMIT_EVERY = 1000


def write_lmdb(output_path, samples, meta=None, overwrite=False, extra_files=None, extra_keys=None,
               meta_key=lmdb_format.QUERY_META_KEY):
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
        lmdb_format.forget_env(dst)
        # A folder cannot be renamed onto a non-empty one: move the old one aside first.
        trash = atomic_io.make_temp_dir(os.path.dirname(dst), os.path.basename(dst), suffix=".old")
        os.replace(dst, os.path.join(trash, "old"))
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dst)


def write_into(path, samples, meta, name=None, extra_keys=None, meta_key=lmdb_format.QUERY_META_KEY):
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
            pending.append((lmdb_format.image_key(count), bytes(image_bytes)))
            pending.append((lmdb_format.label_key(count), label.encode("utf-8")))
            if origin is not None:
                pending.append((lmdb_format.origin_key(count), f"{origin[0]}\t{int(origin[1])}".encode("utf-8")))
            if len(pending) >= 2 * COMMIT_EVERY:
                _lmdb_write(name or path, put_all, env, pending)
                pending = []
        pending.append((lmdb_format.NUM_SAMPLES_KEY, str(count).encode()))
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
