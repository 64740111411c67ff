"""Whole collectives as one compiled call, over the arena that every rank of a ring on one
host maps (transport/arena.py): the compiled half of the latency path.

A call writes this rank's data into its slot of the arena, publishes the collective's
number with a release fence, waits for every peer's number with acquire fences, checks
the peers' signature hashes, and reduces or copies straight out of their slots, in the
style of MPI's shared-memory collectives and NCCL's flags beside the data. An all-reduce
reduces in rank order (x0, then x1, ... into it), so every rank computes the same bits; a
split all-reduce instead has each rank reduce its own chunk from the pieces of it the
peers put in their slots and publish it, and copies the others' chunks (a reduce-scatter
then an all-gather in shared memory), so each byte is read once per rank and every chunk
is computed once.

Waits are bounded: a call polls with `pause` for `spin` ns, then yields the core
(sched_yield) until `spin + give` ns, and then returns WAITING with the collective's
progress in `state`; the caller waits on its event loop and calls again. Each phase is
safe to resume, so a call never blocks past its budget. A call that finishes leaves
`state` as it found it before the first call, ready for the next collective.

Control words of rank r (ctrl[r * WORDS + i], int64, each rank writes only its own):
    DONE       the number of the last collective whose peers' slots it finished reading
               (at the start of collective s it is s - 1: it runs them one at a time)
    for each of its two slots b, at SLOT0 + SLOT_WORDS * b:
        SEQ    the collective whose data the slot holds, published after the data
        HASH   that collective's signature hash
        OUT    for a split all-reduce, the collective whose reduced chunk is in it
A rank writes the slot with the older number, once every peer's DONE has reached it.
A rank that gives up on a collective it published (a lost peer, its deadline) withdraws
it: its HASH becomes WITHDRAWN, and no peer completes the collective with it.
"""

from __future__ import annotations

import platform

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import kernels
from .atomics import load, store

_JIT = dict(nogil=True, cache=True, boundscheck=False)

WORDS = 16                       # control words per rank: 128 bytes, two cache lines
DONE, SLOT0, SLOT_WORDS = 0, 4, 4
SEQ, HASH, OUT = 0, 1, 2

# state: an int64 array the caller fills; the call keeps its progress in it
PHASE, RANK, SIZE, SIG, KIND, OP, ROOT, SLOT, WAITED, CULPRIT = range(10)
PEERS = 16                       # state[PEERS + q]: the slot rank q published in (-1 unknown)
# kinds of collective
ALL_REDUCE, SPLIT_ALL_REDUCE, BROADCAST, ALL_GATHER, REDUCE_SCATTER, BARRIER = range(6)
# ops, as kernels.py has them
SUM, PROD, MIN, MAX, MEAN = range(5)
# what a call returns
FINISHED, WAITING, MISMATCHED, SKIPPED = range(4)
WITHDRAWN = -1                   # a HASH no signature has (they are 63-bit)

_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


@intrinsic
def _pause(typingctx):
    """A spin-wait hint (x86 `pause`, Arm `yield`): the core slows the loop down and an SMT
    sibling gets its share."""

    def codegen(context, builder, signature, args):
        if _X86:
            name, fnty = "llvm.x86.sse2.pause", ir.FunctionType(ir.VoidType(), [])
            builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), [])
        else:
            fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(32)])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.aarch64.hint")
            builder.call(fn, [ir.Constant(ir.IntType(32), 1)])
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def _sched_yield(typingctx):
    """libc's sched_yield(): give the core to another runnable thread, if there is one."""

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(32), [])
        builder.call(cgutils.get_or_insert_function(builder.module, fnty, "sched_yield"), [])
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def _monotonic_ns(typingctx):
    """CLOCK_MONOTONIC in nanoseconds, through libc's clock_gettime (the vDSO: no system call)."""

    def codegen(context, builder, signature, args):
        i32, i64 = ir.IntType(32), ir.IntType(64)
        spec = cgutils.alloca_once(builder, ir.ArrayType(i64, 2))
        fnty = ir.FunctionType(i32, [i32, spec.type])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "clock_gettime")
        builder.call(fn, [ir.Constant(i32, 1), spec])  # CLOCK_MONOTONIC
        zero = ir.Constant(i32, 0)
        sec = builder.load(builder.gep(spec, [zero, zero]))
        nsec = builder.load(builder.gep(spec, [zero, ir.Constant(i32, 1)]))
        return builder.add(builder.mul(sec, ir.Constant(i64, 1_000_000_000)), nsec)

    return types.int64(), codegen


