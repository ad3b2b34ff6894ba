"""Running tool calls: de-duplicated, cached, batched, bounded in time, surviving dead workers.

Two executors with one interface, used by the data job and by inference (the decoder runs its calls
through a LocalToolExecutor, so a tool has the same timeout, retry and cache rules in both):

    ex = RayToolExecutor(cfg.enabled_tools())  # or LocalToolExecutor(...): in-process
    pending = ex.submit("Calculator", ["400/1400", "2+2"], [None, None])   # returns at once
    pending.get()                                  # -> ["0.29", "4"], in input order
    ex.stats()                                     # -> {"Calculator": {"calls": 2, ...}}
    ex.shutdown()

Semantics (both executors):
- A call's identity is (tool, tool.version, input, date if the tool uses dates). Each distinct call
  runs once; later identical calls (in the same batch, in-flight or done) share its result. The
  cache is the executor's own dict in the driver process: it lives as long as the executor (one run,
  or one inference session), is not persisted, and holds every distinct call (inputs are short
  strings).
- Results are cleaned (`clean_result`: one line, no brackets); None means "no result".
- A batch of n calls has n * ToolConfig.timeout_s to finish. A batch that times out, crashes its
  worker or raises is split and its calls re-run one by one, so one bad input cannot sink its
  neighbours. A call that alone times out gets None (a timeout); a call whose worker died is retried
  up to ToolConfig.max_retries times, on a restarted worker, then gets None (a failure). Every call
  resolves: nothing is dropped and `get()` cannot hang.
- `stats()` per tool: calls (submitted), distinct (executed or executing), cache_hits (= calls
  answered by an earlier identical call), executed (distinct calls the tool answered), no_result (of
  those, None), failures, timeouts, retries (re-executions), worker_restarts. calls = distinct +
  cache_hits and distinct = executed + failures + timeouts + (still running).

Ray pools: one pool of actors per tool, ToolConfig.workers actors with worker_cpus / worker_gpus
each. Actors are stateless apart from the tool's read-only resources (loaded once, at start), so any
worker can take any call. A driver thread feeds idle workers, splits the queue evenly across them,
watches deadlines, and replaces workers that died (or that it killed for running past their
deadline).
"""
from __future__ import annotations

import concurrent.futures as cf
import ctypes
import math
import os
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field

from toolformer_ray.errors import UserError
from toolformer_ray.tools import tool_class
from toolformer_ray.tools.base import Tool, clean_result


@dataclass
class ToolStats:
    calls: int = 0
    distinct: int = 0
    cache_hits: int = 0
    executed: int = 0
    no_result: int = 0
    failures: int = 0
    timeouts: int = 0
    retries: int = 0
    worker_restarts: int = 0


class _Call:
    """One distinct call; every submitted duplicate points at the same object."""
    __slots__ = ("input", "date", "result", "outcome", "done", "attempts")

    def __init__(self, inp: str, date: str | None):
        self.input = inp
        self.date = date
        self.result: str | None = None
        self.outcome: str | None = None  # ok | timeout | failure, once done
        self.done = False
        self.attempts = 0  # executions that ended with the worker dead


class Pending:
    """Results of one `submit`, in input order, once every call has resolved."""

    def __init__(self, calls: list[_Call], cond: threading.Condition):
        self._calls = calls
        self._cond = cond

    def done(self) -> bool:
        with self._cond:
            return all(c.done for c in self._calls)

    def get(self, timeout: float | None = None) -> list[str | None]:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not all(c.done for c in self._calls):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError("tool calls still running")
                self._cond.wait(remaining if remaining is not None else 1.0)
            return [c.result for c in self._calls]

    def outcomes(self) -> list[str | None]:
        """Per call: ok (the tool answered; its result may be None), timeout or failure; None while
        unresolved. Inference reports them as the call's status."""
        with self._cond:
            return [c.outcome for c in self._calls]


