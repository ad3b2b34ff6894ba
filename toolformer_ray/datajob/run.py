"""`toolformer-ray generate`: the data job, on Ray or in one process.

    plan      list the input's shards (by content), skip those already committed, share out the cap
    start     the LM stages (actors, or one in this process) and the tool executor
    schedule  batches through read -> sample -> execute -> score, shards committed in order
    manifest  the version's manifest and report, from every committed shard
    report    a GenerateSummary for the command line

`--no-ray` runs the same scheduler with the stages in this process.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import ray
from tqdm import tqdm

from toolformer_ray.config import Config
from toolformer_ray.datajob.commit import commit_shard
from toolformer_ray.datajob.corpus import ShardPlan, hash_files, list_shards, plan_shards
from toolformer_ray.datajob.scheduler import Scheduler, ShardWork
from toolformer_ray.datajob.stages import LocalBackend, RayBackend, ToolStage, storage_env
from toolformer_ray.errors import UserError
from toolformer_ray.models import directory_revision, load_tokenizer, resolve_model_dir
from toolformer_ray.ray_session import ensure_ray
from toolformer_ray.report import report_from_store
from toolformer_ray.storage import OutputStore, build_manifest
from toolformer_ray.tools.executor import LocalToolExecutor, RayToolExecutor
from toolformer_ray.version import code_version

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
    # run-level failures (the manifest could not be written)
    errors: list[str] = field(default_factory=list)
    # the pipeline proper: stages up until the last commit (0 when nothing was to do)
    pipeline_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Everything planned is done: no failed shard, manifest and report written."""
        return not self.shards_failed and not self.errors

    def describe(self) -> str:
        kept = ", ".join(f"{t}: {n}" for t, n in self.calls_kept.items()) or "none"
        lines = [
            f"generate: {self.shards_done} shard(s) processed, {self.shards_skipped} already done, "
            f"{len(self.shards_failed)} failed, of {self.shards_total}; "
            f"{self.documents} documents, "
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
    """Documents read and done, calls and kept counts, with rate and ETA: a live bar on a terminal,
    log lines otherwise. Documents are counted when their shard is read, and done when their
    batch is."""

    def __init__(self, total_shards: int, enabled: bool = True):
        self.start = time.time()
        self.total_shards = total_shards
        self.shards = 0
        self.docs_read = 0
        self.docs_done = 0
        self.calls = 0
        self.kept = 0
        self.last_log = 0.0
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=0, unit="doc", desc="generate", file=sys.stderr,
                            dynamic_ncols=True)

    def update(self, docs_done: int = 0, docs_read: int = 0, calls: int = 0, kept: int = 0,
               shards: int = 0):
        self.docs_done += docs_done
        self.docs_read += docs_read
        self.calls += calls
        self.kept += kept
        self.shards += shards
        if self.bar is not None:
            self.bar.total = self.docs_read
            self.bar.set_postfix(calls=self.calls, kept=self.kept,
                                 shards=f"{self.shards}/{self.total_shards}")
            self.bar.update(docs_done)
        elif time.time() - self.last_log > 10 or shards:
            self.last_log = time.time()
            print(self.line(), file=sys.stderr, flush=True)

    def line(self) -> str:
        elapsed = time.time() - self.start
        rate = self.docs_done / elapsed if elapsed > 0 else 0.0
        left = self.docs_read - self.docs_done
        eta = f", ETA {left / rate:.0f} s (read shards)" if rate > 0 and left > 0 else ""
        return (f"[generate] shards {self.shards}/{self.total_shards}, docs read {self.docs_read}, "
                f"done {self.docs_done}, calls {self.calls}, kept {self.kept}, "
                f"{rate:.2f} docs/s{eta}")

    def close(self):
        if self.bar is not None:
            self.bar.close()


@dataclass
class Plan:
    """What a run will do, before anything starts."""
    cfg: Config  # a copy: the run fills in cache_dir and lm_actors
    model_dir: str  # the driver's copy (its tokenizer; the revision every actor must match)
    model: dict  # path, requested, revision, dtype (+ attention once started): the rows' columns
    tokenizer: object
    config_hash: str
    store: OutputStore
    tools_cfg: dict
    shards: int  # listed
    plans: list[ShardPlan]
    todo: list[ShardPlan]  # not committed yet
    quota: dict[str, int]  # tool -> calls it may still keep in this output version
    started_ray: bool  # this run started a local Ray (and stops it)


