"""`ringlib launch`: start the ranks of a ring, relay their output, and stop them together.

    ringlib launch -n N [--hosts h1:2,h2:2 | --hostfile FILE] [--rsh 'ssh {host}']
                   [--transport tcp|ipc] [--port P] [--ifname NAME] [--timeout S]
                   [--keys FILE] [--timeline DIR] [--join ADDRESS] [--elastic]
                   -- COMMAND ARGS...

Every rank gets RINGLIB_RANK, RINGLIB_LOCAL_RANK, RINGLIB_WORLD_SIZE and RINGLIB_PEERS,
so that ringlib.connect() and ringlib.init() need no arguments; with --keys, also
RINGLIB_CURVE_KEY (the ring's secret key file, which must exist at that path on every
host), so that every link is authenticated and encrypted; with --ifname, RINGLIB_IFNAME
and, instead of the table, RINGLIB_SEED (rank 0's address), so that each rank binds and
advertises the named interface's address on its host; with --timeline, RINGLIB_TIMELINE,
so that each rank writes its trace to DIR/trace-RANK.json (`ringlib trace` merges them);
with --join ADDRESS, RINGLIB_JOIN alone instead of a rank and a table: the processes are
newcomers to a running ring, which take the ranks its members give them (admission.py).

Each output line comes out whole, prefixed with its rank, on the stream it was written
to. When a rank fails, the others get SIGTERM, then SIGKILL after a grace period, and the
launcher exits with the failed rank's code (128 + N for signal N). With --elastic a rank
that fails is reported and the others go on (they re-form: Ring.reform()); the launcher
exits 0 once every rank has ended if any ended with 0, else with the first failure's
code. SIGINT and SIGTERM to the launcher are passed to every rank, and end it the same
way. At the end it removes the shared-memory segments that ranks on this host killed
midway left in /dev/shm (RINGLIB_JOB names them); a janitor process (janitor.py) does
that, and stops whatever the ranks started, even when the launcher itself is killed
outright.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable

from ringlib.errors import InvalidArgument, RendezvousError, Unauthorized
from ringlib.transport import addresses, interfaces, segment_names
from ringlib.transport.security import Keys

from .environment import without_placement
from .hosts import Host, PortReservation, Seat, parse_hosts, read_hostfile, seat
from .processes import die_with_parent, signal_group

JANITOR = Path(__file__).with_name("janitor.py")
GRACE_S = 5.0           # between SIGTERM and SIGKILL
DEFAULT_PORT = 29600    # first port of each remote host's ranks, when --port is not given
STDERR_TAIL = 12        # lines of a failed rank's stderr repeated in the report
LINE_LIMIT = 1 << 20    # longest line relayed whole; longer ones come in pieces


@dataclass
class Rank:
    """One rank's process and what the launcher keeps of its output."""

    seat: Seat
    argv: list[str]
    env: dict[str, str]
    process: asyncio.subprocess.Process | None = None
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=STDERR_TAIL))

    newcomer: bool = False  # started with --join: its rank is the members' to give

    @property
    def who(self) -> str:
        return f"{'newcomer' if self.newcomer else 'rank'} {self.seat.rank}"

    @property
    def name(self) -> str:
        return f"{self.who} on {self.seat.host.name}"


