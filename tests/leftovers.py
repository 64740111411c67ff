"""Find processes a test left behind: each run carries a unique tag in its environment,
which every process it starts inherits, so /proc tells whether any of them outlived it."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from ringlib.runtime.processes import processes_with


def tagged_env(tmp: Path, **extra: str) -> tuple[str, dict[str, str]]:
    """A NAME=value tag and an environment carrying it, with TMPDIR at tmp (created)."""
    tag = f"RINGLIB_TEST_TAG={uuid.uuid4().hex}"
    name, value = tag.split("=")
    tmp.mkdir()
    return tag, {**os.environ, name: value, "TMPDIR": str(tmp), **extra}


def assert_none_left(tag: str, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while processes_with(tag) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not processes_with(tag), "processes outlived the run that started them"