def run_generate(cfg: Config, use_ray: bool = True, progress: bool = True) -> GenerateSummary:
    started = time.time()
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    plan = _plan(cfg, use_ray)
    works = [ShardWork(p) for p in plan.todo]
    prog = Progress(len(plan.todo), enabled=progress)
    lm = None
    tools = None
    tool_stats: dict = {}
    pipeline_seconds = 0.0
    try:
        if plan.todo:
            lm, tools = _start(plan, use_ray)
            plan.model["attention"] = lm.attention  # fast path, or plain forwards and why

            def commit(w: ShardWork) -> int:
                return commit_shard(plan.cfg, w, plan.store, plan.model, plan.config_hash,
                                    plan.quota)

            scheduler = Scheduler(plan.cfg, works, lm, tools, plan.tokenizer, commit, prog)
            pipeline_seconds = scheduler.run()
    finally:
        prog.close()
        if tools is not None:
            tool_stats = tools.stats()
            tools.shutdown()
        if lm is not None:
            lm.shutdown()
        if plan.started_ray:
            ray.shutdown()

    failed = {w.plan.unit_id: w.error for w in works if w.error}
    run_info = {"started_at": started_at,
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "host": socket.gethostname(), "use_ray": use_ray,
                "seconds": round(time.time() - started, 2),
                "shards_processed": sum(w.error is None for w in works), "shards_failed": failed,
                "write_seconds": round(sum(w.timings["write"] for w in works), 3),
                "tool_stats": tool_stats, "limit": plan.cfg.corpus.limit}
    report, errors = _manifest_and_report(plan, run_info)
    kept = Counter()
    for w in works:
        for tool, counts in w.funnel.items():
            kept[tool] += counts.get("kept_after_cap", 0)
    return GenerateSummary(
        output=plan.store.uri(), config_hash=plan.config_hash, shards_total=len(plan.plans),
        shards_skipped=len(plan.plans) - len(plan.todo),
        shards_done=sum(w.error is None for w in works), shards_failed=failed,
        documents=sum(len(w.docs or []) for w in works),
        quarantined=sum(len(w.quarantine) for w in works), calls_kept=dict(kept),
        seconds=time.time() - started, report=report, manifest=plan.store.uri("manifest.json"),
        errors=errors, pipeline_seconds=pipeline_seconds)


# ---------------------------------------------------------------------------------------- plan
def _plan(cfg: Config, use_ray: bool) -> Plan:
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
        raise UserError("no tool is enabled in the config (tools: ...)")

    started_ray = False

    def hasher(uris: list[str]) -> list[str]:
        nonlocal started_ray
        if not use_ray or len(uris) < 2:
            return hash_files(uris)
        started_ray = ensure_ray(cfg.ray.address, cfg.ray.num_cpus) or started_ray
        return _ray_hash_files(cfg, uris)

    hash_cache = store.load_hash_cache()
    try:
        shards = list_shards(cfg.corpus.input, cfg.corpus.format,
                             parquet_split_bytes=cfg.corpus.parquet_split_bytes,
                             hash_cache=hash_cache, hasher=hasher)
    except BaseException:
        if started_ray:
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
    return Plan(cfg=cfg, model_dir=model_dir, model=model, tokenizer=tokenizer,
                config_hash=config_hash, store=store, tools_cfg=tools_cfg, shards=len(shards),
                plans=plans, todo=todo, quota=quota, started_ray=started_ray)


def _model_info(model_dir: str, cfg: Config) -> dict:
    # An s3:// model is named by its URI (the driver's cache path means nothing on other nodes).
    path = cfg.model.path if "://" in cfg.model.path else model_dir
    info = {"path": path, "requested": cfg.model.path, "revision": directory_revision(model_dir),
            "dtype": cfg.model.dtype}
    if cfg.sampling.model:  # the model that sampled the calls (bootstrapping); losses: `path`'s
        sampler = resolve_model_dir(cfg.sampling.model, cfg.model.cache_dir, cfg.model.tiny_seed)
        info["sampler"] = {"path": cfg.sampling.model, "revision": directory_revision(sampler)}
    return info


def _hash_with_env(env: dict[str, str], uris: list[str]) -> list[str]:
    os.environ.update(env)
    return hash_files(uris)


