"""Where this process sits in the ring, read from the variables launchers set.

Conventions, first match wins:
  ringlib's own      RINGLIB_RANK, RINGLIB_WORLD_SIZE, RINGLIB_PEERS (one address per rank)
                     or RINGLIB_SEED (rank 0's tcp://host:port), RINGLIB_LOCAL_RANK
  torchrun           RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
  Open MPI mpirun    OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_RANK
  Slurm srun         SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_STEP_NODELIST
Without RINGLIB_PEERS the ranks meet at a seed address, where rank 0 listens: RINGLIB_SEED,
else MASTER_ADDR with port RINGLIB_PORT or MASTER_PORT + 1 (MASTER_PORT itself is left to
torch.distributed's store, which torchrun may already run there). Under Slurm the host
defaults to the step's first node and the port to one derived from the job and step
ids; under mpirun on a single host, to 127.0.0.1 and a port derived from the job id.
Where the engine has a place to trade addresses (MPI under mpirun with mpi4py, torch's
stores), connect() uses that instead (rendezvous.engine_book). With none of these
variables the process is a ring of one.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import Mapping

import hostlist

from ringlib.errors import RendezvousError
from ringlib.transport import addresses

# (name, rank variable, world size variable, local rank variable)
CONVENTIONS = [
    ("ringlib", "RINGLIB_RANK", "RINGLIB_WORLD_SIZE", "RINGLIB_LOCAL_RANK"),
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("mpirun", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("srun", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
]
JOB_PORTS = (20000, 30000)  # the range of ports derived from a job id
# Variables by which a user chooses how the ranks meet: where one is set, ringlib uses no
# engine's own place to trade addresses (MPI, torch's stores).
CHOSEN_MEETING = ("RINGLIB_PEERS", "RINGLIB_SEED", "RINGLIB_PORT")
# Every variable above that says where a process sits, so that a parent starting ranks
# of its own can drop what it inherited: names, and prefixes of whole families.
PLACEMENT_NAMES = frozenset({name for convention in CONVENTIONS for name in convention[1:]}
                            | {*CHOSEN_MEETING, "RINGLIB_HOST", "RINGLIB_JOIN"})
PLACEMENT_PREFIXES = ("OMPI_", "SLURM_", "MASTER_", "PMIX_")


@dataclass(frozen=True)
class Placement:
    rank: int
    world_size: int
    local_rank: int
    peers: list[str] | None   # every rank's address, when known up front
    seed: str | None          # else rank 0's tcp address, where the ranks exchange theirs
    source: str               # which convention supplied this, for error messages


def placement(rank: int | None = None, world_size: int | None = None,
              peers: list[str] | None = None, env: Mapping[str, str] = os.environ,
              seedless: bool = False) -> Placement:
    """This process's Placement: the arguments where given, the environment otherwise;
    `seedless` where the ranks learn each other's addresses another way (an AddressBook)."""
    source, env_rank, env_size, local = _from_launcher(env)
    rank = env_rank if rank is None else rank
    world_size = env_size if world_size is None else world_size
    if peers is None and env.get("RINGLIB_PEERS") and not seedless:
        peers = env["RINGLIB_PEERS"].split(",")
    if world_size is None and peers is not None:
        world_size = len(peers)
    if rank is None or world_size is None:
        raise RendezvousError("ringlib needs both a rank and a world size; got rank="
                              f"{rank} and world_size={world_size} (from {source})")
    _check_rank(rank, world_size, source)
    if peers is not None:
        return Placement(rank, world_size, local, _checked_peers(peers, world_size), None, source)
    seed = None if world_size == 1 or seedless else _seed(env, source)
    return Placement(rank, world_size, local, None, seed, source)


def without_placement(env: Mapping[str, str]) -> dict[str, str]:
    """`env` without any launcher's placement variables (ringlib's, torchrun's, mpirun's,
    srun's): what a parent passes on before it sets its ranks' own."""
    return {k: v for k, v in env.items()
            if k not in PLACEMENT_NAMES and not k.startswith(PLACEMENT_PREFIXES)}


def _from_launcher(env: Mapping[str, str]) -> tuple[str, int | None, int | None, int]:
    for name, rank_var, size_var, local_var in CONVENTIONS:
        if rank_var in env and size_var in env:
            return (name, _integer(env, rank_var), _integer(env, size_var),
                    _integer(env, local_var) if local_var in env else 0)
    return "the defaults (no launcher variables set)", 0, 1, 0


def _integer(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise RendezvousError(f"{name}={env[name]!r} is not an integer") from None


def _check_rank(rank: int, world_size: int, source: str) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise RendezvousError(f"rank {rank} does not fit world size {world_size} "
                              f"(from {source})")


def _checked_peers(peers: list[str], world_size: int) -> list[str]:
    peers = [p.strip() for p in peers]
    if len(peers) != world_size:
        raise RendezvousError(f"{len(peers)} peer addresses for world size {world_size}; "
                              "RINGLIB_PEERS needs one address per rank")
    if len(set(peers)) != len(peers):
        raise RendezvousError(f"peer addresses repeat: {peers}")
    return [addresses.check(p) for p in peers]


def _seed(env: Mapping[str, str], source: str) -> str:
    """Rank 0's address, tcp://host:port, from whichever variables this launcher sets."""
    if "RINGLIB_SEED" in env:
        return addresses.check(env["RINGLIB_SEED"])
    host = env.get("MASTER_ADDR") or _launcher_host(env)
    port = _seed_port(env)
    if host is None or port is None:
        raise RendezvousError(
            f"world size > 1 (from {source}) but no way to find the peers: set RINGLIB_PEERS, "
            "RINGLIB_SEED=tcp://host:port, or MASTER_ADDR and MASTER_PORT")
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def _launcher_host(env: Mapping[str, str]) -> str | None:
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if nodes:
        return first_host(nodes)
    if "OMPI_COMM_WORLD_SIZE" in env and \
            env.get("OMPI_COMM_WORLD_LOCAL_SIZE") == env["OMPI_COMM_WORLD_SIZE"]:
        return "127.0.0.1"
    return None


def _seed_port(env: Mapping[str, str]) -> int | None:
    if "RINGLIB_PORT" in env:
        return _integer(env, "RINGLIB_PORT")
    if "MASTER_PORT" in env:
        return _integer(env, "MASTER_PORT") + 1
    job = _job(env)
    if job:
        low, high = JOB_PORTS
        return low + zlib.crc32(job.encode()) % (high - low)
    return None


def _job(env: Mapping[str, str]) -> str | None:
    """What names this launch among others: under Slurm the job and its step (two steps
    of one allocation, run side by side, must not meet at one port)."""
    if "SLURM_JOB_ID" in env:
        return f"{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '')}"
    return env.get("OMPI_MCA_ess_base_jobid") or env.get("PMIX_NAMESPACE")


def slurm_nodes(nodelist: str) -> list[str]:
    """Every host of a Slurm node list, in order: 'node[01-02,07],cpu1' -> ['node01',
    'node02', 'node07', 'cpu1'] (python-hostlist reads Slurm's compressed ranges)."""
    try:
        nodes = hostlist.expand_hostlist(nodelist.strip())
    except hostlist.BadHostlist as exc:
        raise RendezvousError(f"cannot read the Slurm node list {nodelist!r}: {exc}") from None
    if not nodes:
        raise RendezvousError(f"the Slurm node list {nodelist!r} names no host")
    return nodes


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: 'gpu[03-05,9],cpu1' -> 'gpu03'."""
    return slurm_nodes(nodelist)[0]
