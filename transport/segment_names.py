"""Names of shared-memory segments (shared.py), and the removal of those left behind.

The receiver unlinks a segment's name as soon as it has mapped it, and the sender one
never accepted. Offers of a rank killed outright stay: every survivor that loses it
removes them (names carry the ring's job and the offering rank), so does `ringlib launch`,
which removes every name of its job (`remove_job_segments`), and where every rank was
killed with no launcher to clean up, the next ring that starts on this host: names carry
the creating process's id and pid namespace too, and one whose creator is gone is
removed (`remove_orphans`).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import secrets

DIRECTORY = "/dev/shm"
PREFIX = "ringlib-"
JOB_VARIABLE = "RINGLIB_JOB"  # set by `ringlib launch`: names of one job share it


def _pid_space() -> str:
    """This process's pid namespace, as the inode of its /proc entry ("0" if unknown)."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"


_PID_SPACE = _pid_space()


def segment_name(job_name: str, rank: int, peer: int) -> str:
    """A new segment's name, for `rank`'s link to `peer`:
    ringlib-JOB-RANK-PEER-PID.SPACE-TOKEN."""
    return (f"{PREFIX}{job_name}-{rank}-{peer}-{os.getpid()}.{_PID_SPACE}-"
            f"{secrets.token_hex(6)}")


def job(peers: list[str]) -> str:
    """A ring's part of segment names: the launcher's job, or else one that every rank of
    the ring derives alike from its address table, so that each can find another's."""
    digest = hashlib.sha1(",".join(peers).encode()).hexdigest()[:12]
    return os.environ.get(JOB_VARIABLE) or f"r{digest}"


def remove_job_segments(job_name: str, rank: int | None = None) -> int:
    """Unlink every segment name of a job, or those that its `rank` offered (ranks may be
    killed before their peers take what they offered); return how many there were."""
    start = f"{PREFIX}{job_name}-" + ("" if rank is None else f"{rank}-")
    names = glob.glob(os.path.join(DIRECTORY, glob.escape(start)) + "*")
    for path in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return len(names)


def remove_orphans() -> int:
    """Unlink every segment name whose creating process is gone (the offers nobody took
    of processes killed outright); return how many there were. Only segments made in
    this process's pid namespace are judged: containers that share /dev/shm may not see
    each other's processes."""
    removed = 0
    with contextlib.suppress(FileNotFoundError):  # no /dev/shm: no segments either
        for name in os.listdir(DIRECTORY):
            pid = _creator(name)
            if pid is not None and not _alive(pid) and _ours(name):
                unlink(name)
                removed += 1
    return removed


def _ours(name: str) -> bool:
    """Whether this process's user owns segment `name` (/dev/shm is sticky: another
    user's is theirs to remove)."""
    try:
        return os.stat(os.path.join(DIRECTORY, name)).st_uid == os.getuid()
    except FileNotFoundError:
        return False


def _creator(name: str) -> int | None:
    """The id of the process that created segment `name`
    (ringlib-JOB-RANK-PEER-PID.SPACE-TOKEN), if that was in this pid namespace."""
    parts = name.rsplit("-", 2)
    if not name.startswith(PREFIX) or len(parts) != 3:
        return None
    pid, _, space = parts[1].partition(".")
    return int(pid) if pid.isdigit() and space == _PID_SPACE else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def unlink(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(DIRECTORY, name))