def _ray_hash_files(cfg: Config, uris: list[str]) -> list[str]:
    """Hash new input files in parallel Ray tasks (each reads its files from the store), in
    order."""
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    per_task = max(1, -(-len(uris) // (4 * cpus)))
    task = ray.remote(num_cpus=cfg.ray.reader_cpus, max_retries=2)(_hash_with_env)
    env = storage_env()
    refs = [task.remote(env, uris[i:i + per_task]) for i in range(0, len(uris), per_task)]
    return [d for chunk in ray.get(refs) for d in chunk]


# --------------------------------------------------------------------------------------- start
def _start(plan: Plan, use_ray: bool):
    """The LM stages and the tool stage: on Ray (actors, tool-worker pools) or in this process."""
    cfg = plan.cfg
    if not use_ray:
        cfg.ray.lm_actors = 1
        return LocalBackend(cfg, plan.model_dir), ToolStage(LocalToolExecutor(plan.tools_cfg), cfg)
    plan.started_ray = ensure_ray(cfg.ray.address, cfg.ray.num_cpus) or plan.started_ray
    cfg.ray.lm_actors = _lm_actor_count(cfg)
    if plan.started_ray:
        _check_local_resources(cfg, plan.tools_cfg)
    lm = RayBackend(cfg, _model_spec(cfg, plan.model))
    return lm, ToolStage(RayToolExecutor(plan.tools_cfg), cfg)


def _lm_actor_count(cfg: Config) -> int:
    """ray.lm_actors, or by default one actor per lm_actor_gpus share of every node's GPUs (one per
    GPU at 1.0), or one on CPU."""
    rc = cfg.ray
    if rc.lm_actors:
        return rc.lm_actors
    if rc.lm_actor_gpus <= 0:
        return 1
    per_node = [int(n["Resources"].get("GPU", 0) / rc.lm_actor_gpus + 1e-9)
                for n in ray.nodes() if n.get("Alive")]
    if sum(per_node) == 0:
        raise UserError(f"ray.lm_actor_gpus={rc.lm_actor_gpus:g} but no node of the cluster has a "
                        "GPU (yet): set ray.lm_actors to the number of actors to wait for, or "
                        "ray.lm_actor_gpus=0")
    return sum(per_node)


def _check_local_resources(cfg: Config, tools_cfg: dict) -> None:
    """On a local Ray nothing will ever add CPUs: asking for more than there are would wait
    forever."""
    have = ray.cluster_resources().get("CPU", 0)
    need = (cfg.ray.lm_actors * cfg.ray.lm_actor_cpus + cfg.ray.reader_cpus
            + sum(tc.workers * tc.worker_cpus for tc in tools_cfg.values()))
    if need > have + 1e-9:
        raise UserError(f"the LM actors, tool workers and shard reader ask for {need:g} CPUs but "
                        f"local Ray has {have:g}: lower ray.lm_actor_cpus, tools.*.worker_cpus or "
                        "ray.reader_cpus (they are Ray's bookkeeping; torch threads are set by "
                        "ray.torch_threads)")


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


# ------------------------------------------------------------------------------ manifest, report
def _manifest_and_report(plan: Plan, run_info: dict) -> tuple[str | None, list[str]]:
    """Write the version's manifest (every committed shard, this run's info) and its report.
    Storage gone at the end is a run-level error: committed shards stay; a rerun redoes this."""
    cfg = plan.cfg
    store = plan.store
    try:
        manifest = build_manifest(store, config=cfg.model_dump(mode="json"), model=plan.model,
                                  inputs={"uri": cfg.corpus.input, "format": cfg.corpus.format,
                                          "shards": plan.shards, "limit": cfg.corpus.limit},
                                  planned=[p.to_dict() for p in plan.plans], run=run_info)
        manifest["config_hash_covers"] = cfg.hashed_dict()
        # every code version whose rows the version holds: more than one is said, never silently
        # mixed
        manifest["code_version"] = code_version()
        records = store.readable_units().values()
        manifest["code_versions"] = sorted({str(r.get("code_version")) for r in records})
        if len(manifest["code_versions"]) > 1:
            print(f"[generate] {store.uri()} holds rows of several code versions: "
                  f"{', '.join(manifest['code_versions'])}", file=sys.stderr)
        store.write_manifest(manifest)
        store.remove_uncommitted()
        if not store.committed_units():
            return None, []
        tools = plan.tools_cfg
        report = report_from_store(store, {t: c.tau_f for t, c in tools.items()},
                                   cfg.filtering.report_tau_f,
                                   {t: c.tau_s for t, c in tools.items()})
        return report, []
    except Exception as e:  # noqa: BLE001 - see the docstring
        first = (str(e).strip().splitlines() or [""])[0]
        error = f"manifest/report not written: {type(e).__name__}: {first}"
        print(f"[generate] {error}", file=sys.stderr)
        return None, [error]
