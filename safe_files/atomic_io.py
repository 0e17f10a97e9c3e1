"""Outputs written atomically, and the temporaries that make it so.

An output is never seen half-written: `atomic_path(path)` (and `atomic_write_text`,
`atomic_torch_save` built on it) writes to a temporary in the output's own folder and, only if the
block succeeds, renames it onto `path` with `os.replace`, which replaces the old file in one step
on the same file system (a folder output is staged with `make_temp_dir` the same way by its
caller). On any failure the temporary is removed and a file already at `path` stays as it was.
The rename is atomic, not durable: nothing is fsynced, so a power cut may still lose the newest
write. `append_text` appends in place and is not atomic.

A temporary is named `.<name>.<pid>-<start>.<host tag>.<random><suffix>` (`TEMP_NAME`): hidden by
the leading dot, so that lmdb_format.find_lmdbs skips it; `<name>` is the output's name cut to its
first 200 UTF-8 bytes; `<pid>` is the creating process's id and `<start>` its start time in clock
ticks since boot (field 22 of /proc/<pid>/stat; absent where /proc is missing, and in the names of
older versions): the two tell the creator from a later process that got the same pid; `<host tag>`
is 8 hex digits, the first 4 bytes of the BLAKE2b hash of the host name; `<random>` is 8 random
hex digits; `<suffix>` is `.tmp` (or `.old` for an output moved aside). It is made with the umask's
usual mode (0666 / 0777 less the umask), which the rename carries to the output.

Before each new temporary, `remove_stale_temporaries` cleans its folder of those a killed run left:
names of exactly that form, with this host's tag, whose creator no longer runs (no process has its
pid, or the one that has started at another tick) and whose mtime is older than this process's
start, taken to the clock tick (a pid may look dead from another pid namespace, whose writer keeps
its temporary's mtime recent). Temporaries of running writers, of other hosts or of any other form
are never touched, and cleaning errors are ignored. A full or read-only disk's OSError that names no file, or names a temporary, is made to
name the output the user asked for (`blame_output`)."""
import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import stat
import time

import torch


# errno values of an OSError the user can fix by choosing another place or freeing space.
DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}

# A temporary's name carries its creator's pid and host, so that a later run can tell the ones a
# killed run left (the pid is gone) from those a running writer still needs. Only names of this
# exact form are ever removed.
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>[0-9]+)(?:-(?P<start>[0-9]+))?\.(?P<host>[0-9a-f]{8})\.[0-9a-f]{8}"
                       r"\.(?:tmp|old)$")
MAX_TEMP_STEM = 200  # bytes of the output's name kept: the temporary's name stays under 255 bytes


def host_tag():
    return hashlib.blake2b(socket.gethostname().encode("utf-8"), digest_size=4).hexdigest()


def temp_name(name, suffix=".tmp"):
    """`.<name>.<pid>-<start ticks>.<host tag>.<random>.tmp` (or `.old`): hidden, so that
    lmdb_format.find_lmdbs skips it."""
    stem = name.encode("utf-8", "surrogateescape")[:MAX_TEMP_STEM].decode("utf-8", "ignore")
    ticks = start_ticks(os.getpid())
    creator = f"{os.getpid()}" if ticks is None else f"{os.getpid()}-{ticks}"
    return f".{stem}.{creator}.{host_tag()}.{secrets.token_hex(4)}{suffix}"


def _create_temp(parent, name, suffix, create):
    os.makedirs(parent, exist_ok=True)
    remove_stale_temporaries(parent)
    while True:
        path = os.path.join(parent, temp_name(name, suffix))
        try:
            create(path)
            return path
        except FileExistsError:
            continue


def make_temp_file(parent, name, suffix=".tmp"):
    """Create an empty hidden temporary file in `parent` for an output called `name`; returns its
    path. Its mode is 0666 less the umask, as for any new file (tempfile.mkstemp makes 0600, which
    the rename would carry to the output). Stale temporaries in `parent` are removed first."""
    def create(path):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666))

    return _create_temp(parent, name, suffix, create)


def make_temp_dir(parent, name, suffix=".tmp"):
    """As `make_temp_file`, a folder (mode 0777 less the umask; tempfile.mkdtemp makes 0700)."""
    return _create_temp(parent, name, suffix, lambda path: os.mkdir(path, 0o777))


def pid_alive(pid):
    """Whether a process with this id exists on this host (one of another user counts)."""
    if pid <= 0:
        return True  # 0 and negative ids address process groups: never taken as a dead writer
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # not ours to signal, or no pid at all: undecidable, so alive
        return True
    return True


