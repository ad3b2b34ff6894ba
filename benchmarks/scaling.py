"""Scaling of the data job (issue 10, item 4): documents/s with 1 and 2 LM actors in local Ray, the
in-process run for reference, per-stage costs and the cluster throughput model of
benchmarks/README.md.

    .venv/bin/python benchmarks/scaling.py [--config FILE] [-s key=value ...] [--docs 64] \\
        [--output benchmarks/results]

Writes <output>/scaling-<config hash>.json. The same N documents (corpus.limit = --docs) go through
`run_generate`, each run into a fresh output directory, in three set-ups:
  in-process  `--no-ray`: one LM stage in the driver, tools in-process (for reference)
  ray x1      local Ray, 1 LM actor
  ray x2      local Ray, 2 LM actors
LM actors get lm_actor_cpus 1 and torch_threads 1 each (the in-process stage 1 thread too;
lm_actor_gpus is the config's, so on a GPU node `-s ray.lm_actor_gpus=0.5` puts two actors on a
GPU), Ray gets ray.num_cpus (default 2) logical CPUs. Tool workers and shard readers get 0 logical
CPUs: at 0.25 each (their defaults) two 1-CPU actors would leave no room for them on 2 CPUs and the
run would wait forever. docs_per_task is lowered to N/8 (same for every run) so that there are
batches for two actors to share.

Timed: pipeline seconds = GenerateSummary.pipeline_seconds, what the scheduler returns: from the
moment the LM actors and tool pools are up (model loaded) until the last shard is committed; docs/s
= documents / pipeline seconds. Wall time (Ray start, actor start-up and model load, final manifest
and report) is reported too.

Per-stage costs, seconds per document: from the manifest's `timings` (summed over shards): read,
sample, score (both measured inside the LM stage, so with 2 actors they are actor-seconds, not
wall), execute_wait (the driver collecting tool results) and merge. Two costs the manifest lacks are
measured here on the in-process run's output:
  execute  the run's distinct calls (candidates table: every call that got a result) run again
           in-process, timed per call, times the number of distinct calls the run executed
           (tool_stats)
  write    the run's four tables written again to a scratch output (the commit times the write after
           the commit record is written, so it never reaches the manifest)
From these, a throughput model for a cluster (see benchmarks/README.md):
  docs/s = min(A / c_lm, min over tools t of W_t / c_t, R / c_read, 1 / c_driver)
with A LM actors, W_t workers of tool t, R reads in flight, c_lm = sample + score, c_driver = merge
+ write + execute_wait (the driver's serial work)."""
from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import ray
import torch

from toolformer_ray.config import Config, load_config
from toolformer_ray.datajob.run import run_generate
from toolformer_ray.ray_session import ensure_ray
from toolformer_ray.storage import TABLE_SCHEMAS, OutputStore
from toolformer_ray.tools import build_tool

STAGES = ("read", "sample", "execute_wait", "score", "merge")


def _run_config(cfg: Config, docs: int, actors: int, per_task: int, threads: int) -> Config:
    c = cfg.model_copy(deep=True)
    c.corpus.limit = docs
    c.ray.lm_actors = actors
    c.ray.lm_actor_cpus = 1.0
    c.ray.torch_threads = threads
    c.ray.docs_per_task = per_task
    c.ray.reader_cpus = 0.0
    for tc in c.tools.values():
        tc.worker_cpus = 0.0
    return c


def _tool_seconds_per_call(store, cfg: Config) -> dict[str, float | None]:
    """Seconds per call of each tool, re-running the run's distinct calls that got a result,
    in-process."""
    cands = store.read_table("candidates", columns=["tool", "call", "doc_id"]).to_pylist()
    documents = store.read_table("documents", columns=["doc_id", "date"]).to_pylist()
    dates = {r["doc_id"]: r["date"] for r in documents}
    out: dict[str, float | None] = {}
    for name, tc in cfg.enabled_tools().items():
        calls = sorted({(r["call"], dates.get(r["doc_id"])) for r in cands if r["tool"] == name},
                       key=lambda x: (x[0], x[1] or ""))
        if not calls:
            out[name] = None  # no call of this tool got a result: no cost to measure
            continue
        tool = build_tool(name, tc.options)
        tool.load()  # loading (index, model) is a worker's start-up cost, not a per-call one
        t = time.perf_counter()
        tool.run([c for c, _ in calls], [d for _, d in calls])
        out[name] = (time.perf_counter() - t) / len(calls)
    return out