def plan(seats: list[Seat], command: list[str], transport: str, port: int | None,
         rsh: str, workdir: str, timeout: float | None,
         keys: str | None = None, ifname: str | None = None,
         timeline: str | None = None,
         join: str | None = None) -> tuple[list[Rank], PortReservation | None]:
    """The ranks to start, and the ports held for them on this host (close it at the end);
    with `join`, newcomers that ask the member at that address to admit them."""
    if not command:
        raise RendezvousError("no command to launch: put it after --, as in "
                              "`ringlib launch -n 2 -- python train.py`")
    remote = any(not s.host.local for s in seats)
    if ifname is not None and transport == "ipc":
        raise RendezvousError("--ifname picks a network interface: it takes --transport tcp")
    reservation = None
    if join is not None:
        peers = []
    elif transport == "ipc":
        if remote:
            raise RendezvousError("ipc links only join ranks on one host; use --transport tcp")
        peers = [f"ipc://{workdir}/r{s.rank}" for s in seats]
    elif remote or port is not None:
        base = DEFAULT_PORT if port is None else port
        peers = [f"tcp://{_bracketed(s.host.address)}:{base + s.local_rank}" for s in seats]
    else:
        reservation = PortReservation(len(seats))
        peers = [f"tcp://127.0.0.1:{p}" for p in reservation.ports]
    ranks = []
    for s in seats:
        env = {"RINGLIB_RANK": str(s.rank), "RINGLIB_LOCAL_RANK": str(s.local_rank),
               "RINGLIB_WORLD_SIZE": str(len(seats)), "RINGLIB_PEERS": ",".join(peers),
               segment_names.JOB_VARIABLE: job_name(workdir), "PYTHONUNBUFFERED": "1"}
        if join is not None:
            env = {"RINGLIB_JOIN": join, segment_names.JOB_VARIABLE: job_name(workdir),
                   "PYTHONUNBUFFERED": "1"}
            if ifname is not None:
                env["RINGLIB_IFNAME"] = ifname
        elif ifname is not None:
            del env["RINGLIB_PEERS"]
            env.update(RINGLIB_SEED=peers[0], RINGLIB_IFNAME=ifname)
        if timeout is not None:
            env["RINGLIB_CONNECT_TIMEOUT"] = str(timeout)
        if keys is not None:
            env["RINGLIB_CURVE_KEY"] = keys
        if timeline is not None:
            env["RINGLIB_TIMELINE"] = os.path.join(timeline, "trace-{rank}.json")
        newcomer = join is not None
        if s.host.local:
            # a newcomer's rank is the members' to give; a member joins nobody
            inherited = without_placement(os.environ) if newcomer else \
                {k: v for k, v in os.environ.items() if k != "RINGLIB_JOIN"}
            ranks.append(Rank(s, command, {**inherited, **env}, newcomer=newcomer))
        else:
            prefix = shlex.split(rsh.format(host=s.host.name))
            ranks.append(Rank(s, [*prefix, "env", *(f"{k}={v}" for k, v in env.items()),
                                  *command], dict(os.environ), newcomer=newcomer))
    return ranks, reservation


def job_name(workdir: str) -> str:
    """The job's part of its ranks' shared-memory segment names (transport/segment_names.py)."""
    return "L" + os.path.basename(workdir).removeprefix("ringlib-")


def _bracketed(address: str) -> str:
    return f"[{address}]" if ":" in address else address


