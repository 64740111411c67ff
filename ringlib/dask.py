"""ringlib.dask: a ring across the workers of a dask.distributed cluster, in one call.

    from dask.distributed import Client
    import ringlib.dask
    client = Client(cluster)
    results = ringlib.dask.run(client, train, data_path, epochs=3)

runs `train(ring, data_path, epochs=3)` once on every worker, `ring` a connected blocking
ring, and returns the results in rank order. Ranks follow the workers' addresses sorted
by host, then port, so each host's ranks are contiguous (what the hierarchical all-reduce
groups by). Each rank binds a free port on its worker's host and trades its address
through the scheduler (runtime/dask_book.py): no fixed port, no server of ringlib's own.
pipeline() streams the blocks of a Dask array through one pipeline stage per worker.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

import numpy as np

try:
    from distributed import Variable, get_client, get_worker, secede, wait
    from distributed.comm import get_address_host, parse_address, parse_host_port
except ImportError as exc:
    raise ImportError('ringlib.dask needs dask.distributed: pip install "ringlib[dask]"') from exc

from ringlib.errors import InvalidArgument, PeerLost, RingError, WorkerLost
from ringlib.runtime import init
from ringlib.runtime.dask_book import GONE, DaskBook, variable_name

POLL_S = 0.5  # how often run() looks for finished ranks and dead workers
GRACE_S = 10.0  # how long the other ranks have to finish once one has failed
WINDOW = 8    # the blocks rank 0 of pipeline() holds at once (and fetches ahead)


def run(client: Any, fn: Callable[..., Any], *args: Any, workers: Sequence[str] | None = None,
        timeout: float | None = None, **kwargs: Any) -> list[Any]:
    """Call `fn(ring, *args, **kwargs)` once on each worker of `client`'s cluster (or on
    each of `workers`, by address or name) and return the results in rank order.

    timeout: seconds the ranks wait for each other at start-up (default
        RINGLIB_CONNECT_TIMEOUT, or 60); a worker kept busy past it by other tasks makes
        the run raise RendezvousTimeout.
    A rank that raises: run() raises that exception, its notes naming the rank and its
    worker, once every rank has stopped; the others raise PeerLost as soon as the failed
    rank's ring closes. A worker that dies mid-run: WorkerLost naming it, within the
    ring's peer timeout. Either way the cluster is left as it was, ready for the next run.
    """
    seats = worker_seats(client, workers)
    run_id = uuid.uuid4().hex[:12]
    futures = [client.submit(_rank, run_id, rank, len(seats), fn, args, kwargs, timeout,
                             key=f"ringlib-run-{run_id}-{rank}", workers=[worker],
                             allow_other_workers=False, pure=False, retries=0)
               for rank, worker in enumerate(seats)]
    try:
        return _results(client, futures, seats, run_id)
    finally:
        client.cancel(futures)
        _forget(client, run_id, len(seats))


def worker_seats(client: Any, workers: Sequence[str] | None = None) -> list[str]:
    """The addresses of the workers that hold the ranks, in rank order: sorted by host,
    then port."""
    info = client.scheduler_info(n_workers=-1)["workers"]
    if workers is None:
        chosen = list(info)
    else:
        by_name = {str(w.get("name")): address for address, w in info.items()}
        chosen = [_address_of(str(w), info, by_name) for w in workers]
        if len(set(chosen)) != len(chosen):
            raise InvalidArgument(f"workers {list(workers)} name a worker twice")
    if not chosen:
        raise InvalidArgument("the Dask cluster has no workers to run ranks on")
    return sorted(chosen, key=_host_then_port)


def _address_of(worker: str, info: dict[str, Any], by_name: dict[str, str]) -> str:
    """The address of `worker`, given by address or by name."""
    if worker in info:
        return worker
    if worker in by_name:
        return by_name[worker]
    raise InvalidArgument(f"the Dask cluster has no worker {worker!r}; it has "
                          f"{', '.join(sorted(info))}")


def _host_then_port(address: str) -> tuple[str, int, str]:
    """How a worker's address sorts: by host, then port as a number."""
    try:
        port = parse_host_port(parse_address(address)[1])[1] or 0
    except ValueError:  # an address without a port (inproc://)
        port = 0
    return get_address_host(address), port, address


def _rank(run_id: str, rank: int, size: int, fn: Callable[..., Any], args: tuple,
          kwargs: dict[str, Any], timeout: float | None) -> Any:
    """One rank, on its worker: join the ring, run `fn` on it, close the ring. It leaves
    the worker's thread pool first (secede), as a long task that waits on others must:
    the worker then runs other tasks meanwhile, the blocks a pipeline feeds on among them."""
    secede()
    book = DaskBook(get_client(), run_id, rank, size, get_address_host(get_worker().address))
    with init(rank, size, timeout=timeout, address_book=book) as ring:
        return fn(ring, *args, **kwargs)


def _results(client: Any, futures: list[Any], seats: list[str], run_id: str) -> list[Any]:
    """Every rank's result, once all have finished; else the error that caused the rest."""
    results: list[Any] = [None] * len(futures)
    errors: dict[int, BaseException] = {}
    pending = dict(enumerate(futures))
    failed_at: float | None = None
    while pending:
        try:
            wait(list(pending.values()), timeout=POLL_S, return_when="FIRST_COMPLETED")
        except TimeoutError:
            pass
        _take_finished(pending, results, errors)
        alive = client.scheduler_info(n_workers=-1)["workers"]
        for rank in [r for r in pending if seats[r] not in alive]:
            errors[rank] = WorkerLost(f"rank {rank}'s Dask worker {seats[rank]} died during "
                                      "ringlib.dask.run", rank, seats[rank])
            _give_up(client, pending.pop(rank), run_id, rank, seats)
        failed_at = failed_at or (time.monotonic() if errors else None)
        if failed_at is not None and time.monotonic() > failed_at + GRACE_S:
            for rank in list(pending):
                errors[rank] = RingError(
                    f"rank {rank} (Dask worker {seats[rank]}) had not finished {GRACE_S:g} s "
                    "after the run failed: its task was cancelled (one that had started "
                    "runs on until its ring fails)")
                _give_up(client, pending.pop(rank), run_id, rank, seats)
    if errors:
        raise _cause(errors, seats)
    return results


