"""The data job's stages, each with declared inputs and outputs: read, sample, execute, score.

    read     Shard                           -> Read(docs, quarantine)
    sample   docs                            -> Sampled(candidates, funnel, p_api)     (LMStage)
    execute  docs, candidates                -> Executed(results, one per candidate)  (ToolStage)
    score    docs, candidates, results       -> Scored(scored calls)                  (LMStage)

Stages RETURN their outputs; nothing is written into a record on the driver: the score stage pairs
each candidate with its result itself, in the process that scores it. The LM stage is a callable
class in Ray Data's idiom (the model is loaded once in __init__, batches go through its methods);
sample and score are two methods of one class because they share one model per actor. The same class
runs in this process (LocalBackend, `--no-ray`) or as a pool of Ray actors (RayBackend); the
scheduler sees one interface: submit / wait / get. Ray Core actors rather than Ray Data: tool
results flow back to the stage that asked for them, and a shard is published only when all its
batches are through, an explicit per-shard commit rather than a dataset write.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from dataclasses import dataclass
from enum import Enum

import ray
import torch

from toolformer_ray.config import Config
from toolformer_ray.core.annotate import Annotator
from toolformer_ray.core.filtering import ScoredCall
from toolformer_ray.core.sampling import Candidate
from toolformer_ray.core.types import Document
from toolformer_ray.datajob.corpus import read_shard
from toolformer_ray.models import ModelError, load_model, node_name, resolve_on_node
from toolformer_ray.tools import build_tools

FAULT_ENV = "TOOLFORMER_FAULT_LM"  # tests only: "hang_init" / "hang_sample" make an LM actor hang


class TaskKind(Enum):
    """A task the scheduler waits on; the LM kinds are also the LMStage method that runs them."""
    READ = "read"
    SAMPLE = "sample"
    SCORE = "score"


# ------------------------------------------------------------------------------------------ outputs
@dataclass
class Read:
    docs: list[Document]
    quarantine: list[dict]  # records.QUARANTINE_SCHEMA rows
    seconds: float


@dataclass
class Sampled:
    candidates: list[Candidate]
    funnel: dict[str, Counter]  # tool -> counters (records.FUNNEL_KEYS)
    p_api: dict[str, list[float]]  # tool -> p_i of every scored position (the report's histogram)
    seconds: float


@dataclass
class Executed:
    results: list[str | None]  # one per candidate of the batch, in its order; None: no result
    seconds: float  # what the driver waited to collect them


@dataclass
class Scored:
    scored: list[ScoredCall]
    seconds: float


# --------------------------------------------------------------------------------------------- read
def read_docs(shard, corpus_cfg, tokenizer, max_docs) -> Read:
    t = time.perf_counter()
    docs, quarantine = read_shard(shard, corpus_cfg, tokenizer, max_docs=max_docs)
    return Read(docs, quarantine, time.perf_counter() - t)


def storage_env() -> dict[str, str]:
    """Object-store settings of the driver (AWS_* for S3). They go to actors and tasks as call
    arguments, in memory: never in a runtime_env, which Ray's runtime-env agent writes to its log
    and the dashboard shows. Where nodes have their own identity (instance profile, IRSA) this is
    empty or harmless."""
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


def _read_with_env(env: dict[str, str], shard, corpus_cfg, tokenizer, max_docs) -> Read:
    os.environ.update(env)
    return read_docs(shard, corpus_cfg, tokenizer, max_docs)


# ------------------------------------------------------------------------------------ sample, score
class LMStage:
    """Holds the model and the annotator; samples calls for documents and scores executed calls.

    `model` is a directory in this process (--no-ray) or, on Ray, the driver's model spec ({source,
    cache_dir, tiny_seed, revision}), resolved and content-checked into this node's own cache.
    `storage_env` (the driver's AWS_* settings) arrives in memory, as an argument: a runtime_env
    would be logged."""

    def __init__(self, cfg_json: dict, model: str | dict, torch_threads: int | None = None,
                 storage_env: dict[str, str] | None = None):
        _fault("hang_init")
        os.environ.update(storage_env or {})
        if torch_threads:
            torch.set_num_threads(torch_threads)
        cfg = Config.model_validate(cfg_json)
        device = lm_device(cfg.ray.lm_actor_gpus)
        spec = model if isinstance(model, dict) else {}
        if isinstance(model, dict):
            model = str(resolve_on_node(model["source"], model["cache_dir"], model["tiny_seed"],
                                        model["revision"]))
        lm = load_model(model, cfg.model.dtype, cfg.model.cache_dir, device=device)
        # Tools here only give prompts and pre-filters; their resources load on the tool workers.
        tools = build_tools(cfg.enabled_tools())
        self.annotator = Annotator.from_config(lm, tools, cfg)
        self.sampler = self.annotator
        if cfg.sampling.model:  # bootstrapping: another model samples, this one's losses decide
            path = resolve_on_node(cfg.sampling.model, cfg.model.cache_dir, cfg.model.tiny_seed,
                                   spec.get("sampler_revision"))
            slm = load_model(str(path), cfg.model.dtype, cfg.model.cache_dir, device=device)
            if slm.tokenizer.get_vocab() != lm.tokenizer.get_vocab():
                raise ModelError(f"sampling.model {cfg.sampling.model} has another tokenizer than "
                                 f"model.path {cfg.model.path}: calls are scored as token ids")
            self.sampler = Annotator.from_config(slm, tools, cfg)

    def ready(self) -> dict:
        """Where this stage runs, and the attention path its model is served by
        (core.lm.prepare_model): both go to the manifest and to error messages."""
        return {"node": node_name(), "attention": self.annotator.attention}

    def sample(self, docs: list[Document]) -> Sampled:
        _fault("hang_sample")
        t = time.perf_counter()
        r = self.sampler.sample(docs)
        return Sampled(r.candidates, r.funnel, r.p_api, time.perf_counter() - t)

    def score(self, docs: list[Document], candidates: list[Candidate],
              results: list[str | None]) -> Scored:
        t = time.perf_counter()
        executed = [dataclasses.replace(c, result=r)
                    for c, r in zip(candidates, results, strict=True)]
        scored = self.annotator.score(docs, executed)
        return Scored(scored, time.perf_counter() - t)


def _fault(point: str) -> None:
    if os.environ.get(FAULT_ENV) == point:
        time.sleep(10 ** 6)


def lm_device(gpus: float) -> str:
    """The device of an LM stage: the GPU Ray assigned it when it asked for one (Ray sets
    CUDA_VISIBLE_DEVICES to it, so it is cuda:0 here), else the CPU. A GPU asked for and no CUDA
    is an error naming the node, never a silent CPU run."""
    if gpus <= 0:
        return "cpu"
    if not torch.cuda.is_available():
        ids = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        raise ModelError(f"LM actor asked for ray.lm_actor_gpus={gpus:g} and Ray gave it GPU "
                         f"{ids}, but CUDA is not available on node {node_name()} (torch "
                         f"{torch.__version__}, CUDA build {torch.version.cuda}): install a CUDA "
                         "torch there, or set ray.lm_actor_gpus=0")
    return "cuda"


# ------------------------------------------------------------------------------------------ execute
class ToolCalls:
    """One batch's calls in flight on the tool executor, one request per tool."""

    def __init__(self, executor, docs: list[Document], candidates: list[Candidate], cfg: Config):
        self.candidates = candidates
        by_tool: dict[str, list[int]] = {}
        for i, c in enumerate(candidates):
            by_tool.setdefault(c.tool, []).append(i)
        dates = {d.doc_id: d.date for d in docs}
        self.pending = {}  # tool -> (Pending, indices of its candidates)
        for tool, idx in by_tool.items():
            inputs = [candidates[i].call.input for i in idx]
            pending = executor.submit(tool, inputs, [dates.get(candidates[i].doc_id) for i in idx])
            self.pending[tool] = (pending, idx)
        self.wait_s = _tools_wait_s(self.pending, cfg)
        self.deadline = time.monotonic() + self.wait_s

    def done(self) -> bool:
        return all(p.done() for p, _ in self.pending.values())

    def late(self) -> bool:
        return time.monotonic() > self.deadline and not self.done()

    def results(self) -> Executed:
        t = time.perf_counter()
        results: list[str | None] = [None] * len(self.candidates)
        for p, idx in self.pending.values():
            for i, r in zip(idx, p.get()):
                results[i] = r
        return Executed(results, time.perf_counter() - t)


class ToolStage:
    """The execute stage: the calls of a batch go to the tool executor (tools/executor.py), which
    runs them with its dedup, cache, batching, deadlines and retries; their results come back in
    order."""

    def __init__(self, executor, cfg: Config):
        self.executor = executor
        self.cfg = cfg

    def submit(self, docs: list[Document], candidates: list[Candidate]) -> ToolCalls:
        return ToolCalls(self.executor, docs, candidates, self.cfg)

    def stats(self) -> dict:
        return self.executor.stats()

    def shutdown(self) -> None:
        self.executor.shutdown()


def _tools_wait_s(pending: dict, cfg: Config, start_s: float = 600.0) -> float:
    """The longest a batch's tool calls may take: each call its timeout on every allowed attempt,
    plus a worker restart (the pools' start timeout). Generous on purpose: it only catches a pool
    that hangs."""
    total = start_s
    for tool, (_, idx) in pending.items():
        tc = cfg.tools[tool]
        total += len(idx) * tc.timeout_s * (tc.max_retries + 2)
    return total


# -------------------------------------------------------------------------- where the LM stage runs
class _Done:
    """A finished in-process call, shaped like a Ray future for the scheduler: `get` gives its value
    or raises its error there, so one shard's read or model error fails that shard, as on Ray."""

    def __init__(self, fn, *args):
        self.value = None
        self.error = None
        try:
            self.value = fn(*args)
        except Exception as e:  # noqa: BLE001 - re-raised by LocalBackend.get, as Ray's get would
            self.error = e


class LocalBackend:
    """One LMStage in this process; `submit` runs at once."""

    def __init__(self, cfg: Config, model_dir: str):
        self.worker = LMStage(cfg.model_dump(mode="json"), model_dir, cfg.ray.torch_threads)
        self.attention = self.worker.ready()["attention"]
        self.capacity = 1

    def submit(self, kind: TaskKind, *args):
        return _Done(getattr(self.worker, kind.value), *args)

    def wait(self, handles: list, timeout: float) -> list:
        return list(handles)

    def get(self, handle):
        if handle.error is not None:
            raise handle.error
        return handle.value

    def read(self, plan, cfg: Config, tokenizer):
        return _Done(read_docs, plan.shard, cfg.corpus, tokenizer, plan.max_docs)

    def shutdown(self) -> None:
        pass


class LMStartError(RuntimeError):
    """LM actors that could not start: what is missing, in one message."""


class LMTimeout(TimeoutError):
    """An LM task that did not answer within ray.lm_task_timeout_s."""


class RayBackend:
    """A pool of LMStage actors; work goes to the actor with the fewest tasks in flight.

    Each actor resolves the model on its own node (`model_spec`); start-up and every task have
    deadlines (ray.lm_actor_start_timeout_s, ray.lm_task_timeout_s), so a missing GPU or a hung
    actor ends in a message, never a wait without end."""

    def __init__(self, cfg: Config, model_spec: dict):
        rc = cfg.ray
        self.rc = rc
        actor = ray.remote(num_cpus=rc.lm_actor_cpus, num_gpus=rc.lm_actor_gpus, max_restarts=2,
                           max_task_retries=2)(LMStage)
        threads = rc.torch_threads or max(1, int(rc.lm_actor_cpus))
        cfg_json = cfg.model_dump(mode="json")
        env = storage_env()
        self.actors = [actor.remote(cfg_json, model_spec, threads, env)
                       for _ in range(rc.lm_actors)]
        started = self._wait_started(rc.lm_actor_start_timeout_s)
        self.nodes = [s["node"] for s in started]
        self.attention = started[0]["attention"]  # every actor loads the same model
        self.load = {i: 0 for i in range(len(self.actors))}
        self.owner: dict = {}
        self.started: dict = {}  # handle -> (submit time, TaskKind)
        self.expired: set = set()
        self.capacity = rc.lm_actors * rc.max_batches_per_actor
        read = ray.remote(num_cpus=rc.reader_cpus)(_read_with_env)
        self.reader = lambda *args: read.remote(env, *args)
        self.model_spec = model_spec

    def _wait_started(self, timeout: float) -> list[dict]:
        """Wait for every actor's model to load; fail at the first actor that cannot start, or at
        the deadline with what is missing."""
        refs = [a.ready.remote() for a in self.actors]
        deadline = time.monotonic() + timeout
        pending = list(refs)
        try:
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                done, pending = ray.wait(pending, num_returns=1, timeout=min(left, 5.0))
                ray.get(done)  # a constructor error (model, CUDA) surfaces here, at once
        except ray.exceptions.RayError as e:
            self.shutdown()
            raise LMStartError(f"an LM actor failed to start: {_root_message(e)}") from None
        if pending:
            self.shutdown()
            raise LMStartError(f"{len(pending)} of {len(refs)} LM actors did not start in "
                               f"{timeout:g} s (ray.lm_actor_start_timeout_s): "
                               f"{_missing_resources(self.rc)}")
        return ray.get(refs)

    def submit(self, kind: TaskKind, *args):
        i = min(self.load, key=self.load.get)
        ref = getattr(self.actors[i], kind.value).remote(*args)
        self.load[i] += 1
        self.owner[ref] = i
        self.started[ref] = (time.monotonic(), kind)
        return ref

    def wait(self, handles: list, timeout: float) -> list:
        """Every finished handle, blocking up to `timeout` for the first one. A task past its
        deadline counts as finished: `get` then raises, so its shard fails with a message instead
        of waiting forever."""
        if not handles:
            return []
        late = self._expire(handles)
        first, _ = ray.wait(handles, num_returns=1, timeout=0 if late else timeout)
        if not first and not late:
            return []
        ready, _ = ray.wait(handles, num_returns=len(handles), timeout=0)
        return ready + [h for h in late if h not in ready]

    def _expire(self, handles: list) -> list:
        limit = self.rc.lm_task_timeout_s
        now = time.monotonic()
        late = []
        for h in handles:
            start = self.started.get(h)
            if h in self.expired or (start is not None and now - start[0] > limit):
                if h not in self.expired:
                    self.expired.add(h)
                    # A hung actor is killed and restarted by Ray (max_restarts); its other tasks
                    # are retried there or time out in turn.
                    ray.kill(self.actors[self.owner[h]], no_restart=False)
                late.append(h)
        return late

    def get(self, handle):
        i = self.owner.pop(handle, None)
        if i is not None:
            self.load[i] -= 1
        started = self.started.pop(handle, None)
        if handle in self.expired:
            self.expired.discard(handle)
            raise LMTimeout(f"LM actor {i} on {self.nodes[i]} did not answer {started[1].value} in "
                            f"{self.rc.lm_task_timeout_s:g} s (ray.lm_task_timeout_s); the actor "
                            "was restarted")
        return ray.get(handle)

    def read(self, plan, cfg: Config, tokenizer):
        return self.reader(plan.shard, cfg.corpus, tokenizer, plan.max_docs)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)


