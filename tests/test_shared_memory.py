"""Shared-memory links (transport/shared.py): the ring of records on its own, then rings of
real processes that use it, a ring spread over two "hosts" (mount namespaces with /dev/shm
of their own), mismatches and kills on this path, and /dev/shm left as it was found."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest

from leftovers import assert_none_left, tagged_env
from netns import can_unshare, namespaced
from ring_harness import ringlib_env, run_ranks
from ringlib.errors import ProtocolError
from ringlib.transport import segment_names, shared
from ringlib.transport.addresses import local_addresses
from ringlib.transport.frames import data, pack, unpack

pytestmark = pytest.mark.timeout(180)
PEER = str(Path(__file__).with_name("shm_peer.py"))


def ours(job: str = "") -> set[str]:
    """ringlib's names in /dev/shm (of one job: ranks started by a test carry their own)."""
    prefix = segment_names.PREFIX + job
    return {n for n in os.listdir(segment_names.DIRECTORY) if n.startswith(prefix)}


def launched_since(before: set[str]) -> set[str]:
    """Names of launcher jobs that appeared since `before`."""
    return {n for n in ours("L") if n not in before}


@pytest.fixture
def link():
    """A writer and the reader of its segment, in this process; what arrives is kept."""
    got: list = []
    writer = shared.Writer("test", 0, 1, 1 << 16)
    reader = shared.Reader(writer.name, writer.nonce, writer.capacity,
                           lambda header, payload: got.append((unpack(header), payload)))
    writer.accepted()
    yield writer, reader, got
    writer.close()
    reader.close()


def header(seq: int, nbytes: int) -> bytes:
    return pack(data(seq, 0, 0, "sig", 0, nbytes))


def test_records_arrive_intact_across_wraps_and_out_of_order_releases(link, rng, seed):
    writer, reader, got = link
    assert writer.name not in ours()  # the reader unlinked it once mapped
    held, sent = [], {}
    for seq in range(2000):
        payload = rng.integers(0, 256, int(rng.integers(0, 9000)), dtype=np.uint8)
        if writer.write(header(seq, payload.size), payload) is None:
            assert held, f"seed {seed}: a ring with nothing held refused {payload.size} bytes"
            held.pop(int(rng.integers(len(held)))).release()  # any order at all
            continue
        sent[seq] = payload
        reader.poll()
        h, p = got.pop()
        assert h.seq == seq and bytes(p.buffer) == payload.tobytes(), f"seed {seed}, #{seq}"
        held.append(p)
        if len(held) > 4:
            held.pop(int(rng.integers(len(held)))).release()
    assert writer.head > 10 * writer.capacity, "the test never wrapped the ring"


def test_a_full_ring_refuses_until_the_oldest_record_is_released(link):
    writer, reader, got = link
    payload = np.zeros(20_000, np.uint8)
    assert writer.write(header(1, payload.size), payload) is not None
    assert writer.write(header(2, payload.size), payload) is not None
    reader.poll()
    assert writer.write(header(3, payload.size), payload) is not None
    assert writer.write(header(4, payload.size), payload) is None  # 4 x 20 KB > 64 KiB
    reader.poll()
    got[1][1].release()   # a later record first: the tail cannot move yet
    assert writer.write(header(4, payload.size), payload) is None
    got[0][1].release()
    assert writer.write(header(4, payload.size), payload) is not None


def test_the_writer_hears_whether_the_reader_sleeps(link):
    writer, reader, _ = link
    assert writer.write(header(1, 0), None)[0] is True     # asleep until the reader says
    reader.awake()
    assert writer.write(header(2, 0), None)[0] is False
    reader.asleep()
    assert reader.poll() == 2                               # as SharedLinks.sleep() does
    assert writer.write(header(3, 0), None)[0] is True


def test_a_corrupt_ring_breaks_the_link_and_delivers_nothing_more(link):
    writer, reader, got = link
    writer.write(header(1, 3), b"abc")
    shared._RECORD.pack_into(writer._view, 0, 5000, 0)  # a header longer than any
    assert reader.poll() == 0 and reader.broken and not got


def test_a_stranger_segment_or_a_wrong_nonce_is_refused_and_left_alone():
    writer = shared.Writer("test", 0, 1, 4096)
    try:
        with pytest.raises(ProtocolError, match="nonce"):
            shared.Reader(writer.name, writer.nonce ^ 1, writer.capacity, print)
        with pytest.raises(ProtocolError, match="not a ringlib segment"):
            shared.Reader("../etc/passwd", writer.nonce, writer.capacity, print)
        with pytest.raises(FileNotFoundError):
            shared.Reader(segment_names.PREFIX + "nobody", writer.nonce, writer.capacity, print)
        assert writer.name in ours()
    finally:
        writer.close()
    assert writer.name not in ours()