@njit(inline="always")
def _keep_waiting(started, spin, give):
    """Spin, then yield, within the call's budget; False once it is spent."""
    elapsed = _monotonic_ns() - started
    if elapsed < spin:
        _pause()
        return True
    if elapsed < spin + give:
        _sched_yield()
        return True
    return False


@njit(**_JIT)
def _reduce(op, out, src, count):
    n = out.size
    if op == SUM:
        kernels.sum_into(out, src, n)
    elif op == PROD:
        kernels.prod_into(out, src, n)
    elif op == MIN:
        kernels.min_into(out, src, n)
    elif op == MAX:
        kernels.max_into(out, src, n)
    else:
        kernels.mean_into(out, src, n, count)


@njit(inline="always")
def _chunk(n, parts, index):
    """ringlib.partition.chunk: the first n % parts chunks hold one element more."""
    base, extra = n // parts, n % parts
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@njit(inline="always")
def _word(rank, slot, field):
    return rank * WORDS + SLOT0 + SLOT_WORDS * slot + field


@njit(inline="always")
def _copy(dst, src):
    """dst[:] = src[:], as a loop LLVM vectorises (a slice assignment runs at a third of
    memcpy's speed)."""
    for i in range(src.size):
        dst[i] = src[i]


@njit(inline="always")
def _reduce_all(data, buf, state, count):
    """buf = x0 op x1 op ... in rank order, out of the slots (this rank's own, too, where it
    is not rank 0), so that every rank computes the same bits; a mean sums all but the
    last and divides with it."""
    me, size, op = state[RANK], state[SIZE], state[OP]
    if me != 0:
        _copy(buf, data[0, state[PEERS], :buf.size])
    for q in range(1, size):
        step = op if q == size - 1 or op != MEAN else SUM
        _reduce(step, buf, data[q, state[PEERS + q], :buf.size], count)


@njit(inline="always")
def _reduce_own_chunk(data, buf, state, count, start, stop):
    """buf[start:stop] op= every peer's piece of this rank's chunk. Only this rank computes
    its chunk, so the order needs no agreement."""
    me, size, op = state[RANK], state[SIZE], state[OP]
    last = size - 1 if me != size - 1 else size - 2
    for q in range(size):
        if q != me:
            step = op if q == last or op != MEAN else SUM
            _reduce(step, buf[start:stop], data[q, state[PEERS + q], start:stop], count)


@njit(**_JIT)
def withdraw(ctrl, state):
    """Take back what this rank published of the collective in `state` (if it did), so
    that no peer completes it: this rank gave up on it."""
    if state[PHASE] >= 2:
        store(ctrl, _word(state[RANK], state[SLOT], HASH), WITHDRAWN)