def start_ticks(pid):
    """When process `pid` started, in clock ticks since boot (field 22 of /proc/<pid>/stat); None
    where that cannot be read (no such process, no /proc)."""
    try:
        # the command name (field 2) may hold spaces and ')': count from the last ')'
        return int(_read_proc(f"/proc/{int(pid)}/stat").rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError, OverflowError):
        return None


def _read_proc(path):
    """The text of a small /proc file (read with os calls: the writers here may replace `open`)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        return os.read(fd, 4096).decode("ascii", "replace")
    finally:
        os.close(fd)


def creator_alive(pid, ticks):
    """Whether the process that made a temporary still runs: one has its pid and, when the name
    records the creator's start (`ticks`, None in older names), started at that tick."""
    if not pid_alive(pid):
        return False
    if ticks is None:
        return True
    now = start_ticks(pid)
    return now is None or now == ticks  # an unreadable start is undecidable: alive


def process_start_time():
    """This process's start, in seconds since the epoch, to the clock tick: now less the time since
    it started (the time since boot less its start ticks; /proc/stat's btime is whole seconds, too
    coarse to tell a run killed a second ago from this one). Where /proc is missing: when atomic_io
    was imported."""
    ticks = start_ticks(os.getpid())
    if ticks is None:
        return _IMPORTED_AT
    try:
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):
        try:
            since_boot = float(_read_proc("/proc/uptime").split()[0])
        except (OSError, ValueError, IndexError):
            return _IMPORTED_AT
    return time.time() - (since_boot - ticks / os.sysconf("SC_CLK_TCK"))


_IMPORTED_AT = time.time()


def remove_stale_temporaries(folder):
    """Remove the temporaries (`temp_name`) in `folder` that a run killed mid-write left behind:
    made on this host by a process that no longer runs (`creator_alive`), and before this process
    started (a pid can look dead from another pid namespace). Returns the removed paths; errors
    are ignored (a folder we cannot clean still gets its proper error when written to)."""
    try:
        entries = os.listdir(folder)
    except OSError:
        return []
    removed = []
    started = None
    host = host_tag()
    for entry in entries:
        match = TEMP_NAME.match(entry)
        if not match or match["host"] != host:
            continue
        if creator_alive(int(match["pid"]), None if match["start"] is None else int(match["start"])):
            continue
        path = os.path.join(folder, entry)
        try:
            info = os.lstat(path)
        except OSError:
            continue
        started = process_start_time() if started is None else started
        if info.st_mtime >= started:
            continue
        try:
            if stat.S_ISDIR(info.st_mode):
                shutil.rmtree(path)
            else:
                os.remove(path)
        except OSError:
            continue
        removed.append(path)
    return removed


def blame_output(err, path):
    """Make an OSError of a full or read-only disk that names no file, or a file whose path holds
    one of our temporaries, name `path` instead: the output the user asked for."""
    if err.errno not in DISK_FULL | NOT_WRITABLE:
        return err
    named = os.fsdecode(err.filename) if isinstance(err.filename, (str, bytes, os.PathLike)) else None
    if named is None or any(TEMP_NAME.match(part) for part in named.split(os.sep)):
        err.filename, err.filename2 = os.fspath(path), None
    return err


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary sibling path (`make_temp_file`); rename it onto `path` only if the block
    succeeds. A full or read-only disk's OSError names `path` (`blame_output`)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path)) or "."
    tmp = None
    try:
        tmp = make_temp_file(directory, os.path.basename(path))
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        blame_output(err, path)
        raise
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)


def append_text(path, text):
    """Append UTF-8 `text` to the file at path (made when missing). A full disk's OSError, which
    names no file, names path (`blame_output`)."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as err:
        raise blame_output(err, path)


class _KeptErrorWriter:
    """A binary file whose write keeps the first OSError it raises: torch's zip writer turns a
    failed write into a RuntimeError ("unexpected pos ...") that names neither the file nor the
    errno, so the OSError is raised again in its place."""

    def __init__(self, f):
        self.f = f
        self.error = None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self):
        self.f.flush()


def atomic_torch_save(obj, path):
    """torch.save to `path` atomically; a full or read-only disk is an OSError naming `path`."""
    with atomic_path(path) as tmp:
        # through a Python file, so that a full disk is an OSError (torch.save to a path raises a
        # RuntimeError that names no errno)
        with open(tmp, "wb") as f:
            writer = _KeptErrorWriter(f)
            try:
                torch.save(obj, writer)
            except RuntimeError:
                if writer.error is None:
                    raise
                raise writer.error from None


def atomic_write_text(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
