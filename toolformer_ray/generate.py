"""`toolformer-ray generate`: the data-generation job, on Ray or in one process.

Stages (DESIGN.md): read shard -> [sample] LM actors -> [execute] tool-worker pools -> [filter] LM actors
-> [merge] driver -> publish the shard's tables, commit. The driver streams work through bounded queues:
LM actors get at most `ray.max_batches_per_actor` document batches at a time (back-pressure), tools run
while the LM actors sample or score other batches, and shards are read ahead only as far as they are
needed. Shards commit in input order, so the per-tool cap (`max_kept`) fills the same way whatever order
workers finish in, and a killed run, restarted, redoes exactly the uncommitted shards.

Ray Core actors rather than Ray Data: the two LM stages share one model per actor (sample and score are
methods of the same actor), tool results flow back to the stage that asked for them, and a shard is
published only when all its batches are through, which is an explicit per-shard commit rather than a
dataset write. `--no-ray` runs the same scheduler with in-process stand-ins for the actors.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from toolformer_ray.api_text import Markers
from toolformer_ray.config import Config
from toolformer_ray.core.filtering import ScoredCall
from toolformer_ray.core.merge import inserted_text, merge_documents
from toolformer_ray.core.sampling import Candidate
from toolformer_ray.core.types import Document
from toolformer_ray.report import p_api_counts
from toolformer_ray.version import code_version
from toolformer_ray.schema import (CALLS_SCHEMA, CANDIDATES_SCHEMA, DOCUMENTS_SCHEMA, QUARANTINE_SCHEMA,
                                   SCHEMA_VERSION)


# --------------------------------------------------------------------------------------------- LM worker
FAULT_ENV = "TOOLFORMER_FAULT_LM"  # tests only: "hang_init" / "hang_sample" make an LM actor hang


class LMWorker:
    """Holds the model and the annotator; runs the sample and filter stages on batches of documents.

    `model` is a directory in this process (--no-ray) or, on Ray, the driver's model spec ({source,
    cache_dir, tiny_seed, revision}), resolved and content-checked into this node's own cache.
    `storage_env` (the driver's AWS_* settings) arrives in memory, as an argument: a runtime_env would
    be logged."""

    def __init__(self, cfg_json: dict, model: str | dict, torch_threads: int | None = None,
                 storage_env: dict[str, str] | None = None):
        import torch

        from toolformer_ray.core.annotate import Annotator
        from toolformer_ray.models import ModelError, load_model, resolve_on_node
        from toolformer_ray.tools import build_tools

        _fault("hang_init")
        os.environ.update(storage_env or {})
        if torch_threads:
            torch.set_num_threads(torch_threads)
        cfg = Config.model_validate(cfg_json)
        device = _lm_device(cfg.ray.lm_actor_gpus)
        spec = model if isinstance(model, dict) else None
        if isinstance(model, dict):
            model = str(resolve_on_node(model["source"], model["cache_dir"], model["tiny_seed"],
                                        model["revision"]))
        lm = load_model(model, cfg.model.dtype, cfg.model.cache_dir, device=device)
        # Tools here only give prompts and pre-filters; their resources load on the tool workers.
        tools = build_tools(cfg.enabled_tools())
        self.annotator = Annotator.from_config(lm, tools, cfg)
        self.sampler = self.annotator
        if cfg.sampling.model:  # bootstrapping: another model samples, this one's losses decide
            rev = spec.get("sampler_revision") if spec else None
            path = resolve_on_node(cfg.sampling.model, cfg.model.cache_dir, cfg.model.tiny_seed, rev)
            slm = load_model(str(path), cfg.model.dtype, cfg.model.cache_dir, device=device)
            if slm.tokenizer.get_vocab() != lm.tokenizer.get_vocab():
                raise ModelError(f"sampling.model {cfg.sampling.model} has another tokenizer than "
                                 f"model.path {cfg.model.path}: calls are scored as token ids")
            self.sampler = Annotator.from_config(slm, tools, cfg)

    def ready(self) -> dict:
        """Where this actor runs, and the attention path its model is served by
        (core.lm.prepare_model): both go to the manifest and to error messages."""
        from toolformer_ray.models import node_name

        return {"node": node_name(), "attention": self.annotator.attention}

    def sample(self, docs: list[Document]):
        _fault("hang_sample")
        t = time.perf_counter()
        result = self.sampler.sample(docs)
        return result, time.perf_counter() - t

    def score(self, docs: list[Document], candidates: list[Candidate]):
        t = time.perf_counter()
        scored = self.annotator.score(docs, candidates)
        return scored, time.perf_counter() - t


def _fault(point: str) -> None:
    if os.environ.get(FAULT_ENV) == point:
        time.sleep(10 ** 6)


def _lm_device(gpus: float) -> str:
    """The device of an LM actor: the GPU Ray assigned it when it asked for one (Ray sets
    CUDA_VISIBLE_DEVICES to it, so it is cuda:0 here), else the CPU. A GPU asked for and no CUDA
    is an error naming the node, never a silent CPU run."""
    import torch

    from toolformer_ray.models import ModelError, node_name

    if gpus <= 0:
        return "cpu"
    if not torch.cuda.is_available():
        ids = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        raise ModelError(f"LM actor asked for ray.lm_actor_gpus={gpus:g} and Ray gave it GPU {ids}, "
                         f"but CUDA is not available on node {node_name()} (torch "
                         f"{torch.__version__}, CUDA build {torch.version.cuda}): install a CUDA "
                         "torch there, or set ray.lm_actor_gpus=0")
    return "cuda"


class _Done:
    """A finished in-process call, shaped like a Ray future for the scheduler: `get` gives its value or
    raises its error there, so one shard's read or model error fails that shard, as on Ray."""

    def __init__(self, fn, *args):
        try:
            self.value, self.error = fn(*args), None
        except Exception as e:  # noqa: BLE001 - re-raised by LocalBackend.get, where the scheduler expects it
            self.value, self.error = None, e


class LocalBackend:
    """One LMWorker in this process; `submit` runs at once."""

    def __init__(self, cfg: Config, model_dir: str):
        self.worker = LMWorker(cfg.model_dump(mode="json"), model_dir, cfg.ray.torch_threads)
        self.attention = self.worker.ready()["attention"]
        self.capacity = 1

    def submit(self, method: str, *args):
        return _Done(getattr(self.worker, method), *args)

    def wait(self, handles: list, timeout: float) -> list:
        return list(handles)

    def get(self, handle):
        if handle.error is not None:
            raise handle.error
        return handle.value

    def read(self, plan, cfg: Config, tokenizer):
        return _Done(_timed_read, plan.shard, cfg.corpus, tokenizer, plan.max_docs)

    def shutdown(self) -> None:
        pass


def _timed_read(shard, corpus_cfg, tokenizer, max_docs):
    from toolformer_ray.corpus import read_shard

    t = time.perf_counter()
    docs, quarantine = read_shard(shard, corpus_cfg, tokenizer, max_docs=max_docs)
    return docs, quarantine, time.perf_counter() - t


def _storage_env() -> dict[str, str]:
    """Object-store settings of the driver (AWS_* for S3). They go to actors and tasks as call
    arguments, in memory: never in a runtime_env, which Ray's runtime-env agent writes to its log and
    the dashboard shows. Where nodes have their own identity (instance profile, IRSA) this is empty
    or harmless."""
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


def _read_with_env(storage_env: dict[str, str], shard, corpus_cfg, tokenizer, max_docs):
    os.environ.update(storage_env)
    return _timed_read(shard, corpus_cfg, tokenizer, max_docs)


class LMStartError(RuntimeError):
    """LM actors that could not start: what is missing, in one message."""


class LMTimeout(TimeoutError):
    """An LM task that did not answer within ray.lm_task_timeout_s."""


class RayBackend:
    """A pool of LMWorker actors; work goes to the actor with the fewest tasks in flight.

    Each actor resolves the model on its own node (`model_spec`); start-up and every task have
    deadlines (ray.lm_actor_start_timeout_s, ray.lm_task_timeout_s), so a missing GPU or a hung actor
    ends in a message, never a wait without end."""

    def __init__(self, cfg: Config, model_spec: dict):
        import ray

        self.ray = ray
        rc = cfg.ray
        self.rc = rc
        actor = ray.remote(num_cpus=rc.lm_actor_cpus, num_gpus=rc.lm_actor_gpus, max_restarts=2,
                           max_task_retries=2)(LMWorker)
        threads = rc.torch_threads or max(1, int(rc.lm_actor_cpus))
        cfg_json = cfg.model_dump(mode="json")
        env = _storage_env()
        self.actors = [actor.remote(cfg_json, model_spec, threads, env)
                       for _ in range(rc.lm_actors)]
        started = self._wait_started(rc.lm_actor_start_timeout_s)
        self.nodes = [s["node"] for s in started]
        self.attention = started[0]["attention"]  # every actor loads the same model
        self.load = {i: 0 for i in range(len(self.actors))}
        self.owner: dict = {}
        self.started: dict = {}  # handle -> (submit time, method)
        self.expired: set = set()
        self.capacity = rc.lm_actors * rc.max_batches_per_actor
        read = ray.remote(num_cpus=rc.reader_cpus)(_read_with_env)
        self.reader = lambda *args: read.remote(env, *args)
        self.model_spec = model_spec

    def _wait_started(self, timeout: float) -> list[dict]:
        """Wait for every actor's model to load; fail at the first actor that cannot start, or at
        the deadline with what is missing."""
        ray = self.ray
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

    def submit(self, method: str, *args):
        i = min(self.load, key=self.load.get)
        ref = getattr(self.actors[i], method).remote(*args)
        self.load[i] += 1
        self.owner[ref] = i
        self.started[ref] = (time.monotonic(), method)
        return ref

    def wait(self, handles: list, timeout: float) -> list:
        """Every finished handle, blocking up to `timeout` for the first one. A task past its deadline
        counts as finished: `get` then raises, so its shard fails with a message instead of waiting
        forever."""
        if not handles:
            return []
        late = self._expire(handles)
        first, _ = self.ray.wait(handles, num_returns=1, timeout=0 if late else timeout)
        if not first and not late:
            return []
        ready, _ = self.ray.wait(handles, num_returns=len(handles), timeout=0)
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
                    self.ray.kill(self.actors[self.owner[h]], no_restart=False)
                late.append(h)
        return late

    def get(self, handle):
        i = self.owner.pop(handle, None)
        if i is not None:
            self.load[i] -= 1
        started = self.started.pop(handle, None)
        if handle in self.expired:
            self.expired.discard(handle)
            raise LMTimeout(f"LM actor {i} on {self.nodes[i]} did not answer {started[1]} in "
                            f"{self.rc.lm_task_timeout_s:g} s (ray.lm_task_timeout_s); the actor "
                            "was restarted")
        return self.ray.get(handle)

    def read(self, plan, cfg: Config, tokenizer):
        return self.reader(plan.shard, cfg.corpus, tokenizer, plan.max_docs)

    def shutdown(self) -> None:
        for a in self.actors:
            self.ray.kill(a)


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
    import ray

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


# ------------------------------------------------------------------------------------------- scheduling
@dataclass
class Batch:
    shard: int  # index in the run's shard list
    docs: list[Document]
    candidates: list[Candidate] = field(default_factory=list)
    pending_tools: dict = field(default_factory=dict)  # tool -> (Pending, [candidates])
    scored: list[ScoredCall] = field(default_factory=list)
    tools_deadline: float = 0.0  # monotonic time by which its tool calls must have resolved


@dataclass
class ShardWork:
    plan: Any
    docs: list[Document] | None = None
    quarantine: list[dict] = field(default_factory=list)
    batches_left: int = -1
    scored: list[ScoredCall] = field(default_factory=list)
    funnel: dict[str, Counter] = field(default_factory=dict)
    timings: Counter = field(default_factory=Counter)
    p_api_hist: dict = field(default_factory=dict)  # tool -> counts of p_api at every position (report)
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.error is not None or self.batches_left == 0


@dataclass
class GenerateSummary:
    output: str
    config_hash: str
    shards_total: int
    shards_skipped: int
    shards_done: int
    shards_failed: dict[str, str]
    documents: int
    quarantined: int
    calls_kept: dict[str, int]
    seconds: float
    report: str | None
    manifest: str
    errors: list[str] = field(default_factory=list)  # run-level failures (the manifest could not be written)

    @property
    def ok(self) -> bool:
        """Everything planned is done: no failed shard, manifest and report written."""
        return not self.shards_failed and not self.errors

    def describe(self) -> str:
        kept = ", ".join(f"{t}: {n}" for t, n in self.calls_kept.items()) or "none"
        lines = [
            f"generate: {self.shards_done} shard(s) processed, {self.shards_skipped} already done, "
            f"{len(self.shards_failed)} failed, of {self.shards_total}; {self.documents} documents, "
            f"{self.quarantined} records quarantined, in {self.seconds:.0f} s",
            f"kept calls this run: {kept}",
            f"output:   {self.output}  (config hash {self.config_hash})",
            f"manifest: {self.manifest}",
        ]
        if self.report:
            lines.append(f"report:   {self.report}")
        for sid, err in self.shards_failed.items():
            lines.append(f"FAILED {sid}: {err}")
        lines += [f"FAILED {err}" for err in self.errors]
        return "\n".join(lines)


class Progress:
    """Documents, calls and kept counts with rate and ETA: a live bar on a terminal, log lines otherwise."""

    def __init__(self, total_shards: int, enabled: bool = True):
        self.start = time.time()
        self.total_shards = total_shards
        self.shards = self.docs = self.docs_known = self.calls = self.kept = 0
        self.last_log = 0.0
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=0, unit="doc", desc="generate", file=sys.stderr, dynamic_ncols=True)

    def update(self, docs_done: int = 0, docs_known: int = 0, calls: int = 0, kept: int = 0, shards: int = 0):
        self.docs += docs_done
        self.docs_known += docs_known
        self.calls += calls
        self.kept += kept
        self.shards += shards
        if self.bar is not None:
            self.bar.total = self.docs_known
            self.bar.set_postfix(calls=self.calls, kept=self.kept, shards=f"{self.shards}/{self.total_shards}")
            self.bar.update(docs_done)
        elif time.time() - self.last_log > 10 or shards:
            self.last_log = time.time()
            print(self.line(), file=sys.stderr, flush=True)

    def line(self) -> str:
        elapsed = time.time() - self.start
        rate = self.docs / elapsed if elapsed > 0 else 0.0
        left = self.docs_known - self.docs
        eta = f", ETA {left / rate:.0f} s (read shards)" if rate > 0 and left > 0 else ""
        return (f"[generate] shards {self.shards}/{self.total_shards}, docs {self.docs}/{self.docs_known} read, "
                f"calls {self.calls}, kept {self.kept}, {rate:.2f} docs/s{eta}")

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------- driver
def _init_ray(cfg: Config) -> bool:
    """Join the job's cluster (RAY_ADDRESS, set by `ray job submit`) or cfg.ray.address; else start a local
    Ray. Returns whether this call started it (and so should stop it)."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=True)
    return True


def _check_local_resources(cfg: Config, tools_cfg: dict) -> None:
    """On a local Ray nothing will ever add CPUs: asking for more than there are would wait forever."""
    import ray

    from toolformer_ray.errors import UserError

    have = ray.cluster_resources().get("CPU", 0)
    need = (cfg.ray.lm_actors * cfg.ray.lm_actor_cpus + cfg.ray.reader_cpus
            + sum(tc.workers * tc.worker_cpus for tc in tools_cfg.values()))
    if need > have + 1e-9:
        raise UserError(f"the LM actors, tool workers and shard reader ask for {need:g} CPUs but local Ray has "
                        f"{have:g}: lower ray.lm_actor_cpus, tools.*.worker_cpus or ray.reader_cpus "
                        "(they are Ray's bookkeeping; torch threads are set by ray.torch_threads)")


def _model_info(model_dir: str, cfg: Config) -> dict:
    from toolformer_ray.models import directory_revision, resolve_model_dir

    # An s3:// model is named by its URI (the driver's cache path means nothing on other nodes).
    path = cfg.model.path if "://" in cfg.model.path else model_dir
    info = {"path": path, "requested": cfg.model.path, "revision": directory_revision(model_dir),
            "dtype": cfg.model.dtype}
    if cfg.sampling.model:  # the model that sampled the calls (bootstrapping); losses: `path`'s
        sampler = resolve_model_dir(cfg.sampling.model, cfg.model.cache_dir, cfg.model.tiny_seed)
        info["sampler"] = {"path": cfg.sampling.model, "revision": directory_revision(sampler)}
    return info


def _model_spec(cfg: Config, model: dict) -> dict:
    """What an LM actor needs to resolve the model on its own node: the configured source (a local
    directory as an absolute path, the same on every node), the cache and the revision to check
    against."""
    source = cfg.model.path
    if source not in ("default", "tiny") and "://" not in source:
        source = str(Path(source).expanduser().resolve())
    return {"source": source, "cache_dir": cfg.model.cache_dir, "tiny_seed": cfg.model.tiny_seed,
            "revision": model["revision"],
            "sampler_revision": model.get("sampler", {}).get("revision")}


def _lm_actor_count(cfg: Config) -> int:
    """ray.lm_actors, or by default one actor per lm_actor_gpus share of every node's GPUs (one per
    GPU at 1.0), or one on CPU."""
    rc = cfg.ray
    if rc.lm_actors:
        return rc.lm_actors
    if rc.lm_actor_gpus <= 0:
        return 1
    import ray

    from toolformer_ray.errors import UserError

    per_node = [int(n["Resources"].get("GPU", 0) / rc.lm_actor_gpus + 1e-9)
                for n in ray.nodes() if n.get("Alive")]
    if sum(per_node) == 0:
        raise UserError(f"ray.lm_actor_gpus={rc.lm_actor_gpus:g} but no node of the cluster has a "
                        "GPU (yet): set ray.lm_actors to the number of actors to wait for, or "
                        "ray.lm_actor_gpus=0")
    return sum(per_node)


def _hash_with_env(storage_env: dict[str, str], uris: list[str]) -> list[str]:
    from toolformer_ray.corpus import hash_files

    os.environ.update(storage_env)
    return hash_files(uris)


def _ray_hash_files(cfg: Config, uris: list[str]) -> list[str]:
    """Hash new input files in parallel Ray tasks (each reads its files from the store), in order."""
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    per_task = max(1, -(-len(uris) // (4 * cpus)))
    task = ray.remote(num_cpus=cfg.ray.reader_cpus, max_retries=2)(_hash_with_env)
    env = _storage_env()
    refs = [task.remote(env, uris[i:i + per_task]) for i in range(0, len(uris), per_task)]
    return [d for chunk in ray.get(refs) for d in chunk]


def run_generate(cfg: Config, use_ray: bool = True, progress: bool = True) -> GenerateSummary:
    from toolformer_ray.corpus import hash_files, list_shards, plan_shards
    from toolformer_ray.models import load_tokenizer, resolve_model_dir
    from toolformer_ray.report import report_from_store
    from toolformer_ray.storage import OutputStore, build_manifest
    from toolformer_ray.tools.pool import LocalToolExecutor, RayToolExecutor

    started = time.time()
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    cfg = cfg.model_copy(deep=True)
    cfg.model.cache_dir = str(Path(cfg.model.cache_dir).resolve())
    sampler = cfg.sampling.model
    if sampler and sampler not in ("default", "tiny") and "://" not in sampler:
        cfg.sampling.model = str(Path(sampler).expanduser().resolve())  # the same on every node
    # The driver resolves the model for its tokenizer and the revision every actor must match; the
    # actors resolve it again on their own nodes (RayBackend), never from this directory.
    model_dir = str(resolve_model_dir(cfg.model.path, cfg.model.cache_dir, cfg.model.tiny_seed))
    model = _model_info(model_dir, cfg)
    tokenizer = load_tokenizer(model_dir)
    config_hash = cfg.config_hash()
    store = OutputStore(cfg.run.output, config_hash)
    tools_cfg = cfg.enabled_tools()
    if not tools_cfg:
        from toolformer_ray.errors import UserError

        raise UserError("no tool is enabled in the config (tools: ...)")

    stop_ray = False

    def hasher(uris: list[str]) -> list[str]:
        nonlocal stop_ray
        if not use_ray or len(uris) < 2:
            return hash_files(uris)
        stop_ray = _init_ray(cfg) or stop_ray
        return _ray_hash_files(cfg, uris)

    hash_cache = store.load_hash_cache()
    try:
        shards = list_shards(cfg.corpus.input, cfg.corpus.format,
                             parquet_split_bytes=cfg.corpus.parquet_split_bytes,
                             hash_cache=hash_cache, hasher=hasher)
    except BaseException:
        if stop_ray:
            import ray

            ray.shutdown()
        raise
    store.save_hash_cache(hash_cache)
    plans = plan_shards(shards, cfg.corpus, tokenizer, cfg.corpus.limit)
    units = store.committed_units()
    todo = [p for p in plans if not store.is_done(p.shard.shard_id, p.max_docs, units)]
    # The cap per tool is what the version's committed shards have not used yet.
    used_before = Counter()
    for record in store.readable_units(units).values():
        for tool, counts in (record.get("funnel") or {}).items():
            used_before[tool] += counts.get("kept_after_cap", 0)
    quota = {t: max(0, tc.max_kept - used_before[t]) for t, tc in tools_cfg.items()}

    backend = executor = None
    prog = Progress(len(todo), enabled=progress)
    works = [ShardWork(p) for p in todo]
    try:
        if use_ray and todo:
            stop_ray = _init_ray(cfg) or stop_ray
            cfg.ray.lm_actors = _lm_actor_count(cfg)
            if stop_ray:
                _check_local_resources(cfg, tools_cfg)
            backend = RayBackend(cfg, _model_spec(cfg, model))
            executor = RayToolExecutor(tools_cfg)
        elif todo:
            cfg.ray.lm_actors = 1
            backend = LocalBackend(cfg, model_dir)
            executor = LocalToolExecutor(tools_cfg)
        if todo:
            model["attention"] = backend.attention  # fast path, or plain forwards and why
            _schedule(cfg, works, backend, executor, tokenizer, store, model, config_hash, quota, prog)
    finally:
        prog.close()
        if executor is not None:
            tool_stats = executor.stats()
            executor.shutdown()
        else:
            tool_stats = {}
        if backend is not None:
            backend.shutdown()
        if stop_ray:
            import ray

            ray.shutdown()

    failed = {w.plan.unit_id: w.error for w in works if w.error}
    finished_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    run_info = {"started_at": started_at, "finished_at": finished_at, "host": socket.gethostname(),
                "use_ray": use_ray, "seconds": round(time.time() - started, 2),
                "shards_processed": sum(w.error is None for w in works), "shards_failed": failed,
                "write_seconds": round(sum(w.timings["write"] for w in works), 3),
                "tool_stats": tool_stats, "limit": cfg.corpus.limit}
    report, errors = None, []
    try:
        manifest = build_manifest(store, config=cfg.model_dump(mode="json"), model=model,
                                  inputs={"uri": cfg.corpus.input, "format": cfg.corpus.format,
                                          "shards": len(shards), "limit": cfg.corpus.limit},
                                  planned=[p.to_dict() for p in plans], run=run_info)
        manifest["config_hash_covers"] = cfg.hashed_dict()
        # every code version whose rows the version holds: more than one is said, never silently mixed
        manifest["code_version"] = code_version()
        records = store.readable_units().values()
        manifest["code_versions"] = sorted({str(r.get("code_version")) for r in records})
        if len(manifest["code_versions"]) > 1:
            print(f"[generate] {store.uri()} holds rows of several code versions: "
                  f"{', '.join(manifest['code_versions'])}", file=sys.stderr)
        store.write_manifest(manifest)
        store.remove_uncommitted()
        if store.committed_units():
            report = report_from_store(store, {t: c.tau_f for t, c in tools_cfg.items()},
                                       cfg.filtering.report_tau_f, {t: c.tau_s for t, c in tools_cfg.items()})
    except Exception as e:  # noqa: BLE001 - storage gone at the end: committed shards stay; a rerun redoes this
        first = (str(e).strip().splitlines() or [""])[0]
        errors.append(f"manifest/report not written: {type(e).__name__}: {first}")
        print(f"[generate] {errors[-1]}", file=sys.stderr)
    kept = Counter()
    for w in works:
        for tool, counts in w.funnel.items():
            kept[tool] += counts.get("kept_after_cap", 0)
    return GenerateSummary(
        output=store.uri(), config_hash=config_hash, shards_total=len(plans),
        shards_skipped=len(plans) - len(todo), shards_done=sum(w.error is None for w in works),
        shards_failed=failed, documents=sum(len(w.docs or []) for w in works),
        quarantined=sum(len(w.quarantine) for w in works), calls_kept=dict(kept),
        seconds=time.time() - started, report=report, manifest=store.uri("manifest.json"), errors=errors)


def _schedule(cfg, works: list[ShardWork], backend, executor, tokenizer, store, model, config_hash, quota,
              prog: Progress) -> None:
    """Move batches through read -> sample -> execute -> score, commit shards in order."""
    per_task = cfg.ray.docs_per_task
    to_read = deque(range(len(works)))
    reads: dict = {}  # handle -> shard index
    waiting_sample: deque[Batch] = deque()
    waiting_score: deque[Batch] = deque()
    lm_tasks: dict = {}  # handle -> ("sample" | "score", Batch)
    executing: list[Batch] = []
    next_commit = 0
    read_ahead = max(2, cfg.ray.lm_actors)

    def fail(si: int, err: BaseException) -> None:
        if works[si].error:
            return  # the first error is the one to report
        works[si].error = f"{type(err).__name__}: {err}"
        print(f"[generate] shard {works[si].plan.unit_id} failed: {works[si].error}", file=sys.stderr)

    while next_commit < len(works):
        # 1. read ahead only while the LM side has little queued (bounded memory)
        while to_read and len(reads) < read_ahead and len(waiting_sample) < backend.capacity * 2:
            si = to_read.popleft()
            reads[backend.read(works[si].plan, cfg, tokenizer)] = si
        # 2. keep the LM actors busy: finish started batches first (score), then start new ones
        while len(lm_tasks) < backend.capacity and (waiting_score or waiting_sample):
            kind = "score" if waiting_score else "sample"
            b = (waiting_score or waiting_sample).popleft()
            if works[b.shard].error:
                continue  # its shard has failed: no more work on it
            args = (b.docs, b.candidates) if kind == "score" else (b.docs,)
            lm_tasks[backend.submit(kind, *args)] = (kind, b)
        # 3. collect whatever finished (blocking briefly when nothing else can move)
        for h in backend.wait(list(reads) + list(lm_tasks), timeout=0.02 if executing else 0.5):
            if h in reads:
                si = reads.pop(h)
                try:
                    docs, quarantine, seconds = backend.get(h)
                except Exception as e:  # a shard that cannot be read fails alone
                    fail(si, e)
                    continue
                w = works[si]
                w.docs, w.quarantine = docs, quarantine
                w.timings["read"] += seconds
                batches = [Batch(si, docs[s:s + per_task]) for s in range(0, len(docs), per_task)]
                w.batches_left = len(batches)
                waiting_sample.extend(batches)
                prog.update(docs_known=len(docs))
                continue
            kind, b = lm_tasks.pop(h)
            w = works[b.shard]
            try:
                value, seconds = backend.get(h)
            except Exception as e:
                fail(b.shard, e)
                continue
            w.timings[kind] += seconds
            if w.error:
                continue
            if kind == "sample":
                _merge_funnel(w.funnel, value.funnel)
                for tool, values in value.p_api.items():
                    counts = p_api_counts(values)
                    old = w.p_api_hist.get(tool, [0] * len(counts))
                    w.p_api_hist[tool] = [a + b for a, b in zip(old, counts)]
                b.candidates = value.candidates
                t = time.perf_counter()
                _submit_tools(b, executor)  # in-process executors run the tools right here
                w.timings["execute_submit"] += time.perf_counter() - t
                b.tools_deadline = time.monotonic() + _tools_wait_s(b, cfg)
                executing.append(b)
                prog.update(calls=len(b.candidates))
            else:
                b.scored = value
                w.scored += value
                w.batches_left -= 1
                prog.update(docs_done=len(b.docs))
        for b in list(executing):
            if works[b.shard].error:
                executing.remove(b)
                continue
            if time.monotonic() > b.tools_deadline and not all(p.done() for p, _ in b.pending_tools.values()):
                # The pools resolve every call in bounded time; this is the backstop if they do not.
                executing.remove(b)
                waited = _tools_wait_s(b, cfg)
                fail(b.shard, TimeoutError(f"tool calls of a batch did not finish within {waited:.0f} s"))
                continue
            if all(p.done() for p, _ in b.pending_tools.values()):
                executing.remove(b)
                t = time.perf_counter()
                for p, cands in b.pending_tools.values():
                    for c, r in zip(cands, p.get()):
                        c.result = r
                works[b.shard].timings["execute_wait"] += time.perf_counter() - t
                if any(c.result is not None for c in b.candidates):
                    waiting_score.append(b)
                else:  # nothing to score: the batch is done
                    works[b.shard].batches_left -= 1
                    prog.update(docs_done=len(b.docs))
        # 4. commit finished shards, in input order (the per-tool cap fills deterministically)
        while next_commit < len(works) and works[next_commit].finished:
            w = works[next_commit]
            if w.error is None:
                try:
                    kept = _commit_shard(cfg, w, store, model, config_hash, quota)
                    prog.update(kept=kept, shards=1)
                except Exception as e:
                    fail(next_commit, e)
            w.scored = []  # free memory; the rows are written
            next_commit += 1
        if executing and not lm_tasks and not reads:
            time.sleep(0.01)  # only tools are running: poll their results


def _tools_wait_s(b: Batch, cfg: Config, start_s: float = 600.0) -> float:
    """The longest a batch's tool calls may take: each call its timeout on every allowed attempt, plus a
    worker restart (the pools' start timeout). Generous on purpose: it only catches a pool that hangs."""
    total = start_s
    for tool, (_, cands) in b.pending_tools.items():
        tc = cfg.tools[tool]
        total += len(cands) * tc.timeout_s * (tc.max_retries + 2)
    return total


def _submit_tools(b: Batch, executor) -> None:
    by_tool: dict[str, list[Candidate]] = {}
    for c in b.candidates:
        by_tool.setdefault(c.tool, []).append(c)
    dates = {d.doc_id: d.date for d in b.docs}
    for tool, cands in by_tool.items():
        pending = executor.submit(tool, [c.call.input for c in cands], [dates.get(c.doc_id) for c in cands])
        b.pending_tools[tool] = (pending, cands)


def _merge_funnel(into: dict[str, Counter], new: dict[str, Counter]) -> None:
    for tool, counts in new.items():
        into.setdefault(tool, Counter()).update(counts)


def _commit_shard(cfg: Config, w: ShardWork, store, model: dict, config_hash: str, quota: dict) -> int:
    """Merge the shard's kept calls into its documents and publish its tables. Returns calls kept."""
    t = time.perf_counter()
    markers = Markers.from_config(cfg.markers)
    merged, used = merge_documents(w.docs, w.scored, markers, quota)
    for tool, n in used.items():
        if quota.get(tool) is not None:
            quota[tool] -= n
    shard_id = w.plan.shard.shard_id
    common = {"model": model["path"], "model_revision": model["revision"], "dtype": model["dtype"],
              "config_hash": config_hash, "schema_version": SCHEMA_VERSION, "code_version": code_version()}
    source = {d.doc_id: d.source_id for d in w.docs}
    inserted = {id(s) for m in merged for s in m.calls}
    candidate_rows, call_rows = [], []
    for s in w.scored:
        row = _call_row(s, shard_id, source.get(s.cand.doc_id, ""), markers, common)
        candidate_rows.append({**row, "kept": id(s) in inserted})
    for m in merged:
        for s in m.calls:
            call_rows.append(_call_row(s, shard_id, m.doc.source_id, markers, common))
    doc_rows = [{"doc_id": m.doc.doc_id, "source_id": m.doc.source_id, "shard": shard_id, "text": m.doc.text,
                 "augmented_text": m.augmented_text, "n_calls": len(m.calls), "date": m.doc.date,
                 "meta": json.dumps(m.doc.meta, ensure_ascii=False, sort_keys=True)} for m in merged]
    for tool in cfg.enabled_tools():
        f = w.funnel.setdefault(tool, Counter())
        f["calls_with_result"] = sum(1 for s in w.scored if s.cand.tool == tool)
        f["calls_scored"] = f["calls_with_result"]
        f["kept_tau_f"] = sum(1 for s in w.scored if s.cand.tool == tool and s.passes)
        f["kept_after_cap"] = used.get(tool, 0)
    funnel = {tool: dict(c) for tool, c in w.funnel.items()}
    w.timings["merge"] += time.perf_counter() - t
    tables = {
        "calls": pa.Table.from_pylist(call_rows, CALLS_SCHEMA),
        "candidates": pa.Table.from_pylist(candidate_rows, CANDIDATES_SCHEMA),
        "documents": pa.Table.from_pylist(doc_rows, DOCUMENTS_SCHEMA),
        "quarantine": pa.Table.from_pylist(w.quarantine, QUARANTINE_SCHEMA),
    }
    # (the write itself cannot be timed inside the record it writes: the driver sums it into the run's info)
    record = {**w.plan.shard.to_dict(), "code_version": common["code_version"],
              "funnel": funnel, "documents": len(w.docs), "p_api_hist": w.p_api_hist,
              "timings": {k: round(v, 3) for k, v in w.timings.items()}}
    t = time.perf_counter()
    store.write_shard(shard_id, tables, record, max_docs=w.plan.max_docs)
    w.timings["write"] += time.perf_counter() - t
    return len(call_rows)


def _call_row(s: ScoredCall, shard_id: str, source_id: str, markers: Markers, common: dict) -> dict:
    c = s.cand
    return {"doc_id": c.doc_id, "source_id": source_id, "shard": shard_id, "tool": c.tool, "call": c.call.input,
            "result": c.result, "char_pos": c.char_pos, "token_pos": c.token_pos, "p_api": c.p_api,
            "prefix_plus": s.prefix_plus, "prefix_no_result": s.prefix_no_result,
            "inserted_text": inserted_text(s, markers), "loss_plus": s.loss_plus, "loss_no_call": s.loss_no_call,
            "loss_call_no_result": s.loss_call_no_result, "tau_f": s.tau_f, **common}