class Supervisor:
    """Runs the ranks to the end; the first failure or signal stops all of them (with
    `elastic`, a failure stops only the rank that failed). started(pid) hears of each
    rank's process (its group's id) as it starts, and reaped(pid) once the rank has
    exited and its group was killed."""

    def __init__(self, ranks: list[Rank], grace: float = GRACE_S,
                 started: Callable[[int], None] = lambda pid: None,
                 reaped: Callable[[int], None] = lambda pid: None,
                 elastic: bool = False) -> None:
        self.ranks = ranks
        self.grace = grace
        self.elastic = elastic
        self._started, self._reaped = started, reaped
        self.failed: Rank | None = None
        self.signalled: int | None = None
        self._stopping: asyncio.Task | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_signal, signum)
        try:
            pumps = []
            for rank in self.ranks:
                await self._start(rank)
                pumps += [self._relay(rank, rank.process.stdout, sys.stdout.buffer, False),
                          self._relay(rank, rank.process.stderr, sys.stderr.buffer, True)]
            await asyncio.gather(*pumps, *(self._watch(r) for r in self.ranks))
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
            await self._stop_all(signal.SIGKILL)
            if self._stopping is not None:
                await self._stopping
        return self._exit_code()

    async def _start(self, rank: Rank) -> None:
        try:
            rank.process = await asyncio.create_subprocess_exec(
                *rank.argv, env=rank.env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True, preexec_fn=die_with_parent(), limit=LINE_LIMIT)
        except OSError as exc:
            raise RendezvousError(f"cannot start {rank.name}: {rank.argv[0]}: {exc}") from None
        self._started(rank.process.pid)

    async def _relay(self, rank: Rank, stream: asyncio.StreamReader, out: BinaryIO,
                     keep: bool) -> None:
        prefix = f"[{rank.seat.rank}] ".encode()
        while line := await _read_line(stream):
            if not line.endswith(b"\n"):
                line += b"\n"
            out.write(prefix + line)  # one write per line: lines never mix
            out.flush()
            if keep:
                rank.tail.append(line.decode(errors="replace").rstrip("\n"))

    async def _watch(self, rank: Rank) -> None:
        code = await rank.process.wait()
        signal_group(rank.process.pid, signal.SIGKILL)  # what the rank left running
        self._reaped(rank.process.pid)
        if code == 0 or self.signalled is not None:
            return
        if self.elastic:
            self._report(rank, "the others go on (--elastic)")
        if self.failed is None:
            self.failed = rank
            if not self.elastic:
                self._stopping = asyncio.ensure_future(self._stop_all(signal.SIGTERM))

    def _on_signal(self, signum: int) -> None:
        if self.signalled is None:
            self.signalled = signum
            self._stopping = asyncio.ensure_future(self._stop_all(signum))

    async def _stop_all(self, signum: int) -> None:
        """Send `signum` to every rank still running, then SIGKILL after the grace period."""
        running = [r for r in self.ranks if r.process and r.process.returncode is None]
        for rank in running:
            signal_group(rank.process.pid, signum)
        if signum == signal.SIGKILL:
            return
        try:
            await asyncio.wait_for(asyncio.gather(*(r.process.wait() for r in running)),
                                   self.grace)
        except TimeoutError:
            for rank in running:
                signal_group(rank.process.pid, signal.SIGKILL)

    def _exit_code(self) -> int:
        if self.elastic and self.signalled is None and \
                any(r.process.returncode == 0 for r in self.ranks):
            return 0
        if self.failed is not None:
            if not self.elastic:
                self._report(self.failed, "the other ranks were stopped")
            return _as_exit_code(self.failed.process.returncode)
        if self.signalled is not None:
            print(f"ringlib launch: stopped by {signal.Signals(self.signalled).name}; "
                  "every rank was stopped", file=sys.stderr)
            return 128 + self.signalled
        return 0

    def _report(self, rank: Rank, then: str) -> None:
        code = rank.process.returncode
        how = (f"was killed by {signal.Signals(-code).name}" if code < 0
               else f"exited with code {code}")
        lines = [f"ringlib launch: {rank.name} {how}; {then}"]
        if rank.tail:
            lines.append(f"ringlib launch: last lines of {rank.who}'s stderr:")
            lines += [f"    {line}" for line in rank.tail]
        print("\n".join(lines), file=sys.stderr)


async def _read_line(stream: asyncio.StreamReader) -> bytes:
    try:
        return await stream.readline()
    except ValueError:  # a line longer than LINE_LIMIT: pass on what the buffer holds
        return await stream.read(LINE_LIMIT)