def run_shm(scenario: str, world: int, transport: str, seed: int, extra: dict | None = None,
            expendable: frozenset[int] = frozenset()):
    """Run shm_peer.py on `world` ranks of one job; check it left nothing in /dev/shm."""
    job = f"t{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="rl-") as ipc_dir:
        peers = local_addresses(world, transport, ipc_dir)
        envs = [{**ringlib_env(r, world, peers), segment_names.JOB_VARIABLE: job, **(extra or {})}
                for r in range(world)]
        finished = run_ranks([PEER, scenario, str(seed)], envs, 150, expendable)
    assert not ours(job), f"left in /dev/shm: {ours(job)}"
    return finished


def single_copy_works() -> bool:
    """Whether another process may read this one's memory here (ptrace rules permitting)."""
    word = np.array([12345], np.uint64)
    probe = (f"import sys; from ringlib.transport import single_copy; "
             f"sys.exit(0 if single_copy.readable({os.getpid()}, {word.ctypes.data}, 12345) "
             "else 1)")
    return subprocess.run([sys.executable, "-c", probe]).returncode == 0


def report(finished) -> str:
    return "\n".join(f"--- rank {f.rank} exit {f.returncode}\n{f.stdout}{f.stderr[-2000:]}"
                     for f in finished)


@pytest.mark.parametrize("transport, world, extra", [
    ("tcp", 2, {}),
    ("ipc", 3, {}),
    # Pieces of 64 KiB into rings of 128 KiB: most of the ring's pieces find it full and
    # take the sockets, mixed with those that fit.
    ("tcp", 3, {"RINGLIB_SEGMENT_BYTES": "65536", "RINGLIB_SHM_BYTES": "131072"}),
])
def test_rings_on_one_host_move_collectives_through_shared_memory(transport, world, extra,
                                                                  seed):
    finished = run_shm("check", world, transport, seed, extra)
    assert all(f.returncode == 0 for f in finished), report(finished)
    assert len({f.stdout.split("checked")[1] for f in finished}) == 1, \
        f"ranks disagree bit for bit:\n{report(finished)}"
    for f in finished:
        others = ",".join(str(r) for r in range(world) if r != f.rank)
        assert f"shared {others}" in f.stdout
        # Ranks that may read each other's memory take single copies (and, 2 of them, the
        # pairwise all-reduce): wherever this process may read its own through the call.
        if single_copy_works():
            assert f"reaches {others}" in f.stdout, report(finished)
        assert "named 0" in f.stdout, "a taken segment kept its name in /dev/shm"


def test_lent_halves_that_find_no_room_travel_as_messages(seed):
    """4 KiB rings hold a few records: most of 24 pairwise all-reduces in flight at once
    cannot lend their half by address and fall back to sending it."""
    finished = run_shm("crowd", 2, "tcp", seed, {"RINGLIB_SHM_BYTES": "4096"})
    assert all(f.returncode == 0 for f in finished), report(finished)
    assert finished[0].stdout.split()[-1] == finished[1].stdout.split()[-1], report(finished)


def test_with_shared_memory_off_the_sockets_carry_everything(seed):
    finished = run_shm("check", 2, "tcp", seed, {"RINGLIB_SHM_BYTES": "0", "EXPECT_SHARED": "0"})
    assert all(f.returncode == 0 for f in finished), report(finished)
    assert all("shared -" in f.stdout for f in finished), report(finished)


@pytest.mark.parametrize("world", [2, 3])  # the pairwise all-reduce, and the ring
def test_every_rank_raises_mismatch_over_shared_memory_and_carries_on(world, seed):
    finished = run_shm("mismatch", world, "tcp", seed)
    assert all(f.returncode == 0 for f in finished), report(finished)
    for f in finished:
        assert f.stdout.count("mismatch") == 2 and "recovered" in f.stdout, report(finished)


@pytest.mark.parametrize("world", [2, 3])  # amid pairwise all-reduces, and ring ones
def test_a_killed_rank_is_lost_to_every_other_rank_and_survivors_remove_its_offers(world,
                                                                                   seed):
    victim = world - 1
    finished = run_shm("die", world, "tcp", seed, {"PEER_TIMEOUT": "2"},
                       expendable=frozenset({victim}))
    assert finished[victim].returncode == -9, report(finished)
    assert [f.returncode for f in finished[:victim]] == [0] * victim, report(finished)
    assert all(f"lost {victim}" in f.stdout for f in finished[:victim]), report(finished)