def wait_any(pendings: list[Pending], timeout: float | None = None) -> None:
    """Block until one of `pendings` (of one executor) is done, or `timeout` seconds have passed."""
    if not pendings:
        return
    deadline = None if timeout is None else time.monotonic() + timeout
    cond = pendings[0]._cond
    with cond:
        while not any(all(c.done for c in p._calls) for p in pendings):
            remaining = 1.0 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return
            cond.wait(remaining)


class _Executor:
    """De-duplication, cache, statistics and resolution; subclasses run the distinct calls."""

    def __init__(self, tool_configs: dict, tool_classes: dict[str, type[Tool]] | None = None):
        self.configs = dict(tool_configs)
        self.classes: dict[str, type[Tool]] = {}
        for name in self.configs:
            if tool_classes and name in tool_classes:
                self.classes[name] = tool_classes[name]
            else:
                try:
                    self.classes[name] = tool_class(name)
                except KeyError as e:
                    raise UserError(str(e.args[0])) from None
        self._cond = threading.Condition()
        self._cache: dict[tuple, _Call] = {}
        self._stats = {name: ToolStats() for name in self.configs}
        self._closed = False

    def submit(self, tool: str, inputs: list[str],
               dates: list[str | None] | None = None) -> Pending:
        """Queue calls of one tool (non-blocking); `Pending.get()` gives the results in input
        order."""
        if tool not in self.configs:
            raise UserError(f"tool {tool!r} is not configured here; configured: "
                            f"{', '.join(self.configs)}")
        dates = [None] * len(inputs) if dates is None else list(dates)
        if len(dates) != len(inputs):
            raise ValueError(f"{len(inputs)} inputs but {len(dates)} dates")
        cls = self.classes[tool]
        slots, new = [], []
        with self._cond:
            if self._closed:
                raise RuntimeError("the tool executor has been shut down")
            stats = self._stats[tool]
            for inp, date in zip(inputs, dates):
                # None -> "None": no result, not a crash
                inp = inp if isinstance(inp, str) else str(inp)
                date = date if cls.uses_date else None
                key = (tool, cls.version, inp, date)
                stats.calls += 1
                call = self._cache.get(key)
                if call is None:
                    call = self._cache[key] = _Call(inp, date)
                    stats.distinct += 1
                    new.append(call)
                else:
                    stats.cache_hits += 1
                slots.append(call)
        if new:
            self._enqueue(tool, new)
        return Pending(slots, self._cond)

    def run(self, tool: str, inputs: list[str],
            dates: list[str | None] | None = None) -> list[str | None]:
        """submit + get."""
        return self.submit(tool, inputs, dates).get()

    def stats(self) -> dict[str, dict]:
        with self._cond:
            return {name: asdict(s) for name, s in self._stats.items()}

    # -- for subclasses ---------------------------------------------------------------------------
    def _enqueue(self, tool: str, calls: list[_Call]) -> None:
        raise NotImplementedError

    def _resolve(self, tool: str, call: _Call, result: str | None, outcome: str = "ok") -> None:
        with self._cond:
            if call.done:
                return
            stats = self._stats[tool]
            call.result = clean_result(result) if outcome == "ok" else None
            call.outcome = outcome
            call.done = True
            if outcome == "ok":
                stats.executed += 1
                stats.no_result += call.result is None
            elif outcome == "timeout":
                stats.timeouts += 1
            else:
                stats.failures += 1
            self._cond.notify_all()

    def _count(self, tool: str, **increments: int) -> None:
        with self._cond:
            stats = self._stats[tool]
            for name, n in increments.items():
                setattr(stats, name, getattr(stats, name) + n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    def shutdown(self) -> None:
        raise NotImplementedError


def _checked(results, n: int) -> list[str | None]:
    """A tool's `run` output, or ValueError when it breaks the contract (wrong length or type)."""
    if not isinstance(results, list) or len(results) != n:
        raise ValueError(f"tool returned {type(results).__name__} of length "
                         f"{len(results) if hasattr(results, '__len__') else '?'} for {n} inputs")
    return [r if isinstance(r, str) else None for r in results]


def _batches(calls: list[_Call], size: int) -> list[list[_Call]]:
    return [calls[i:i + size] for i in range(0, len(calls), size)]


class LocalToolExecutor(_Executor):
    """In-process execution (--no-ray, tests, inference).

    `tools`: tools built and loaded already (inference hands over its own); otherwise each
    configured tool is built and loaded here. `threads` = 0: calls run inside `submit` (the data
    job); n > 0: in a pool of n threads, so `submit` returns at once and calls of different tools
    run in parallel (the decoder goes on decoding other rows meanwhile).

    A time limit cannot stop Python code in the same process: a batch runs in a daemon thread, and
    one that outlives its deadline is abandoned (its calls then run one by one; the one that is
    still too slow gets None as a timeout). There is no process to crash, so max_retries does not
    apply.
    """

    def __init__(self, tool_configs: dict, tool_classes: dict[str, type[Tool]] | None = None,
                 tools: dict[str, Tool] | None = None, threads: int = 0):
        if tools is not None:
            tool_classes = {name: type(tool) for name, tool in tools.items()}
        super().__init__(tool_configs, tool_classes)
        self.tools: dict[str, Tool] = {}
        for name, tc in self.configs.items():
            if tools is not None and name in tools:
                self.tools[name] = tools[name]
                continue
            tool = self.classes[name](tc.options)
            tool.load()
            self.tools[name] = tool
        self._threads = None
        if threads:
            self._threads = cf.ThreadPoolExecutor(threads, thread_name_prefix="tools")

    def _enqueue(self, tool: str, calls: list[_Call]) -> None:
        if self._threads is None:
            self._run_calls(tool, calls)
        else:
            self._threads.submit(self._run_calls, tool, calls)

    def _run_calls(self, tool: str, calls: list[_Call]) -> None:
        for batch in _batches(calls, self.configs[tool].batch_size):
            self._run_batch(tool, batch)

    def _run_batch(self, tool: str, batch: list[_Call]) -> None:
        results, outcome = self._run_with_deadline(tool, batch)
        if outcome == "ok":
            for call, result in zip(batch, results):
                self._resolve(tool, call, result)
        elif len(batch) > 1:
            self._count(tool, retries=len(batch))
            for call in batch:
                self._run_batch(tool, [call])
        else:
            self._resolve(tool, batch[0], None, outcome)

    def _run_with_deadline(self, tool: str, batch: list[_Call]) -> tuple[list | None, str]:
        box: dict = {}

        def target():
            try:
                results = self.tools[tool].run([c.input for c in batch], [c.date for c in batch])
                box["results"] = _checked(results, len(batch))
            except BaseException as e:  # noqa: BLE001 - a tool broke its contract; recorded as a failure
                box["error"] = e

        thread = threading.Thread(target=target, daemon=True, name=f"tool-{tool}")
        thread.start()
        thread.join(self.configs[tool].timeout_s * len(batch))
        if thread.is_alive():
            _stop_thread(thread)
            return None, "timeout"
        if "error" in box:
            return None, "failure"
        return box["results"], "ok"

    def shutdown(self) -> None:
        """Calls not run yet are dropped and resolve as failures: nothing waits on a closed
        executor."""
        with self._cond:
            self._closed = True
            unresolved = [(key[0], call) for key, call in self._cache.items() if not call.done]
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
        for tool, call in unresolved:
            self._resolve(tool, call, None, "failure")


class _Abandoned(BaseException):
    """Raised inside a tool thread that ran past its deadline (BaseException: tools catch
    Exception)."""


def _stop_thread(thread: threading.Thread) -> None:
    """Stop an abandoned tool thread rather than leave it spinning: raise _Abandoned in it. Python
    delivers it at the thread's next bytecode, so a pure-Python loop stops at once; a thread blocked
    inside one C call (a sleep, a socket read) stops when that call returns."""
    if thread.ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident),
                                                   ctypes.py_object(_Abandoned))