def _as_exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ringlib launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--ranks", type=int, default=None,
                   help="how many ranks (default: every slot of --hosts, else 1)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--hosts", type=_argument(parse_hosts), default=None,
                       help="name[@address][:slots],... (default: this host)")
    where.add_argument("--hostfile", type=_argument(read_hostfile), default=None,
                       help="a file of `name[@address][:slots]` or `name slots=N` lines")
    p.add_argument("--rsh", default="ssh {host}",
                   help="how to start a rank on another host (default: %(default)r)")
    p.add_argument("--transport", choices=("tcp", "ipc"), default="tcp")
    p.add_argument("--port", type=int, default=None,
                   help=f"first tcp port of each host's ranks (default: free ports here, "
                        f"{DEFAULT_PORT} on other hosts)")
    p.add_argument("--ifname", default=os.environ.get("RINGLIB_IFNAME") or None, metavar="NAME",
                   help="the network interface each rank binds and advertises (eth1, ib0; "
                        "default: the one that routes to rank 0); sets RINGLIB_IFNAME")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds the ranks wait for each other at start-up (default: 60)")
    p.add_argument("--keys", default=None, metavar="FILE",
                   help="the ring's secret key file from `ringlib keygen`: CurveZMQ on every "
                        "link (default: RINGLIB_CURVE_KEY if set, else plain links)")
    p.add_argument("--timeline", default=None, metavar="DIR",
                   help="each rank writes its timeline to DIR/trace-RANK.json, for "
                        "`ringlib trace DIR/*.json` (sets RINGLIB_TIMELINE)")
    p.add_argument("--join", default=None, metavar="ADDRESS",
                   help="start the ranks as newcomers to the running ring of the member at "
                        "ADDRESS (its ring.address), admitted when the members call admit() "
                        "or reform(); sets RINGLIB_JOIN")
    p.add_argument("--elastic", action="store_true",
                   help="a rank that fails does not stop the others, which re-form "
                        "(reform()); exit 0 if any rank ended with 0")
    p.add_argument("--grace", type=float, default=GRACE_S,
                   help="seconds between SIGTERM and SIGKILL when stopping (default: %(default)s)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    return p


def _argument(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse` as an argparse type: what it cannot read is a usage error, not a traceback."""
    def checked(text: str) -> Any:
        try:
            return parse(text)
        except (RendezvousError, OSError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    checked.__name__ = parse.__name__
    return checked


def launch(seats: list[Seat], command: list[str], transport: str = "tcp",
           port: int | None = None, rsh: str = "ssh {host}", timeout: float | None = None,
           keys: str | None = None, grace: float = GRACE_S,
           ifname: str | None = None, timeline: str | None = None,
           join: str | None = None, elastic: bool = False) -> int:
    """Run `command` as the ranks on `seats` (see plan()) to the end; return the exit
    code. What the job made on this host goes with it: its private directory, and the
    shared-memory segments of ranks killed midway. Raises RendezvousError for a plan that
    cannot run."""
    workdir = tempfile.mkdtemp(prefix="ringlib-")
    janitor = _janitor(workdir)
    reservation = None
    try:
        ranks, reservation = plan(seats, command, transport, port, rsh, workdir, timeout, keys,
                                  ifname, timeline, join)
        return asyncio.run(Supervisor(ranks, grace, lambda pid: _tell(janitor, pid),
                                      lambda pid: _tell(janitor, -pid), elastic).run())
    finally:
        if reservation is not None:
            reservation.close()
        shutil.rmtree(workdir, ignore_errors=True)
        left = segment_names.remove_job_segments(job_name(workdir))
        if left:  # ranks killed before their peers took (and unlinked) what they offered
            print(f"ringlib launch: removed {left} shared-memory segments of killed ranks",
                  file=sys.stderr)
        with contextlib.suppress(BrokenPipeError):
            janitor.stdin.close()  # it stops what the ranks left running, then exits
        janitor.wait()


def _janitor(workdir: str) -> subprocess.Popen:
    """The job's janitor (janitor.py), in a session of its own, so that it outlives a
    launcher killed outright and cleans up after it."""
    prefix = os.path.join(segment_names.DIRECTORY,
                          f"{segment_names.PREFIX}{job_name(workdir)}-")
    return subprocess.Popen([sys.executable, str(JANITOR), prefix, workdir],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            start_new_session=True)


def _tell(janitor: subprocess.Popen, group: int) -> None:
    """Tell the janitor of a rank's process group (or, negated, that it was reaped). A
    janitor that died cannot hear it, and the job goes on without one."""
    with contextlib.suppress(BrokenPipeError):
        janitor.stdin.write(f"{group}\n")
        janitor.stdin.flush()


def main(argv: list[str] | None = None) -> int:
    """Run `ringlib launch ARGV`; return the exit code."""
    args = parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    hosts = args.hosts or args.hostfile or [Host("localhost", "127.0.0.1", args.ranks or 1)]
    try:
        keys = os.path.abspath(args.keys) if args.keys else None
        if keys:
            Keys.load(keys)  # a bad path fails here, not in every rank
        if args.ifname and all(h.local for h in hosts):
            interfaces.address_of(args.ifname)  # a wrong name fails here, not in every rank
        timeline = os.path.abspath(args.timeline) if args.timeline else None
        if timeline:
            try:
                os.makedirs(timeline, exist_ok=True)
            except OSError as exc:
                raise InvalidArgument(f"--timeline {args.timeline}: {exc.strerror}") from None
        join = addresses.check(args.join) if args.join else None
        return launch(seat(args.ranks, hosts), command, args.transport, args.port, args.rsh,
                      args.timeout, keys, args.grace, args.ifname, timeline, join,
                      args.elastic)
    except (RendezvousError, Unauthorized, InvalidArgument) as exc:
        print(f"ringlib launch: {exc}", file=sys.stderr)
        return 2
