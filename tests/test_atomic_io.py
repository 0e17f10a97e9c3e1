"""atomic_io: outputs renamed into place only when complete, the modes and names of their
temporaries, and the removal of those a killed writer left."""
import errno
import io
import os
import stat

import pytest
import torch

from safe_files import atomic_io


# ------------------------------------------------------------------------------ errors of the surroundings

def test_a_failed_write_names_the_output_not_its_temporary(tmp_path, monkeypatch):
    target = tmp_path / "out" / "model.pth"
    with pytest.raises(OSError) as info:
        with atomic_io.atomic_path(target):
            raise OSError(errno.ENOSPC, "No space left on device")  # as file.write raises it: no file name
    assert info.value.filename == str(target)
    assert os.listdir(tmp_path / "out") == []

    # torch.save to a path reports a full disk as a RuntimeError without errno; through a Python
    # file it is the OSError the wrapper understands
    class FullDisk(io.RawIOBase):
        def writable(self):
            return True

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic_io, "open", lambda *args, **kwargs: FullDisk(), raising=False)
    with pytest.raises(OSError) as info:
        atomic_io.atomic_torch_save({"w": torch.zeros(3)}, target)
    assert (info.value.errno, info.value.filename) == (errno.ENOSPC, str(target))
    assert os.listdir(tmp_path / "out") == []


# ------------------------------------------------------------------------------ temporaries

@pytest.fixture
def umask():
    """Set the process umask for one test (restored afterwards)."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_outputs_and_temporaries_follow_the_umask(tmp_path, umask):
    # mkstemp / mkdtemp would make 0600 / 0700 whatever the umask, and the rename keeps the mode
    for mask, file_mode, dir_mode in ((0o022, 0o644, 0o755), (0o027, 0o640, 0o750), (0o077, 0o600, 0o700)):
        umask(mask)
        path = tmp_path / f"report_{mask:o}.json"
        atomic_io.atomic_write_text(path, "{}")
        assert mode_of(path) == file_mode
        assert mode_of(atomic_io.make_temp_file(str(tmp_path), "x")) == file_mode
        assert mode_of(atomic_io.make_temp_dir(str(tmp_path), "x")) == dir_mode


def test_temporary_names_carry_pid_and_host(tmp_path):
    name = os.path.basename(atomic_io.make_temp_dir(str(tmp_path), "random_iter_1"))
    match = atomic_io.TEMP_NAME.match(name)
    assert match and match["name"] == "random_iter_1" and int(match["pid"]) == os.getpid()
    assert match["host"] == atomic_io.host_tag() and name.endswith(".tmp")
    assert atomic_io.make_temp_file(str(tmp_path), "a.b.c", suffix=".old").endswith(".old")


def dead_pid():
    """A process id no process can have: above the kernel's largest."""
    try:
        with open("/proc/sys/kernel/pid_max", encoding="ascii") as f:
            return int(f.read()) + 1
    except OSError:
        return 2 ** 22 + 1


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    host, dead, alive = atomic_io.host_tag(), dead_pid(), os.getppid()
    assert not atomic_io.pid_alive(dead) and atomic_io.pid_alive(alive)
    long_ago = atomic_io.process_start_time() - 3600
    entries = {
        f".rounds.csv.{dead}.{host}.0123abcd.tmp": ("file", long_ago, "removed"),
        f".random_iter_1.{dead}.{host}.89abcdef.tmp": ("dir", long_ago, "removed"),
        f".CVPR2016.{dead}.{host}.00000000.old": ("dir", long_ago, "removed"),
        f".results.json.{alive}.{host}.0123abcd.tmp": ("file", long_ago, "kept"),   # its writer runs
        f".results.json.{dead}.{host}.fedcba98.tmp": ("file", None, "kept"),       # made after our start
        f".results.json.{dead}.0badf00d.0123abcd.tmp": ("file", long_ago, "kept"),  # another host's
        ".results.json.k2j_x9qa.tmp": ("file", long_ago, "kept"),                  # no pid: not ours to judge
        f"results.json.{dead}.{host}.0123abcd.tmp": ("file", long_ago, "kept"),    # not hidden
        "keep.txt": ("file", long_ago, "kept"),
    }
    for name, (kind, mtime, _) in entries.items():
        path = tmp_path / name
        if kind == "dir":
            (path / "inner").mkdir(parents=True)
            (path / "inner" / "data.mdb").write_bytes(b"x" * 100)
        else:
            path.write_bytes(b"x")
        if mtime is not None:
            os.utime(path, (mtime, mtime))

    atomic_io.atomic_write_text(tmp_path / "results.json", "{}")  # any atomic write cleans its folder
    left = set(os.listdir(tmp_path))
    assert left == {name for name, (_, _, fate) in entries.items() if fate == "kept"} | {"results.json"}