def _root_message(err: BaseException) -> str:
    """The innermost error's own line (a constructor's ModelError, say), not Ray's wrapper text."""
    text = str(err)
    for line in reversed(text.splitlines()):
        line = line.strip()
        if "Error:" in line and not line.startswith(("ray.exceptions", "File ")):
            return line
    return text.splitlines()[0] if text else type(err).__name__


def _missing_resources(rc) -> str:
    """Why LM actors may be waiting: no node that could ever hold one, or none free now."""
    need = {"CPU": rc.lm_actor_cpus, "GPU": rc.lm_actor_gpus}
    need = {k: v for k, v in need.items() if v > 0}
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    wanted = ", ".join(f"{k}:{v:g}" for k, v in need.items())
    if not any(all(r.get(k, 0) >= v for k, v in need.items()) for r in nodes):
        have = "; ".join(", ".join(f"{k}:{r.get(k, 0):g}" for k in need) for r in nodes)
        return (f"no node has {wanted} (nodes: {have or 'none'}); lower ray.lm_actor_gpus/"
                "lm_actor_cpus or add such nodes")
    free = ray.available_resources()
    return (f"no node has {wanted} free now (free in the cluster: "
            f"{', '.join(f'{k}:{free.get(k, 0):g}' for k in need)}), or the model load is slow: "
            "fewer ray.lm_actors, or a longer ray.lm_actor_start_timeout_s")
