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
from toolformer_ray.schema import (CALLS_SCHEMA, CANDIDATES_SCHEMA, DOCUMENTS_SCHEMA, QUARANTINE_SCHEMA,
                                   SCHEMA_VERSION)


# --------------------------------------------------------------------------------------------- LM worker
class LMWorker:
    """Holds the model and the annotator; runs the sample and filter stages on batches of documents."""

    def __init__(self, cfg_json: dict, model_dir: str, torch_threads: int | None = None):
        import torch

        from toolformer_ray.core.annotate import Annotator
        from toolformer_ray.models import load_model
        from toolformer_ray.tools import build_tools

        if torch_threads:
            torch.set_num_threads(torch_threads)
        cfg = Config.model_validate(cfg_json)
        device = "cuda" if cfg.ray.lm_actor_gpus > 0 and torch.cuda.is_available() else "cpu"
        lm = load_model(model_dir, cfg.model.dtype, cfg.model.cache_dir, device=device)
        # Tools here only give prompts and pre-filters; their resources load on the tool workers.
        self.annotator = Annotator.from_config(lm, build_tools(cfg.enabled_tools()), cfg)

    def ready(self) -> dict:
        """The attention path the loaded model is served by (core.lm.prepare_model): manifest."""
        return self.annotator.attention

    def sample(self, docs: list[Document]):
        t = time.perf_counter()
        result = self.annotator.sample(docs)
        return result, time.perf_counter() - t

    def score(self, docs: list[Document], candidates: list[Candidate]):
        t = time.perf_counter()
        scored = self.annotator.score(docs, candidates)
        return scored, time.perf_counter() - t


class _Done:
    """A finished in-process call, shaped like a Ray future for the scheduler."""

    def __init__(self, value):
        self.value = value


class LocalBackend:
    """One LMWorker in this process; `submit` runs at once."""

    def __init__(self, cfg: Config, model_dir: str):
        self.worker = LMWorker(cfg.model_dump(mode="json"), model_dir, cfg.ray.torch_threads)
        self.attention = self.worker.ready()
        self.capacity = 1

    def submit(self, method: str, *args):
        return _Done(getattr(self.worker, method)(*args))

    def wait(self, handles: list, timeout: float) -> list:
        return list(handles)

    def get(self, handle):
        return handle.value

    def read(self, plan, cfg: Config, tokenizer):
        return _Done(_timed_read(plan.shard, cfg.corpus, tokenizer, plan.max_docs))

    def shutdown(self) -> None:
        pass


def _timed_read(shard, corpus_cfg, tokenizer, max_docs):
    from toolformer_ray.corpus import read_shard

    t = time.perf_counter()
    docs, quarantine = read_shard(shard, corpus_cfg, tokenizer, max_docs=max_docs)
    return docs, quarantine, time.perf_counter() - t


def _storage_env() -> dict[str, str]:
    """Object-store settings of the driver (AWS_* for S3), handed to workers in memory, never to a file:
    a local Ray started earlier in this process would not have them otherwise."""
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


class RayBackend:
    """A pool of LMWorker actors; work goes to the actor with the fewest tasks in flight."""

    def __init__(self, cfg: Config, model_dir: str):
        import ray

        self.ray = ray
        rc = cfg.ray
        env = {"env_vars": _storage_env()}
        actor = ray.remote(num_cpus=rc.lm_actor_cpus, num_gpus=rc.lm_actor_gpus, max_restarts=2,
                           max_task_retries=2, runtime_env=env)(LMWorker)
        threads = rc.torch_threads or max(1, int(rc.lm_actor_cpus))
        cfg_json = cfg.model_dump(mode="json")
        self.actors = [actor.remote(cfg_json, model_dir, threads) for _ in range(rc.lm_actors)]
        # fail early (model not loadable or refused, no resources); every actor has the same path
        self.attention = ray.get([a.ready.remote() for a in self.actors])[0]
        self.load = {i: 0 for i in range(len(self.actors))}
        self.owner: dict = {}
        self.capacity = rc.lm_actors * rc.max_batches_per_actor
        self.reader = ray.remote(num_cpus=rc.reader_cpus, runtime_env=env)(_timed_read)
        self.model_dir = model_dir

    def submit(self, method: str, *args):
        i = min(self.load, key=self.load.get)
        ref = getattr(self.actors[i], method).remote(*args)
        self.load[i] += 1
        self.owner[ref] = i
        return ref

    def wait(self, handles: list, timeout: float) -> list:
        """Every finished handle, blocking up to `timeout` for the first one."""
        if not handles:
            return []
        first, _ = self.ray.wait(handles, num_returns=1, timeout=timeout)
        if not first:
            return []
        ready, _ = self.ray.wait(handles, num_returns=len(handles), timeout=0)
        return ready

    def get(self, handle):
        value = self.ray.get(handle)
        i = self.owner.pop(handle, None)
        if i is not None:
            self.load[i] -= 1
        return value

    def read(self, plan, cfg: Config, tokenizer):
        return self.reader.remote(plan.shard, cfg.corpus, tokenizer, plan.max_docs)

    def shutdown(self) -> None:
        for a in self.actors:
            self.ray.kill(a)


