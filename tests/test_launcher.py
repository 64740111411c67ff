"""`ringlib launch` for real: exit codes, signals, output, hosts in network namespaces."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from leftovers import assert_none_left, tagged_env
from netns import ip, veth
from ringlib import RendezvousError
from ringlib.runtime.hosts import Host, parse_hosts, read_hostfile, seat
from ringlib.transport import addresses
from ringlib.transport.addresses import free_tcp_ports
from ringlib.transport.security import generate

pytestmark = pytest.mark.timeout(120)
JOB = str(Path(__file__).with_name("launch_job.py"))
LAUNCH = [sys.executable, "-m", "ringlib", "launch"]


def launch(tmp: Path, *args: str, timeout: float = 90) -> tuple[subprocess.CompletedProcess, str]:
    tag, env = tagged_env(tmp / f"tmp-{uuid.uuid4().hex[:6]}")
    done = subprocess.run([*LAUNCH, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert_none_left(tag)
    return done, tag


def test_ranks_find_each_other_and_each_line_carries_its_rank(tmp_path):
    done, _ = launch(tmp_path, "-n", "3", "--", sys.executable, JOB, "sum")
    assert done.returncode == 0, done.stderr
    lines = sorted(done.stdout.splitlines())
    assert [line.split(" sum ")[0] for line in lines] == [f"[{r}] rank {r} of 3" for r in range(3)]
    assert all(line.split(" sum ")[1].startswith("6 ") for line in lines)


def test_keys_put_every_rank_on_curvezmq_and_a_bad_key_file_stops_the_launch(tmp_path):
    _, secret = generate(tmp_path / "keys")
    done, _ = launch(tmp_path, "-n", "2", "--keys", str(secret), "--", sys.executable, JOB, "sum")
    assert done.returncode == 0, done.stderr
    assert sorted(line.split(" pid ")[0] for line in done.stdout.splitlines()) == \
        [f"[{r}] rank {r} of 2 sum 3" for r in range(2)]
    assert done.stdout.count(" curve on") == 2, done.stdout
    bad, _ = launch(tmp_path, "-n", "2", "--keys", str(tmp_path / "keys" / "ring.key"), "--",
                    sys.executable, JOB, "sum")
    assert bad.returncode == 2 and "only a public key" in bad.stderr, bad.stderr


def test_ipc_endpoints_live_in_a_private_directory_that_goes_away(tmp_path):
    done, _ = launch(tmp_path, "-n", "2", "--transport", "ipc", "--", sys.executable, JOB, "sum")
    assert done.returncode == 0, done.stderr
    assert not list(tmp_path.glob("tmp-*/ringlib-*")), "the launcher left its ipc directory"


def test_a_failing_rank_stops_the_others_and_its_code_is_the_launchers(tmp_path):
    done, _ = launch(tmp_path, "-n", "3", "--", sys.executable, JOB, "fail", "1", "7")
    assert done.returncode == 7
    assert "rank 1 on localhost exited with code 7" in done.stderr
    assert "    rank 1 gives up" in done.stderr  # the last lines of its stderr


def test_elastic_a_rank_killed_leaves_the_others_to_re_form_and_finish(tmp_path):
    tag, env = tagged_env(tmp_path / "tmp", RINGLIB_PEER_TIMEOUT="1.5", RINGLIB_HEARTBEAT_S="0.25")
    done = subprocess.run([*LAUNCH, "-n", "3", "--elastic", "--", sys.executable, JOB,
                           "survive", "1"], env=env, capture_output=True, text=True, timeout=90)
    assert_none_left(tag)
    assert done.returncode == 0, done.stderr
    assert "rank 1 on localhost was killed by SIGKILL; the others go on (--elastic)" in \
        done.stderr
    assert sorted(re.findall(r"re-formed: rank (\d) of 2 sum 3", done.stdout)) == ["0", "1"], \
        done.stdout
    # All failing: the first failure's code, as without --elastic.
    done, _ = launch(tmp_path, "-n", "2", "--elastic", "--", sys.executable, "-c",
                     "import os, sys; sys.exit(3 + int(os.environ['RINGLIB_RANK']))")
    assert done.returncode in (3, 4) and done.stderr.count("the others go on") == 2, done.stderr


def test_a_rank_killed_by_a_signal_gives_128_plus_the_signal(tmp_path):
    done, _ = launch(tmp_path, "-n", "3", "--grace", "1", "--", sys.executable, JOB, "kill", "2")
    assert done.returncode == 128 + signal.SIGKILL
    assert "rank 2 on localhost was killed by SIGKILL" in done.stderr


def sleeping_ring(tmp: Path, ranks: int, mode: str = "sleep") -> tuple[subprocess.Popen, str]:
    """A launcher whose ranks are all connected and asleep, and its tag."""
    tag, env = tagged_env(tmp / "tmp")
    launcher = subprocess.Popen([*LAUNCH, "-n", str(ranks), "--", sys.executable, JOB, mode],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready = 0
    while ready < ranks:
        line = launcher.stdout.readline()
        assert line, launcher.stderr.read()
        ready += line.endswith("] ready\n")
    return launcher, tag


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_launcher_reaches_every_rank(tmp_path, signum):
    launcher, tag = sleeping_ring(tmp_path, 3)
    launcher.send_signal(signum)
    _, err = launcher.communicate(timeout=30)
    assert launcher.returncode == 128 + signum
    assert f"stopped by {signal.Signals(signum).name}" in err
    assert_none_left(tag)


def test_ranks_die_with_a_launcher_killed_outright(tmp_path):
    launcher, tag = sleeping_ring(tmp_path, 2)
    launcher.kill()
    launcher.communicate(timeout=30)
    assert_none_left(tag)


def test_a_launcher_killed_outright_leaves_neither_the_ranks_children_nor_their_memory(
        tmp_path):
    """Its janitor, in a session of its own, stops the ranks' process groups (their own
    children with them) and removes the job's segments from /dev/shm."""
    before = set(os.listdir("/dev/shm"))
    launcher, tag = sleeping_ring(tmp_path, 2, "orphans")
    assert len(set(os.listdir("/dev/shm")) - before) == 2  # one offer nobody took per rank
    launcher.kill()
    launcher.communicate(timeout=30)
    assert_none_left(tag)
    assert set(os.listdir("/dev/shm")) - before == set()