def _write_seconds(store) -> float:
    """Write the run's tables (and a commit record) again to a scratch output, as commit_shard
    does."""
    tables = {name: store.read_table(name) for name in TABLE_SCHEMAS}
    with tempfile.TemporaryDirectory(prefix="tf-scaling-write-") as tmp:
        scratch = OutputStore(tmp, store.config_hash)
        t = time.perf_counter()
        scratch.write_shard("bench", tables, {"timings": {}})
        return time.perf_counter() - t


def _one(cfg: Config, label: str, use_ray: bool, measure_extra: bool) -> dict:
    threads = torch.get_num_threads()  # the in-process worker sets torch threads in this process
    with tempfile.TemporaryDirectory(prefix="tf-scaling-") as tmp:
        c = cfg.model_copy(deep=True)
        c.run.output = tmp  # a fresh output: nothing is skipped as already done
        t = time.perf_counter()
        summary = run_generate(c, use_ray=use_ray, progress=False)
        wall = time.perf_counter() - t
        torch.set_num_threads(threads)
        if summary.shards_failed:
            raise RuntimeError(f"{label}: shards failed: {summary.shards_failed}")
        store = OutputStore(tmp, summary.config_hash)
        manifest = store.read_manifest()
        n = summary.documents
        stats = manifest["runs"][-1]["tool_stats"]
        r = {"label": label, "documents": n, "lm_actors": c.ray.lm_actors if use_ray else 1,
             "use_ray": use_ray,
             "pipeline_seconds": summary.pipeline_seconds, "wall_seconds": wall,
             "docs_per_s": n / summary.pipeline_seconds, "timings": manifest["timings"],
             "per_doc": {k: manifest["timings"].get(k, 0.0) / n for k in STAGES},
             "tool_stats": stats, "calls_kept": summary.calls_kept}
        if measure_extra:
            per_call = _tool_seconds_per_call(store, c)
            r["tool_seconds_per_call"] = per_call
            r["per_doc_tool"] = {t: (s or 0.0) * stats.get(t, {}).get("distinct", 0) / n
                                 for t, s in per_call.items()}
            r["per_doc"]["execute"] = sum(r["per_doc_tool"].values())
            r["per_doc"]["write"] = _write_seconds(store) / n
    return r


def scaling_model(ref: dict, extra: dict, cfg: Config,
                  actors=(1, 2, 4, 8, 16, 32, 64, 128)) -> dict:
    """Predicted docs/s on a cluster from measured per-document costs (see benchmarks/README.md)."""
    p = ref["per_doc"]
    c_lm = p["sample"] + p["score"]
    c_read = p["read"]
    c_driver = p["merge"] + p["execute_wait"] + extra["per_doc"]["write"]
    tools = {t: (cost, cfg.tools[t].workers)
             for t, cost in extra["per_doc_tool"].items() if cost > 0}
    rows = []
    for a in actors:
        bounds = {"LM actors": a / c_lm,
                  "driver (merge + write + collect)": 1 / c_driver if c_driver else math.inf}
        bounds.update({f"{t} pool ({w} workers)": w / cost for t, (cost, w) in tools.items()})
        if c_read:
            bounds["reads"] = max(2, a) / c_read  # generate reads max(2, lm_actors) shards ahead
        limit = min(bounds, key=bounds.get)
        rows.append({"lm_actors": a, "docs_per_s": bounds[limit], "bottleneck": limit})
    return {"c_lm": c_lm, "c_read": c_read, "c_driver": c_driver,
            "c_tools": {t: cost for t, (cost, _) in tools.items()},
            "driver_bound_at_actors": c_lm / c_driver if c_driver else math.inf,
            "predictions": rows}