class ToolWorker:
    """A Ray actor holding one loaded tool. Never raises from `run`: a batch that raises is re-run
    call by call in the worker, and the calls that raise alone are reported back as failed."""

    def __init__(self, cls: type[Tool], options: dict):
        self.tool = cls(options)
        self.tool.load()

    def ready(self) -> int:
        return os.getpid()

    def run(self, inputs: list[str], dates: list[str | None]) -> tuple[list[str | None], list[int]]:
        try:
            return _checked(self.tool.run(inputs, dates), len(inputs)), []
        except Exception:  # noqa: BLE001
            if len(inputs) == 1:
                return [None], [0]
        results, failed = [], []
        for i, (inp, date) in enumerate(zip(inputs, dates)):
            try:
                results.append(_checked(self.tool.run([inp], [date]), 1)[0])
            except Exception:  # noqa: BLE001
                results.append(None)
                failed.append(i)
        return results, failed


@dataclass
class _Slot:
    actor: object = None
    state: str = "starting"  # starting | idle | busy
    ref: object = None  # ready() while starting, run() while busy
    batch: list = field(default_factory=list)
    deadline: float = 0.0


@dataclass
class _Pool:
    name: str
    config: object
    cls: type
    remote: object  # the ray.remote actor class with this pool's resources
    slots: list[_Slot] = field(default_factory=list)
    queue: deque = field(default_factory=deque)  # fresh calls, batched
    # calls to run one by one (after a crash, a timeout, an error)
    retry: deque = field(default_factory=deque)
    start_failures: int = 0
    broken: str | None = None  # why the pool cannot run calls any more