# ------------------------------------------------------------------------------------------- scheduling
@dataclass
class Batch:
    shard: int  # index in the run's shard list
    docs: list[Document]
    candidates: list[Candidate] = field(default_factory=list)
    pending_tools: dict = field(default_factory=dict)  # tool -> (Pending, [candidates])
    scored: list[ScoredCall] = field(default_factory=list)


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
    from toolformer_ray.models import directory_revision

    return {"path": model_dir, "requested": cfg.model.path, "revision": directory_revision(model_dir),
            "dtype": cfg.model.dtype}


def run_generate(cfg: Config, use_ray: bool = True, progress: bool = True) -> GenerateSummary:
    from toolformer_ray.corpus import list_shards, plan_shards
    from toolformer_ray.models import load_tokenizer, resolve_model_dir
    from toolformer_ray.report import report_from_store
    from toolformer_ray.storage import OutputStore, build_manifest
    from toolformer_ray.tools.pool import LocalToolExecutor, RayToolExecutor

    started = time.time()
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    cfg = cfg.model_copy(deep=True)
    cfg.model.cache_dir = str(Path(cfg.model.cache_dir).resolve())
    model_dir = str(resolve_model_dir(cfg.model.path, cfg.model.cache_dir, cfg.model.tiny_seed))
    model = _model_info(model_dir, cfg)
    tokenizer = load_tokenizer(model_dir)
    config_hash = cfg.config_hash()
    store = OutputStore(cfg.run.output, config_hash)
    tools_cfg = cfg.enabled_tools()
    if not tools_cfg:
        from toolformer_ray.errors import UserError

        raise UserError("no tool is enabled in the config (tools: ...)")

    hash_cache = store.load_hash_cache()
    shards = list_shards(cfg.corpus.input, cfg.corpus.format, parquet_split_bytes=cfg.corpus.parquet_split_bytes,
                         hash_cache=hash_cache)
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

    stop_ray = False
    backend = executor = None
    prog = Progress(len(todo), enabled=progress)
    works = [ShardWork(p) for p in todo]
    try:
        if use_ray and todo:
            stop_ray = _init_ray(cfg)
            if stop_ray:
                _check_local_resources(cfg, tools_cfg)
            backend = RayBackend(cfg, model_dir)
            executor = RayToolExecutor(tools_cfg)
        elif todo:
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
    manifest = build_manifest(store, config=cfg.model_dump(mode="json"), model=model,
                              inputs={"uri": cfg.corpus.input, "format": cfg.corpus.format,
                                      "shards": len(shards), "limit": cfg.corpus.limit},
                              planned=[p.to_dict() for p in plans], run=run_info)
    manifest["config_hash_covers"] = cfg.hashed_dict()
    store.write_manifest(manifest)
    store.remove_uncommitted()
    report = None
    if store.committed_units():
        report = report_from_store(store, {t: c.tau_f for t, c in tools_cfg.items()}, cfg.filtering.report_tau_f,
                                   {t: c.tau_s for t, c in tools_cfg.items()})
    kept = Counter()
    for w in works:
        for tool, counts in w.funnel.items():
            kept[tool] += counts.get("kept_after_cap", 0)
    return GenerateSummary(
        output=store.uri(), config_hash=config_hash, shards_total=len(plans),
        shards_skipped=len(plans) - len(todo), shards_done=sum(w.error is None for w in works),
        shards_failed=failed, documents=sum(len(w.docs or []) for w in works),
        quarantined=sum(len(w.quarantine) for w in works), calls_kept=dict(kept),
        seconds=time.time() - started, report=report, manifest=store.uri("manifest.json"))


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
        works[si].error = f"{type(err).__name__}: {err}"
        print(f"[generate] shard {works[si].plan.unit_id} failed: {works[si].error}", file=sys.stderr)

    while next_commit < len(works):
        # 1. read ahead only while the LM side has little queued (bounded memory)
        while to_read and len(reads) < read_ahead and len(waiting_sample) < backend.capacity * 2:
            si = to_read.popleft()
            reads[backend.read(works[si].plan, cfg, tokenizer)] = si
        # 2. keep the LM actors busy: finish started batches first (score), then start new ones
        while len(lm_tasks) < backend.capacity and (waiting_score or waiting_sample):
            if waiting_score:
                b = waiting_score.popleft()
                lm_tasks[backend.submit("score", b.docs, b.candidates)] = ("score", b)
            else:
                b = waiting_sample.popleft()
                lm_tasks[backend.submit("sample", b.docs)] = ("sample", b)
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
                executing.append(b)
                prog.update(calls=len(b.candidates))
            else:
                b.scored = value
                w.scored += value
                w.batches_left -= 1
                prog.update(docs_done=len(b.docs))
        for b in list(executing):
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
              "config_hash": config_hash, "schema_version": SCHEMA_VERSION}
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
    record = {**w.plan.shard.to_dict(), "funnel": funnel, "documents": len(w.docs), "p_api_hist": w.p_api_hist,
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