def test_lines_are_never_mixed_and_streams_stay_apart(tmp_path):
    done, _ = launch(tmp_path, "-n", "3", "--", sys.executable, JOB, "chatter", "200")
    assert done.returncode == 0, done.stderr
    for stream in (done.stdout, done.stderr):
        lines = stream.splitlines()
        assert len(lines) == 3 * 100
        for line in lines:
            assert re.fullmatch(r"\[(\d)\] (\1{5000})", line), line[:80]


def test_two_launchers_at_once_pick_different_ports(tmp_path):
    args = [*LAUNCH, "-n", "3", "--", sys.executable, JOB, "sum"]
    runs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    for run in runs:
        out, err = run.communicate(timeout=90)
        assert run.returncode == 0, err
        assert out.count(" sum 6 ") == 3


def test_free_ports_for_local_peers_lie_below_the_ports_the_kernel_hands_out():
    """A peer binds its port a second after it was picked: one from the ephemeral range may
    meanwhile be any connect()'s source port (CI once lost a run so)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = free_tcp_ports(8)
    assert len(set(ports)) == 8 and all(addresses.EXPLICIT_PORTS <= p < low for p in ports)
    with contextlib.ExitStack() as stack:
        for port in ports:
            stack.enter_context(socket.create_server(("127.0.0.1", port)))


def test_nothing_to_launch_or_too_few_slots_is_a_clear_error(tmp_path):
    done, _ = launch(tmp_path, "-n", "2")
    assert done.returncode == 2 and "no command to launch" in done.stderr
    done, _ = launch(tmp_path, "-n", "5", "--hosts", "localhost:2", "--", "true")
    assert done.returncode == 2 and "cannot place 5 ranks on 2 slots" in done.stderr
    done, _ = launch(tmp_path, "-n", "1", "--", "/no/such/program")
    assert done.returncode == 2 and "cannot start rank 0" in done.stderr
    done, _ = launch(tmp_path, "--hosts", "a:0", "--", "true")
    assert done.returncode == 2 and "argument --hosts: cannot read host entry 'a:0'" in \
        done.stderr and "Traceback" not in done.stderr, done.stderr
    done, _ = launch(tmp_path, "--hostfile", str(tmp_path / "missing"), "--", "true")
    assert done.returncode == 2 and "argument --hostfile:" in done.stderr and \
        "Traceback" not in done.stderr, done.stderr


def test_host_lists_and_hostfiles_place_ranks_in_order(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nnode1 slots=2\nnode2@10.0.0.2:3  # comment\nnode3\n")
    assert read_hostfile(hostfile) == [Host("node1", "node1", 2), Host("node2", "10.0.0.2", 3),
                                      Host("node3", "node3", 1)]
    hosts = parse_hosts("a:2,b@10.1.1.1:2")
    seats = seat(3, hosts)
    assert [(s.rank, s.host.name, s.local_rank) for s in seats] == [(0, "a", 0), (1, "a", 1),
                                                                    (2, "b", 0)]
    assert len(seat(None, hosts)) == 4
    interleaved = seat(None, parse_hosts("a,b@10.1.1.2,a,b@10.1.1.2"))
    assert [(s.rank, s.host.name, s.local_rank) for s in interleaved] == \
        [(0, "a", 0), (1, "a", 1), (2, "b", 0), (3, "b", 1)]
    with pytest.raises(RendezvousError, match="two addresses"):
        seat(None, parse_hosts("a@10.0.0.1,a@10.0.0.2"))
    with pytest.raises(RendezvousError, match="name\\[@address\\]\\[:slots\\]"):
        parse_hosts("a:0")


# --- hosts as network namespaces joined by a veth link --------------------------------

@pytest.fixture
def two_hosts():
    """Two network namespaces, A at 10.N.M.1 and B at 10.N.M.2, joined by a veth pair; a
    second pair, named `data0` in both, joins them on 10.K.M.1 and .2 (a data network
    beside the one the hosts are named by). Yields (namespace, address, data address)."""
    suffix = uuid.uuid4().hex[:5]
    names = [f"rl{suffix}a", f"rl{suffix}b"]
    subnet = f"10.{100 + int(suffix[:2], 16) % 100}.{int(suffix[2:4], 16)}"
    try:
        for name in names:
            ip("netns", "add", name)
    except (OSError, subprocess.CalledProcessError) as exc:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        pytest.skip(reason=f"cannot create network namespaces here ({exc}); needs root and iproute2")
    data = f"10.{200 + int(suffix[:2], 16) % 50}.{int(suffix[2:4], 16)}"
    try:
        for name in names:
            ip("-n", name, "link", "set", "lo", "up")
        veth(names, f"v{suffix}", subnet)
        veth(names, f"d{suffix}", data, device="data0")
        yield [(name, f"{subnet}.{i + 1}", f"{data}.{i + 1}") for i, name in enumerate(names)]
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_ranks_on_two_hosts_talk_over_the_link_between_them(tmp_path, two_hosts):
    (a, a_ip, _), (b, b_ip, _) = two_hosts
    done, _ = launch(tmp_path, "--hosts", f"{a}@{a_ip}:2,{b}@{b_ip}:2",
                     "--rsh", "ip netns exec {host}", "--", sys.executable, JOB, "sum")
    assert done.returncode == 0, done.stderr
    assert sorted(line.split(" pid ")[0] for line in done.stdout.splitlines()) == \
        [f"[{r}] rank {r} of 4 sum 10" for r in range(4)]


def test_ifname_binds_and_advertises_that_interface_on_every_host(tmp_path, two_hosts):
    """The hosts are named by one network; with --ifname data0 every rank, rank 0 too
    (whose seed stays on the first network, where the others join), is reached on the
    other."""
    (a, a_ip, a_data), (b, b_ip, b_data) = two_hosts
    done, _ = launch(tmp_path, "--hosts", f"{a}@{a_ip}:2,{b}@{b_ip}:2", "--ifname", "data0",
                     "--rsh", "ip netns exec {host}", "--", sys.executable, JOB, "sum")
    assert done.returncode == 0, done.stderr
    lines = sorted(done.stdout.splitlines())
    assert [line.split(" pid ")[0] for line in lines] == \
        [f"[{r}] rank {r} of 4 sum 10" for r in range(4)]
    advertised = [line.split(" at tcp://")[1] for line in lines]
    assert all(at.startswith(f"{a_data if r < 2 else b_data}:")
               for r, at in enumerate(advertised)), lines


def test_a_wrong_ifname_is_refused_naming_the_interfaces_there_are(tmp_path):
    done, _ = launch(tmp_path, "-n", "2", "--ifname", "nosuch9", "--", sys.executable, JOB, "sum")
    assert done.returncode == 2 and "no network interface 'nosuch9'" in done.stderr, done.stderr
    assert "lo (127.0.0.1)" in done.stderr, done.stderr
    # A rank told so by its environment alone (no launcher to check) fails as clearly.
    env = {**os.environ, "RINGLIB_RANK": "1", "RINGLIB_WORLD_SIZE": "2",
           "RINGLIB_SEED": "tcp://127.0.0.1:9", "RINGLIB_IFNAME": "nosuch9"}
    rank = subprocess.run([sys.executable, JOB, "sum"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert rank.returncode != 0 and "InvalidArgument: no network interface 'nosuch9'" in \
        rank.stderr, rank.stderr