@njit(**_JIT)
def run(ctrl, data, buf, state, count, seq, spin, give):
    """Run (or resume) collective number `seq`, which `state` describes; return FINISHED,
    WAITING (for rank state[WAITED]), MISMATCHED (state[CULPRIT] published another
    signature) or SKIPPED (state[CULPRIT] moved past this collective without it).

    ctrl: the arena's control words; data: its slots as (ranks, 2, elements) of buf's
    storage type; buf: this rank's flat buffer (the output of all_gather, whose own block
    is filled); count: the arithmetic type's world size, for a mean; spin, give: the
    budget, in ns of polling and then of yielding.
    """
    me, size, kind = state[RANK], state[SIZE], state[KIND]
    started = _monotonic_ns()
    if state[PHASE] == 0:
        store(ctrl, me * WORDS + DONE, seq - 1)
        older = 0 if ctrl[_word(me, 0, SEQ)] <= ctrl[_word(me, 1, SEQ)] else 1
        state[SLOT] = older
        state[PEERS + me] = older
        state[PHASE] = 1
    slot = state[SLOT]
    if state[PHASE] == 1:
        previous = ctrl[_word(me, slot, SEQ)]
        for q in range(size):
            while q != me and load(ctrl, q * WORDS + DONE) < previous:
                if not _keep_waiting(started, spin, give):
                    state[WAITED] = q
                    return WAITING
        n = buf.size
        if kind == ALL_GATHER:
            n = buf.size // size
            _copy(data[me, slot, :n], buf[me * n:(me + 1) * n])
        elif kind == SPLIT_ALL_REDUCE or kind == REDUCE_SCATTER:  # what the others reduce
            for q in range(size):
                if q != me:
                    start, stop = _chunk(n, size, q)
                    _copy(data[me, slot, start:stop], buf[start:stop])
        elif kind != BARRIER and (kind != BROADCAST or me == state[ROOT]):
            _copy(data[me, slot, :n], buf)
        ctrl[_word(me, slot, HASH)] = state[SIG]
        store(ctrl, _word(me, slot, SEQ), seq)
        state[PHASE] = 2
    if state[PHASE] == 2:
        for q in range(size):
            if q == me or state[PEERS + q] >= 0:
                continue
            rescanned = False
            while True:
                found, later = -1, False
                for b in range(2):
                    published = load(ctrl, _word(q, b, SEQ))
                    if published == seq and ctrl[_word(q, b, HASH)] != WITHDRAWN:
                        found = b
                    elif published > seq:
                        later = True
                if found >= 0:
                    break
                if later:
                    # q may have published this collective in the slot read first just
                    # after that read, finished it, and the next in the other: once a
                    # later one shows, this one shows too (it stays until this rank is
                    # DONE with it), so only a second look without it says q skipped it.
                    if rescanned:
                        state[CULPRIT] = q
                        return SKIPPED
                    rescanned = True
                    continue
                if not _keep_waiting(started, spin, give):
                    state[WAITED] = q
                    return WAITING
            if ctrl[_word(q, found, HASH)] != state[SIG]:
                state[CULPRIT] = q
                return MISMATCHED
            state[PEERS + q] = found
        for q in range(size):  # one found before it was withdrawn: look for it again
            if q != me and load(ctrl, _word(q, state[PEERS + q], HASH)) == WITHDRAWN:
                state[PEERS + q] = -1
                state[WAITED] = q
                return WAITING
        state[PHASE] = 3
    n = buf.size
    if state[PHASE] == 3:
        if kind == ALL_REDUCE:
            _reduce_all(data, buf, state, count)
        elif kind == SPLIT_ALL_REDUCE or kind == REDUCE_SCATTER:
            start, stop = _chunk(n, size, me)
            _reduce_own_chunk(data, buf, state, count, start, stop)
            if kind == SPLIT_ALL_REDUCE:  # the reduced chunk, for the others to copy
                _copy(data[me, slot, start:stop], buf[start:stop])
                store(ctrl, _word(me, slot, OUT), seq)
        elif kind == BROADCAST and me != state[ROOT]:
            root = state[ROOT]
            _copy(buf, data[root, state[PEERS + root], :n])
        elif kind == ALL_GATHER:
            block = n // size
            for q in range(size):
                if q != me:
                    _copy(buf[q * block:(q + 1) * block], data[q, state[PEERS + q], :block])
        state[PHASE] = 4
    if kind == SPLIT_ALL_REDUCE:
        for q in range(size):
            if q == me or state[PEERS + q] >= 2:  # 2 + slot: its chunk is copied
                continue
            b = state[PEERS + q]
            while load(ctrl, _word(q, b, OUT)) != seq:
                if not _keep_waiting(started, spin, give):
                    state[WAITED] = q
                    return WAITING
            start, stop = _chunk(n, size, q)
            _copy(buf[start:stop], data[q, b, start:stop])
            state[PEERS + q] = 2 + b
    store(ctrl, me * WORDS + DONE, seq)
    state[PHASE] = 0
    state[PEERS:] = -1
    return FINISHED