def _take_finished(pending: dict[int, Any], results: list[Any],
                   errors: dict[int, BaseException]) -> None:
    """Move the ranks whose task has ended out of `pending`: into results or errors."""
    for rank, future in list(pending.items()):
        if future.status == "finished":
            results[rank] = future.result()
        elif future.status in ("error", "cancelled"):
            errors[rank] = _exception(future, rank)
        else:
            continue
        del pending[rank]


def _exception(future: Any, rank: int) -> BaseException:
    """The exception a rank's finished task raised, with its traceback."""
    if future.status == "cancelled":
        return RingError(f"rank {rank}'s task {future.key} was cancelled")
    return future.exception().with_traceback(future.traceback())


def _give_up(client: Any, future: Any, run_id: str, rank: int, seats: list[str]) -> None:
    """Cancel a rank's task: pinned to a dead worker, Dask would hold it until the worker
    came back; queued behind other tasks, it would start after the run. The ranks still
    starting learn it from the rank's variable, instead of waiting for its address."""
    client.cancel([future])
    Variable(variable_name(run_id, rank), client=client).set(GONE + seats[rank])


def _cause(errors: dict[int, BaseException], seats: list[str]) -> BaseException:
    """The error that explains the others: a dead worker first, then a rank's own
    failure, before the PeerLost either caused elsewhere; the lowest rank among equals."""
    def precedence(rank: int) -> tuple[int, int]:
        error = errors[rank]
        return (0 if isinstance(error, WorkerLost) else 2 if isinstance(error, PeerLost)
                else 1), rank
    rank = min(errors, key=precedence)
    cause = errors[rank]
    others = "; ".join(f"rank {r}: {_one_line(e)}" for r, e in sorted(errors.items())
                       if r != rank)
    cause.add_note(f"raised by rank {rank} of {len(seats)} (Dask worker {seats[rank]})"
                   + (f"; then {others}" if others else ""))
    return cause


def _one_line(error: BaseException) -> str:
    """An error's type and the first line of its message, for a note about other ranks."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _forget(client: Any, run_id: str, size: int) -> None:
    """Delete the run's variables from the scheduler."""
    for rank in range(size):
        Variable(variable_name(run_id, rank), client=client).delete()


def pipeline(client: Any, stage: Callable[[int, int], Any], array: Any, *,
             micro_batch: int = 8, max_in_flight: int = 4,
             workers: Sequence[str] | None = None, timeout: float | None = None) -> np.ndarray:
    """Run the blocks of `array`, a Dask array cut along its first axis, through a
    ringlib.pipeline of one stage per worker, and return the outputs in block order,
    joined along the first axis, as a NumPy array.

    stage: `stage(rank, world_size)` builds rank's stage on its worker: a torch module,
        an ONNX path or bytes, or a callable (see ringlib.pipeline); the last stage's
        output is a tensor.
    The blocks are computed on the cluster first and stay there, spread over its
    workers, until the run ends; rank 0 fetches them WINDOW at a time, the next window
    while the pipeline runs this one.
    """
    array = array.rechunk({axis: -1 for axis in range(1, array.ndim)})
    dataset = f"ringlib-pipeline-{uuid.uuid4().hex[:12]}"
    client.publish_dataset(**{dataset: client.compute(list(array.to_delayed().ravel()))})
    try:
        outputs = run(client, _pipeline_rank, stage, dataset, micro_batch, max_in_flight,
                      workers=workers, timeout=timeout)[0]
    finally:
        client.unpublish_dataset(dataset)
    return np.concatenate(outputs)


def _pipeline_rank(ring: Any, stage: Callable[[int, int], Any], dataset: str,
                   micro_batch: int, max_in_flight: int) -> list[np.ndarray] | None:
    """One rank of pipeline(): rank 0 feeds the blocks and keeps the outputs, the others
    serve their stage until it closes the pipeline."""
    from ringlib.pipeline import Pipeline

    pipe = Pipeline(ring, stage(ring.rank, ring.world_size), micro_batch=micro_batch,
                    max_in_flight=max_in_flight)
    if ring.rank != 0:
        pipe.serve()
        return None
    outputs = [out.numpy() for out in pipe.run(_blocks(dataset))]
    pipe.close()
    return outputs


def _blocks(dataset: str) -> Iterator[Any]:
    """The blocks the client published as `dataset` (their futures, in block order), as
    tensors, fetched WINDOW at a time, each window while the one before it runs."""
    import torch

    client = get_client()
    futures = client.get_dataset(dataset)
    parts = [futures[i:i + WINDOW] for i in range(0, len(futures), WINDOW)]
    with ThreadPoolExecutor(1, thread_name_prefix="ringlib-dask-fetch") as fetcher:
        ahead = fetcher.submit(client.gather, parts[0]) if parts else None
        for i in range(len(parts)):
            window = ahead.result()
            if i + 1 < len(parts):
                ahead = fetcher.submit(client.gather, parts[i + 1])
            yield from (torch.as_tensor(np.asarray(block)) for block in window)
