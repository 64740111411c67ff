"""The launcher's janitor: what a job leaves on this host goes with it, however the
launcher ends.

`ringlib launch` starts this beside the ranks, in a session of its own, as a script run
by its path (so that it starts in milliseconds: standard library only), with a pipe from
the launcher on its stdin. The launcher writes the process group of each rank it starts,
and the same negated once it has reaped that group (its id may then be reused by an
unrelated process, which the janitor must not touch). When the pipe closes, because the
launcher finished or because it was killed outright (SIGKILL gives it no chance to clean
up), the janitor kills every group it was told of and not told was reaped, with whatever
the ranks started in them, removes the job's shared-memory segments and its private
directory, and exits.

    python janitor.py SEGMENT_PREFIX WORKDIR      (stdin: one group id, or -id, a line)
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import sys


def main(prefix: str, workdir: str) -> int:
    groups: set[int] = set()
    for line in sys.stdin:  # until the pipe closes
        group = int(line) if line.strip() else 0
        if group > 0:
            groups.add(group)
        elif group < 0:
            groups.discard(-group)
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    for path in glob.glob(glob.escape(prefix) + "*"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