def test_dev_shm_is_left_as_it_was_after_a_launched_run_with_a_kill(tmp_path, seed):
    before = ours()
    tag, env = tagged_env(tmp_path / "tmp")
    done = subprocess.run([sys.executable, "-m", "ringlib", "launch", "-n", "3", "--",
                           sys.executable, PEER, "die", str(seed)],
                          env={**env, "PEER_TIMEOUT": "2"}, capture_output=True, text=True,
                          timeout=120)
    assert_none_left(tag)
    assert done.returncode == 128 + 9, done.stdout + done.stderr  # the victim's code
    assert not launched_since(before), f"left in /dev/shm: {launched_since(before)}"


def test_the_launcher_removes_what_a_killed_rank_offered_and_nobody_took(tmp_path, seed):
    before = ours()
    done = subprocess.run([sys.executable, "-m", "ringlib", "launch", "-n", "1", "--",
                           sys.executable, PEER, "orphan", str(seed)],
                          capture_output=True, text=True, timeout=60)
    assert "offered" in done.stdout and done.returncode == 128 + 9, done.stdout + done.stderr
    assert "removed 1 shared-memory segments" in done.stderr
    assert not launched_since(before)


def test_what_ranks_killed_without_a_launcher_offered_goes_with_the_next_ring_here(seed):
    """No launcher to clean up: the next ring to start on this host removes offers whose
    creating process is gone, and none of a process that lives."""
    before = ours()
    orphan = subprocess.run([sys.executable, PEER, "orphan", str(seed)], timeout=60,
                            capture_output=True, text=True,
                            env={**os.environ, "RINGLIB_RANK": "0", "RINGLIB_WORLD_SIZE": "1"})
    assert "offered" in orphan.stdout and orphan.returncode == -9, orphan.stderr
    left = ours() - before
    assert len(left) == 1, left
    mine = shared.Writer("alive", 0, 99, 4096)  # of this process, which lives
    try:
        finished = run_shm("check", 2, "tcp", seed)
        assert all(f.returncode == 0 for f in finished), report(finished)
        assert not left & ours() and mine.name in ours()
    finally:
        mine.close()


def test_offers_made_in_another_pid_namespace_are_never_taken_for_orphans():
    """A container that shares /dev/shm but not its pids sees none of another's processes:
    only names made in this pid namespace, and by this user, are judged by whether their
    creator lives."""
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid is free now (and not soon reused)
    space = segment_names._PID_SPACE
    names = {case: f"{segment_names.PREFIX}test{uuid.uuid4().hex[:8]}-0-1-{gone.pid}.{where}-ab"
             for case, where in (("here", space), ("elsewhere", space + "0"),
                                 ("another user's", space))}
    for name in names.values():
        (Path(segment_names.DIRECTORY) / name).touch()
    if os.geteuid() == 0:  # /dev/shm is sticky: another user's name is not ours to remove
        os.chown(Path(segment_names.DIRECTORY) / names["another user's"], 65534, 65534)
    try:
        segment_names.remove_orphans()
        left = {case for case, name in names.items()
                if (Path(segment_names.DIRECTORY) / name).exists()}
        assert left == ({"elsewhere", "another user's"} if os.geteuid() == 0 else {"elsewhere"})
    finally:
        for name in names.values():
            segment_names.unlink(name)


@pytest.mark.skipif(not can_unshare(), reason="needs root and unshare to give ranks a "
                    "/dev/shm of their own (a second host as far as shared memory goes)")
def test_a_ring_over_two_hosts_takes_shared_memory_within_each(seed, tmp_path):
    """Ranks 0 and 1 share this /dev/shm; ranks 2 and 3 share another. Both pairs must use
    shared memory between themselves and tcp across, and agree on every result."""
    world, peers = 4, local_addresses(4, "tcp", "")
    base = {k: v for k, v in os.environ.items() if not k.startswith("RINGLIB_")}
    envs = [{**base, **ringlib_env(r, world, peers), "EXPECT_SHARED": "1"} for r in range(world)]
    logs = [tmp_path / f"r{r}.log" for r in range(world)]
    host_b = " & ".join(f"RINGLIB_RANK={r} {sys.executable} {PEER} check {seed} > {logs[r]} 2>&1"
                        for r in (2, 3)) + " & wait"
    procs = [subprocess.Popen([sys.executable, PEER, "check", str(seed)], env=envs[r],
                              stdout=open(logs[r], "w"), stderr=subprocess.STDOUT)
             for r in (0, 1)]
    procs.append(subprocess.Popen(namespaced(["sh", "-c", host_b]), env=envs[2]))
    try:
        for p in procs:
            p.wait(timeout=150)
    finally:
        for p in procs:
            p.kill()
    out = {r: logs[r].read_text() for r in range(world)}
    everything = "\n".join(f"--- rank {r}\n{o}" for r, o in out.items())
    assert [o.count("checked") for o in out.values()] == [1] * world, everything
    assert [o.split("shared ")[1].split()[0] for o in out.values()] == ["1", "0", "3", "2"], \
        everything
