"""Every dist.* call the ringlib backend offers, on one rank under torchrun:
`python torch_ops_peer.py SEED OUT`. Each check writes "ok" or what went wrong into
OUT/rank{R}.json under its name; tests/test_torch_backend.py reads them.

Every rank draws every rank's inputs from the seed, so each computes the float64
reference of the whole group by itself.
"""

from __future__ import annotations

import datetime
import json
import sys
import threading
import time
import traceback
import zlib
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

import ringlib
import ringlib.torch  # noqa: F401  (registers the backend)

R = dist.ReduceOp
FLOATS = ["float32", "float64", "float16", "bfloat16"]
INTEGERS = ["int8", "uint8", "int32", "int64"]
DTYPES = FLOATS + INTEGERS + ["bool"]
TOLERANCE = {"float16": 2e-2, "bfloat16": 5e-2, "float32": 1e-5, "float64": 1e-12}


def ops_for(dtype: str) -> list[str]:
    if dtype == "bool":
        return ["SUM", "MIN", "MAX", "PRODUCT"]
    return ["SUM", "MIN", "MAX", "PRODUCT"] + (["AVG", "PREMUL_SUM"] if dtype in FLOATS else [])


def check_names() -> list[str]:
    """Every check, in the order every rank runs them."""
    names = []
    for dtype in DTYPES:
        for mode in ("sync", "async"):
            names += [f"all_reduce-{op}-{dtype}-{mode}" for op in ops_for(dtype)]
            names += [f"{name}-{dtype}-{mode}" for name in
                      ("broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                       "reduce_scatter_tensor", "reduce", "send_recv")]
    return names + [
        "non_contiguous", "coalesced", "parts_in_call_order", "unequal_pieces",
        "checked_up_front", "functional", "objects", "barrier", "future_value",
        "blocking_callback", "subgroup", "gloo_subgroup", "unsupported", "bitwise",
        "integer_avg", "mismatch", "timeout", "destroy_and_reinit_beside_gloo"]


def raised(error: type[BaseException], call: Callable[[], object], what: object) -> BaseException:
    """The `error` that call() raises; AssertionError naming `what` if it raises none."""
    try:
        call()
    except error as exc:
        return exc
    raise AssertionError(f"{what} did not raise {error.__name__}")


class Checks:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    # -- inputs and references -----------------------------------------------------------

    def inputs(self, name: str, dtype: str, shape: tuple[int, ...]) -> list[torch.Tensor]:
        """Every rank's input for check `name`: small values, so that no integer overflows."""
        g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}-{name}".encode()))
        out = []
        for _ in range(self.world):
            if dtype == "bool":
                out.append(torch.randint(0, 2, shape, generator=g).bool())
            elif dtype in FLOATS:
                out.append(torch.randn(shape, generator=g, dtype=torch.float64)
                           .to(getattr(torch, dtype)))
            else:
                low = 0 if dtype == "uint8" else -3
                out.append(torch.randint(low, 4, shape, generator=g).to(getattr(torch, dtype)))
        return out

    def reduced(self, values: list[torch.Tensor], op: str) -> torch.Tensor:
        stack = torch.stack([v.double() for v in values])
        if op == "PREMUL_SUM":
            return (stack * 0.5).sum(0)
        return {"SUM": stack.sum(0), "AVG": stack.mean(0), "MIN": stack.min(0).values,
                "MAX": stack.max(0).values, "PRODUCT": stack.prod(0)}[op]

    def same(self, got: torch.Tensor, want: torch.Tensor, dtype: str) -> None:
        if dtype == "bool":
            want = want != 0
            assert got.dtype == torch.bool and torch.equal(got, want), f"{got} != {want}"
            return
        if dtype not in FLOATS:
            want = want.to(getattr(torch, dtype))  # wraps as the dtype does
            assert torch.equal(got, want), f"{got} != {want}"
            return
        tol = TOLERANCE[dtype]
        assert torch.allclose(got.double(), want, rtol=tol, atol=tol), \
            f"{got} != {want} (float64 reference)"

    @staticmethod
    def run(call: Callable[[bool], object], mode: str) -> None:
        work = call(mode == "async")
        if mode == "async":
            assert isinstance(work, dist.Work), f"async_op=True returned {work!r}"
            work.wait()
            assert work.is_completed()

    # -- per dtype -----------------------------------------------------------------------

    def all_reduce(self, op: str, dtype: str, mode: str) -> None:
        mine = self.inputs(f"ar-{op}-{dtype}", dtype, (7, 3))
        t = mine[self.rank].clone()
        reduce_op = dist._make_nccl_premul_sum(0.5) if op == "PREMUL_SUM" else getattr(R, op)
        self.run(lambda a: dist.all_reduce(t, op=reduce_op, async_op=a), mode)
        self.same(t, self.reduced(mine, op), dtype)

    def broadcast(self, dtype: str, mode: str) -> None:
        mine = self.inputs(f"bc-{dtype}", dtype, (5,))
        t = mine[self.rank].clone()
        root = self.world - 1
        self.run(lambda a: dist.broadcast(t, root, async_op=a), mode)
        self.same(t, mine[root].double(), dtype)

    def all_gather(self, dtype: str, mode: str) -> None:
        mine = self.inputs(f"ag-{dtype}", dtype, (2, 3))
        out = [torch.empty_like(mine[0]) for _ in range(self.world)]
        self.run(lambda a: dist.all_gather(out, mine[self.rank], async_op=a), mode)
        for got, want in zip(out, mine):
            self.same(got, want.double(), dtype)

    def all_gather_into_tensor(self, dtype: str, mode: str) -> None:
        mine = self.inputs(f"agt-{dtype}", dtype, (4,))
        out = torch.empty(self.world * 4, dtype=mine[0].dtype)
        self.run(lambda a: dist.all_gather_into_tensor(out, mine[self.rank], async_op=a), mode)
        self.same(out, torch.cat(mine).double(), dtype)

    def reduce_scatter(self, dtype: str, mode: str) -> None:
        op = "AVG" if dtype in FLOATS else "SUM"
        parts = [self.inputs(f"rs-{dtype}-{k}", dtype, (3,)) for k in range(self.world)]
        out = torch.empty(3, dtype=parts[0][0].dtype)
        self.run(lambda a: dist.reduce_scatter(out, [p[self.rank] for p in parts],
                                               op=getattr(R, op), async_op=a), mode)
        self.same(out, self.reduced(parts[self.rank], op), dtype)

    def reduce_scatter_tensor(self, dtype: str, mode: str) -> None:
        op = "PREMUL_SUM" if dtype in FLOATS else "MAX"
        mine = self.inputs(f"rst-{dtype}", dtype, (self.world * 5,))
        out = torch.empty(5, dtype=mine[0].dtype)
        reduce_op = dist._make_nccl_premul_sum(0.5) if op == "PREMUL_SUM" else getattr(R, op)
        self.run(lambda a: dist.reduce_scatter_tensor(out, mine[self.rank], op=reduce_op,
                                                      async_op=a), mode)
        self.same(out, self.reduced(mine, op)[self.rank * 5:(self.rank + 1) * 5], dtype)

    def reduce(self, dtype: str, mode: str) -> None:
        mine = self.inputs(f"rd-{dtype}", dtype, (6,))
        t = mine[self.rank].clone()
        self.run(lambda a: dist.reduce(t, dst=1, op=R.MAX, async_op=a), mode)
        self.same(t, self.reduced(mine, "MAX") if self.rank == 1 else mine[self.rank].double(),
                  dtype)

    def send_recv(self, dtype: str, mode: str) -> None:
        """Each rank sends to the next and receives from the previous; even ranks send
        first, odd ones receive first."""
        mine = self.inputs(f"p2p-{dtype}", dtype, (3, 2))
        right, left = (self.rank + 1) % self.world, (self.rank - 1) % self.world
        got = torch.empty_like(mine[0])
        if mode == "sync":
            if self.rank % 2 == 0:
                dist.send(mine[self.rank], right, tag=7)
                dist.recv(got, left, tag=7)
            else:
                dist.recv(got, left, tag=7)
                dist.send(mine[self.rank], right, tag=7)
        else:
            works = [dist.isend(mine[self.rank], right, tag=7), dist.irecv(got, left, tag=7)]
            for work in works:
                work.wait()
        self.same(got, mine[left].double(), dtype)

    # -- the rest ------------------------------------------------------------------------

    def non_contiguous(self) -> None:
        mine = self.inputs("nc", "float32", (4, 6))
        t = mine[self.rank].clone().t()  # a transposed view
        assert not t.is_contiguous()
        dist.all_reduce(t)
        self.same(t, self.reduced(mine, "SUM").t(), "float32")
        parts = torch.zeros(6, 4)[:, ::2]  # every other column
        dist.broadcast(parts if self.rank else parts.fill_(3.0), 0)
        assert torch.equal(parts, torch.full((6, 2), 3.0))

    def coalesced(self) -> None:
        a, b = self.inputs("co-a", "float64", (5,)), self.inputs("co-b", "float64", (2, 3))
        ta, tb = a[self.rank].clone(), b[self.rank].clone()
        dist.all_reduce_coalesced([ta, tb], op=R.MIN)
        self.same(ta, self.reduced(a, "MIN"), "float64")
        self.same(tb, self.reduced(b, "MIN"), "float64")

    def parts_in_call_order(self) -> None:
        """An op of several parts, then another op, both in flight, one rank late: every
        part pairs up with the same part on every rank."""
        if self.rank == 1:
            time.sleep(0.5)
        group = dist.group.WORLD
        a, b = torch.full((2,), 10.0 + self.rank), torch.full((2,), 100.0 + self.rank)
        both = [torch.empty(2 * self.world), torch.empty(2 * self.world)]
        first = group.allgather_into_tensor_coalesced(both, [a, b])
        later = torch.empty(2 * self.world)
        second = dist.all_gather_into_tensor(later, a * 2, async_op=True)
        sums = [torch.ones(3, dtype=torch.float64), torch.full((3,), 2, dtype=torch.int64)]
        third = group.allreduce_coalesced(sums)
        fourth = dist.all_reduce(torch.ones(3, dtype=torch.int64), async_op=True)
        for work in (first, second, third, fourth):
            work.wait()
        ranks = torch.arange(self.world).repeat_interleave(2).double()
        self.same(both[0], 10 + ranks, "float32")
        self.same(both[1], 100 + ranks, "float32")
        self.same(later, 2 * (10 + ranks), "float32")
        self.same(sums[1], torch.full((3,), 2.0 * self.world), "int64")

    def unequal_pieces(self) -> None:
        """reduce_scatter whose pieces differ in size: piece i has i + 1 elements."""
        parts = [self.inputs(f"uneq-{k}", "float32", (k + 1,)) for k in range(self.world)]
        out = torch.empty(self.rank + 1)
        dist.reduce_scatter(out, [p[self.rank] for p in parts])
        self.same(out, self.reduced(parts[self.rank], "SUM"), "float32")

    def checked_up_front(self) -> None:
        """Outputs of the wrong dtype or size, and PREMUL_SUM on integers, raise at the
        call, naming the rank, before anything is sent."""
        calls = {
            "dtype": lambda: dist.all_gather_into_tensor(
                torch.empty(self.world * 2, dtype=torch.float64), torch.ones(2)),
            "elements": lambda: dist.all_gather([torch.empty(3)] * self.world, torch.ones(2)),
            "PREMUL_SUM": lambda: dist.all_reduce(torch.ones(2, dtype=torch.int32),
                                                  op=dist._make_nccl_premul_sum(0.5))}
        for name, call in calls.items():
            exc = raised(ringlib.RingError, call, f"a wrong {name}")
            assert f"rank {self.rank}:" in str(exc), exc
        t = torch.ones(2)
        dist.all_reduce(t)  # and nothing was sent: the next op pairs up
        assert torch.equal(t, torch.full((2,), float(self.world)))

    def functional(self) -> None:
        """The functional collectives DTensor and FSDP2 call, through the group's name."""
        group = dist.group.WORLD
        a = self.inputs("fc-a", "float32", (4,))
        out = funcol.all_gather_tensor(a[self.rank], 0, group)
        self.same(funcol.wait_tensor(out), torch.cat(a).double(), "float32")
        rs = funcol.reduce_scatter_tensor(torch.cat(a), "sum", 0, group)
        full = self.reduced([torch.cat(a)] * self.world, "SUM")
        self.same(funcol.wait_tensor(rs), full[self.rank * 4:(self.rank + 1) * 4], "float32")
        both = funcol.all_gather_into_tensor_coalesced([a[self.rank], a[self.rank] * 2], group)
        self.same(funcol.wait_tensor(both[1]), torch.cat(a).double() * 2, "float32")
        sc = funcol.reduce_scatter_tensor_coalesced([torch.cat(a)], "avg", [0], group)
        self.same(funcol.wait_tensor(sc[0]), torch.cat(a).double()[self.rank * 4:][:4],
                  "float32")
        ar = funcol.all_reduce(a[self.rank], "max", group)
        self.same(funcol.wait_tensor(ar), self.reduced(a, "MAX"), "float32")
        pair = funcol.all_reduce_coalesced([a[self.rank], -a[self.rank]], "sum", group)
        self.same(funcol.wait_tensor(pair[1]), -self.reduced(a, "SUM"), "float32")

    def objects(self) -> None:
        everyone = [None] * self.world
        dist.all_gather_object(everyone, {"rank": self.rank, "text": "x" * self.rank})
        assert everyone == [{"rank": r, "text": "x" * r} for r in range(self.world)], everyone
        box = [f"from {self.rank}"]
        dist.broadcast_object_list(box, src=self.world - 1)
        assert box == [f"from {self.world - 1}"], box

    def barrier(self) -> None:
        dist.barrier()
        work = dist.barrier(async_op=True)
        work.wait()

    def future_value(self) -> None:
        t = torch.ones(3) * self.rank
        work = dist.all_reduce(t, async_op=True)
        value = work.get_future().wait()
        assert isinstance(value, list) and len(value) == 1 and value[0] is t, value
        chained = work.get_future().then(lambda f: f.value()[0] * 2).wait()
        assert torch.equal(chained, torch.full((3,), 2.0 * sum(range(self.world))))

    def blocking_callback(self) -> None:
        """A .then() callback that blocks until a later collective finishes: it would never
        finish if the callback ran on the ring's loop. The last rank comes late, so that
        the others' op is still running when they attach theirs (a future completed
        already runs a callback at once, in the attaching thread, as torch's do)."""
        last = self.rank == self.world - 1
        release, called, ran_on = threading.Event(), threading.Event(), []
        if last:
            time.sleep(0.5)
        first = dist.all_reduce(torch.ones(1), async_op=True)
        if not last:
            first.get_future().then(lambda f: (ran_on.append(threading.current_thread().name),
                                               called.set(), release.wait(60)))
        first.wait()
        if not last:  # the callback blocks now, wherever it runs
            assert called.wait(30), "the callback never ran"
        later = dist.all_reduce(torch.ones(1), async_op=True)
        later.wait(timeout=datetime.timedelta(seconds=30))
        release.set()
        assert last or ran_on[0].startswith("ringlib-futures"), ran_on

    def subgroup(self) -> None:
        """A ringlib group of ranks 0 and 1 only; the others are never called."""
        group = dist.new_group([0, 1], backend="ringlib")
        t = torch.full((2,), float(self.rank + 1))
        if self.rank < 2:
            dist.all_reduce(t, group=group)
            assert torch.equal(t, torch.full((2,), 3.0)), t
            assert group.size() == 2 and group.name() == "ringlib"
            dist.destroy_process_group(group)
        else:
            assert group == dist.GroupMember.NON_GROUP_MEMBER
        dist.barrier()

    def gloo_subgroup(self) -> None:
        group = dist.new_group(backend="gloo")
        t = torch.ones(2)
        dist.all_reduce(t, group=group)
        assert torch.equal(t, torch.full((2,), float(self.world)))

    def unsupported(self) -> None:
        calls = {"all_to_all_single": lambda: dist.all_to_all_single(torch.empty(self.world),
                                                                     torch.empty(self.world)),
                 "gather": lambda: dist.gather(torch.empty(1), None if self.rank else
                                               [torch.empty(1)] * self.world, dst=0),
                 "scatter": lambda: dist.scatter(torch.empty(1), None if self.rank else
                                                 [torch.empty(1)] * self.world, src=0),
                 "recv from any source": lambda: dist.recv(torch.empty(1))}
        for name, call in calls.items():
            exc = raised(NotImplementedError, call, name)
            assert isinstance(exc, ringlib.NotSupported) and name in str(exc), exc

    def bitwise(self) -> None:
        for op in (R.BAND, R.BOR, R.BXOR):
            exc = raised(ringlib.UnsupportedOp,
                         lambda: dist.all_reduce(torch.ones(2, dtype=torch.int32), op=op), op)
            assert str(op).split(".")[-1] in str(exc), exc

    def integer_avg(self) -> None:
        exc = raised(ringlib.UnsupportedOp,
                     lambda: dist.all_reduce(torch.ones(2, dtype=torch.int64), op=R.AVG),
                     "an integer AVG")
        assert "int64" in str(exc), exc

    def mismatch(self) -> None:
        """Different shapes: MismatchError on every rank, and the group carries on."""
        work = dist.all_reduce(torch.ones(2 + self.rank), async_op=True)
        exc = raised(ringlib.MismatchError, work.wait, "different shapes")
        assert "shape" in str(exc), exc
        t = torch.ones(2)
        dist.all_reduce(t)
        assert torch.equal(t, torch.full((2,), float(self.world)))

    def timeout(self) -> None:
        """A group made with a 1.5 s timeout, whose rank 0 never joins a collective."""
        group = dist.new_group(backend="ringlib", timeout=datetime.timedelta(seconds=1.5))
        if self.rank:
            exc = raised(ringlib.CollectiveTimeout,
                         lambda: dist.all_reduce(torch.ones(2), group=group), "a lone rank")
            assert "1.5" in str(exc), exc
        dist.barrier()
        dist.destroy_process_group(group)

    def destroy_and_reinit_beside_gloo(self) -> None:
        """Destroy everything, then a gloo default group with ringlib groups beside it."""
        ring_group = dist.group.WORLD
        dist.destroy_process_group()
        raised(ringlib.RingClosed, lambda: ring_group.allreduce([torch.ones(1)]),
               "an allreduce on a destroyed group")
        dist.init_process_group("gloo")
        group = dist.new_group(backend="ringlib")
        t = torch.full((3,), float(self.rank))
        dist.all_reduce(t, group=group)
        assert torch.equal(t, torch.full((3,), float(sum(range(self.world)))))
        assert dist.get_backend(group) == "ringlib" and dist.get_backend() == "gloo"


def main() -> None:
    seed, out = int(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("ringlib")
    checks, results = Checks(seed), {}
    for name in check_names():
        print(name, file=sys.stderr, flush=True)  # where it stopped, should it hang
        kind, *args = name.split("-")
        try:
            getattr(checks, kind)(*args)
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
    (out / f"rank{checks.rank}.json").write_text(json.dumps(results))
    if dist.is_initialized():  # unless the last check failed between destroy and init
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