class RayToolExecutor(_Executor):
    """One pool of Ray actors per tool; see the module docstring for the guarantees.

    Construction starts every pool and waits (up to `start_timeout_s`) until each worker has loaded
    its tool, so a bad index path or model directory is a UserError here, not a run of empty
    results.
    """

    def __init__(self, tool_configs: dict, tool_classes: dict[str, type[Tool]] | None = None,
                 start_timeout_s: float = 600.0, poll_s: float = 0.02):
        import ray

        super().__init__(tool_configs, tool_classes)
        self._ray = ray
        self.start_timeout_s = start_timeout_s
        self._poll_s = poll_s
        self._pools: dict[str, _Pool] = {}
        self._refs: dict = {}  # ObjectRef -> (pool, slot)
        actor_cls = ray.remote(ToolWorker)
        try:
            for name, tc in self.configs.items():
                remote = actor_cls.options(num_cpus=tc.worker_cpus, num_gpus=tc.worker_gpus,
                                           max_restarts=0, max_task_retries=0, max_concurrency=1)
                pool = self._pools[name] = _Pool(name, tc, self.classes[name], remote)
                for _ in range(tc.workers):
                    slot = _Slot()
                    pool.slots.append(slot)
                    self._start(pool, slot)
            self._wait_started()
        except BaseException:
            self._kill_all()
            raise
        self._stop = False
        self._dead: str | None = None
        self._thread = threading.Thread(target=self._loop, daemon=True, name="tool-pools")
        self._thread.start()

    # -- lifecycle --------------------------------------------------------------------------------
    def _start(self, pool: _Pool, slot: _Slot) -> None:
        slot.actor = pool.remote.remote(pool.cls, pool.config.options)
        slot.state, slot.batch = "starting", []
        slot.ref = slot.actor.ready.remote()
        slot.deadline = time.monotonic() + self.start_timeout_s
        self._refs[slot.ref] = (pool, slot)

    def _wait_started(self) -> None:
        ray = self._ray
        for pool in self._pools.values():
            for slot in pool.slots:
                ref = slot.ref
                try:
                    ray.get(ref, timeout=max(0.0, slot.deadline - time.monotonic()))
                except ray.exceptions.GetTimeoutError:
                    raise UserError(f"{pool.name} workers did not start within "
                                    f"{self.start_timeout_s:.0f} s (each asks for "
                                    f"{pool.config.worker_cpus} CPU, {pool.config.worker_gpus} "
                                    "GPU: does the cluster have them?)") from None
                except ray.exceptions.RayError as e:
                    raise UserError(f"{pool.name} workers could not start: "
                                    f"{_root_cause(e)}") from None
                del self._refs[ref]
                slot.state, slot.ref = "idle", None

    def _kill_all(self) -> None:
        for pool in self._pools.values():
            for slot in pool.slots:
                if slot.actor is not None:
                    try:
                        self._ray.kill(slot.actor, no_restart=True)
                    except Exception:  # noqa: BLE001 - already gone
                        pass

    def shutdown(self) -> None:
        """Stop the driver thread and the workers; calls still unresolved get None (failures)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=10)
        self._kill_all()
        for pool in self._pools.values():
            leftovers = list(pool.queue) + list(pool.retry)
            leftovers += [c for s in pool.slots for c in s.batch]
            pool.queue.clear()
            pool.retry.clear()
            for call in leftovers:
                self._resolve(pool.name, call, None, "failure")

    def worker_pids(self, tool: str) -> list[int]:
        """Process ids of a pool's live workers (for tests and debugging)."""
        ray = self._ray
        slots = [s for s in self._pools[tool].slots if s.state != "starting"]
        return ray.get([s.actor.ready.remote() for s in slots])

    # -- the driver thread ------------------------------------------------------------------------
    def _enqueue(self, tool: str, calls: list[_Call]) -> None:
        pool = self._pools[tool]
        with self._cond:
            if pool.broken:
                broken = True
            else:
                broken = False
                pool.queue.extend(calls)
                self._cond.notify_all()
        if broken:
            for call in calls:
                self._resolve(tool, call, None, "failure")

    def _loop(self) -> None:
        try:
            self._loop_body()
        except BaseException as e:  # noqa: BLE001 - a dead driver thread must not leave callers waiting
            self._die(f"the tool pools' driver thread died: {type(e).__name__}: {e}")

    def _die(self, reason: str) -> None:
        """Every unresolved call fails, and later ones fail at once: nothing waits on a dead
        thread."""
        with self._cond:
            self._dead = reason
            leftovers = []
            for pool in self._pools.values():
                pool.broken = pool.broken or reason
                leftovers += [(pool.name, c) for c in list(pool.queue) + list(pool.retry)]
                leftovers += [(pool.name, c) for slot in pool.slots for c in slot.batch]
                pool.queue.clear()
                pool.retry.clear()
        for name, call in leftovers:
            self._resolve(name, call, None, "failure")

    def _loop_body(self) -> None:
        ray = self._ray
        while True:
            with self._cond:
                if self._stop:
                    return
                self._dispatch()
                if not self._refs:
                    self._cond.wait(0.5)
                    continue
                refs = list(self._refs)
            try:
                ready, _ = ray.wait(refs, num_returns=1, timeout=self._poll_s)
                if ready:
                    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            except Exception:  # noqa: BLE001 - Ray shutting down under us
                if self._stop:
                    return
                raise
            for ref in ready:
                self._complete(ref)
            self._check_deadlines()

    def _dispatch(self) -> None:
        """Give work to idle workers (called with the lock held): retries one call at a time, fresh
        calls split evenly across the idle workers, at most batch_size each."""
        now = time.monotonic()
        for pool in self._pools.values():
            idle = [s for s in pool.slots if s.state == "idle"]
            for k, slot in enumerate(idle):
                if pool.retry:
                    batch = [pool.retry.popleft()]
                elif pool.queue:
                    share = math.ceil(len(pool.queue) / (len(idle) - k))
                    n = min(pool.config.batch_size, share)
                    batch = [pool.queue.popleft() for _ in range(n)]
                else:
                    break
                slot.state, slot.batch = "busy", batch
                slot.ref = slot.actor.run.remote([c.input for c in batch], [c.date for c in batch])
                slot.deadline = now + pool.config.timeout_s * len(batch)
                self._refs[slot.ref] = (pool, slot)

    def _complete(self, ref) -> None:
        ray = self._ray
        entry = self._refs.pop(ref, None)
        if entry is None:
            return
        pool, slot = entry
        if slot.state == "starting":
            try:
                ray.get(ref)
                with self._cond:
                    slot.state, slot.ref = "idle", None
                    pool.start_failures = 0
            except ray.exceptions.RayError as e:
                self._start_failed(pool, slot, _root_cause(e))
            return
        batch = slot.batch
        try:
            results, failed = ray.get(ref)
        except ray.exceptions.RayTaskError:  # an exception escaped the worker: a bad batch
            with self._cond:
                slot.state, slot.ref, slot.batch = "idle", None, []
            self._split_or_fail(pool, batch, "failure")
            return
        except ray.exceptions.RayError:  # the worker died (killed, OOM, segfault): restart, retry
            self._count(pool.name, worker_restarts=1)
            with self._cond:
                self._start(pool, slot)
            self._retry_after_crash(pool, batch)
            return
        with self._cond:
            slot.state, slot.ref, slot.batch = "idle", None, []
        failed = set(failed)
        for i, (call, result) in enumerate(zip(batch, results)):
            self._resolve(pool.name, call, result, "failure" if i in failed else "ok")

    def _retry_after_crash(self, pool: _Pool, batch: list[_Call]) -> None:
        again = []
        for call in batch:
            call.attempts += 1
            if call.attempts > pool.config.max_retries:
                self._resolve(pool.name, call, None, "failure")
            else:
                again.append(call)
        if again:
            self._count(pool.name, retries=len(again))
            with self._cond:
                pool.retry.extend(again)

    def _split_or_fail(self, pool: _Pool, batch: list[_Call], outcome: str) -> None:
        if len(batch) > 1:
            self._count(pool.name, retries=len(batch))
            with self._cond:
                pool.retry.extend(batch)
        else:
            for call in batch:
                self._resolve(pool.name, call, None, outcome)

    def _start_failed(self, pool: _Pool, slot: _Slot, reason: str) -> None:
        """A replacement worker could not start: try again a few times, then declare the pool
        broken."""
        self._count(pool.name, worker_restarts=1)
        with self._cond:
            pool.start_failures += 1
            if pool.start_failures <= max(3, pool.config.max_retries + 1):
                self._start(pool, slot)
                return
            slot.state = "dead"
            if any(s.state != "dead" for s in pool.slots):
                return  # the other workers carry on
            pool.broken = f"workers cannot start: {reason}"
            leftovers = list(pool.queue) + list(pool.retry)
            pool.queue.clear()
            pool.retry.clear()
        for call in leftovers:
            self._resolve(pool.name, call, None, "failure")

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        expired = [(ref, pool, slot) for ref, (pool, slot) in list(self._refs.items())
                   if slot.deadline < now]
        for ref, pool, slot in expired:
            self._refs.pop(ref, None)
            try:
                self._ray.kill(slot.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead
                pass
            if slot.state == "starting":
                self._start_failed(pool, slot, f"not ready within {self.start_timeout_s:.0f} s")
                continue
            batch = slot.batch
            self._count(pool.name, worker_restarts=1)
            with self._cond:
                self._start(pool, slot)
            self._split_or_fail(pool, batch, "timeout")

    def pool_errors(self) -> dict[str, str]:
        """Pools that stopped running calls, with the reason (also visible as failures in stats);
        all of them, with the driver thread's error, if that thread died."""
        return {name: p.broken for name, p in self._pools.items() if p.broken}


def _root_cause(error: BaseException) -> str:
    """The innermost message of a Ray error (an actor's __init__ exception, e.g. a missing
    index)."""
    cause = getattr(error, "cause", None) or error.__cause__
    while cause is not None and (getattr(cause, "cause", None) or cause.__cause__) is not None:
        cause = getattr(cause, "cause", None) or cause.__cause__
    text = str(cause or error).strip().splitlines()
    return text[-1] if text else type(error).__name__
