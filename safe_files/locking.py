"""An exclusive, advisory lock on a data folder, so that two runs that write into one training root
(two samplers at once, a sampler and an import) take turns instead of picking the same samples.

The lock is `flock` on a hidden file in the folder: the kernel releases it when the holder exits,
however it exits (SIGKILL included), so a crashed run never leaves the folder locked. The file
records the holder (pid, host, command, time) for the message the next run prints; a finished
holder removes it (a killed one leaves it, unlocked, for the next run to take). `flock` is per host: on a network file system shared by several machines it may not
exclude runs on different machines."""
import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from datetime import datetime, timezone

from utils import UserError

LOCK_FILE = ".robust-al.lock"
POLL_SECONDS = 0.2


def lock_path(folder):
    return os.path.join(folder, LOCK_FILE)


def describe_holder(path):
    """The holder record of a lock file as one phrase; empty when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return ""
    if not isinstance(holder, dict) or "pid" not in holder:
        return ""
    return (f"pid {holder.get('pid')} on {holder.get('host', '?')} since {holder.get('since', '?')}: "
            f"{holder.get('command', '?')}")


def _open_lock_file(path, flag):
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise UserError(f"{flag} {os.path.dirname(path)}: cannot create the lock file {LOCK_FILE} there "
                        f"({os.strerror(err.errno)}); give a writable folder") from None


def _try_lock(fd):
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def _record_holder(fd):
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)


def _still_current(fd, path):
    """Whether the locked file is still the one at `path`: a holder that finished unlinks it, and
    a lock on the unlinked file would exclude nobody."""
    try:
        held, current = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino)


def _acquire(path, flag, on_busy):
    """An open descriptor of `path` holding the lock; `on_busy()` is called while another holds
    it and raises when the wait is over (deadline passed)."""
    while True:
        fd = _open_lock_file(path, flag)
        try:
            if _try_lock(fd):
                if _still_current(fd, path):
                    return fd
            else:
                on_busy()
                time.sleep(POLL_SECONDS)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def say(text):
    """Print at once: a waiting run's log may be a pipe, which would hold the line back."""
    print(text, flush=True)


@contextlib.contextmanager
def exclusive(folder, timeout=0.0, flag="--train_data", announce=say):
    """Hold the folder's lock for the block. `timeout`: seconds to wait for another holder
    (0: fail at once, negative: wait without limit); a busy lock after that is a UserError naming
    the holder. The lock file is removed when the block ends."""
    path = lock_path(folder)
    deadline = None if timeout < 0 else time.monotonic() + timeout
    announced = []

    def on_busy():
        holder = describe_holder(path) or "another run"
        if timeout == 0:
            raise UserError(f"{flag} {folder} is in use by {holder}; wait for it to finish, or pass "
                            f"--lock_timeout SECONDS (-1: no limit) to wait for it")
        if deadline is not None and time.monotonic() >= deadline:
            raise UserError(f"{flag} {folder} is still in use by {holder} after --lock_timeout {timeout:g} s; "
                            f"wait longer or run it later")
        if not announced:
            announced.append(True)
            announce(f"waiting for {flag} {folder}, in use by {holder}"
                     + (f" (at most {timeout:g} s)" if timeout > 0 else ""))

    fd = _acquire(path, flag, on_busy)
    try:
        _record_holder(fd)
        yield path
    finally:
        # Unlinked while still held, so that a waiter never takes a lock on a file nobody sees.
        with contextlib.suppress(OSError):
            os.unlink(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