def bench_scaling(cfg: Config, n_docs: int, actors: tuple[int, ...] = (1, 2),
                  threads: int = 1) -> dict:
    per_task = max(1, min(cfg.ray.docs_per_task, n_docs // 8))
    base = _run_config(cfg, n_docs, 1, per_task, threads)
    runs = [_one(base, "in-process (--no-ray)", False, measure_extra=True)]
    # one Ray for all runs: its start-up is not part of any run
    started = ensure_ray(cfg.ray.address, cfg.ray.num_cpus or 2)
    try:
        for a in actors:
            c = _run_config(cfg, n_docs, a, per_task, threads)
            runs.append(_one(c, f"ray x{a}", True, False))
    finally:
        if started:
            ray.shutdown()
    ray1 = next(r for r in runs if r["use_ray"] and r["lm_actors"] == 1)
    out = {"documents": n_docs, "docs_per_task": per_task, "torch_threads_per_actor": threads,
           "ray_num_cpus": cfg.ray.num_cpus or 2, "tools": sorted(cfg.enabled_tools()),
           "runs": runs,
           "model": scaling_model(ray1, runs[0], cfg)}
    for r in runs[1:]:
        r["speedup_vs_ray_x1"] = r["docs_per_s"] / ray1["docs_per_s"]
    # the model against what was measured: below 1 = fixed costs (first Ray tasks, pipeline fill and
    # drain, scheduling) that per-document costs do not capture; they shrink as a share with more
    # documents
    measured = {r["lm_actors"]: r["docs_per_s"] for r in runs if r["use_ray"]}
    for p in out["model"]["predictions"]:
        if p["lm_actors"] in measured:
            p["measured_docs_per_s"] = measured[p["lm_actors"]]
    return out


def print_scaling(r: dict, print_table) -> None:
    rows = []
    for x in r["runs"]:
        per = ", ".join(f"{k} {v * 1000:.0f}" for k, v in x["per_doc"].items())
        speed = f", {x['speedup_vs_ray_x1']:.2f}x ray x1" if "speedup_vs_ray_x1" in x else ""
        rows.append((x["label"], f"{x['pipeline_seconds']:.1f} s -> {x['docs_per_s']:.2f} docs/s"
                                 f"{speed} (wall with start-up {x['wall_seconds']:.1f} s)"))
        rows.append(("  ms per doc", per))
    print_table(f"scaling ({r['documents']} docs, {r['docs_per_task']} per task, tools "
                f"{', '.join(r['tools'])}, {r['torch_threads_per_actor']} torch thread per actor, "
                f"Ray num_cpus {r['ray_num_cpus']})", rows)
    m = r["model"]
    tools = ", ".join(f"{t} {c * 1000:.2f} ms" for t, c in m["c_tools"].items()) or "-"
    rows = [("per doc (ray x1)", f"LM {m['c_lm'] * 1000:.0f} ms, read {m['c_read'] * 1000:.1f} ms, "
                                 f"driver {m['c_driver'] * 1000:.1f} ms, tools {tools}"),
            ("driver binds at", f"~{m['driver_bound_at_actors']:.0f} LM actors")]
    for p in m["predictions"]:
        measured = p.get("measured_docs_per_s")
        line = f"{p['docs_per_s']:.2f} docs/s (bound: {p['bottleneck']})"
        rows.append((f"{p['lm_actors']} LM actors",
                     line + (f"; measured {measured:.2f}" if measured is not None else "")))
    print_table("scaling model: docs/s = min(A / c_lm, W_t / c_t, R / c_read, 1 / c_driver)", rows)


def _print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("-s", "--set", dest="overrides", action="append", default=[],
                    help="key.path=value")
    ap.add_argument("--docs", type=int, default=64, help="documents per run (corpus.limit)")
    ap.add_argument("--output", default="benchmarks/results")
    args = ap.parse_args()

    cfg = load_config(args.config, args.overrides)
    results = {"config_hash": cfg.config_hash(), "model": cfg.model.path, "dtype": cfg.model.dtype,
               "torch_threads": torch.get_num_threads(), "host": platform.node(),
               "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    results["scaling"] = bench_scaling(cfg, args.docs)
    print_scaling(results["scaling"], _print_table)
    Path(args.output).mkdir(parents=True, exist_ok=True)
    path = Path(args.output) / f"scaling-{cfg.config_hash()}.json"
    path.write_text(json.dumps(results, indent=2, default=float))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
