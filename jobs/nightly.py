"""The nightly corpus refresh: generate over the new shards of corpus.input, then, once at least
nightly.min_new_calls kept calls are not trained on yet, fine-tune the last model on them and
evaluate it.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python -m jobs.nightly --config configs/cluster.yaml

Every step is idempotent and its state lives on the output storage (jobs/state.py), so a retried
night (on a fresh cluster) continues where the last attempt stopped:
  1. generate   committed shards are skipped (known by content hash): only new or unfinished shards
                run.
  2. plan       a round = the committed shard units no earlier round took, if their kept calls reach
                the threshold (calls of nights below it accumulate). plan.json commits it; its units
                are never planned again, so no data is fine-tuned on twice. An unfinished round is
                finished first.
  3. finetune   from the last round's model (the configured model for the first round) on the
                round's data snapshot, into the round's own folder: a retry resumes from its latest
                checkpoint.
  4. evaluate   the new model, next to the one it started from (nightly.eval_previous), on
                eval.tasks; a round whose evaluation died is evaluated by the next night.
At most one new round per night. Generation always uses the configured model (model.path): the
filter's losses assume a model that has not seen calls, and a fixed model keeps the output version
(config hash).
Exit codes: 0 done (also: nothing to fine-tune, or another night holds the lease), 1 some shard
failed, 2 bad config or input.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from jobs import parse_config, run_main
from jobs.state import Lease, NightlyState
from toolformer_ray.config import Config
from toolformer_ray.errors import UserError
from toolformer_ray.evaluation import run_eval
from toolformer_ray.finetune import run_finetune
from toolformer_ray.datajob.run import run_generate
from toolformer_ray.datajob.stages import storage_env
from toolformer_ray.ray_session import ensure_ray
from toolformer_ray.storage import OutputStore, put_bytes, table_bytes

DOC_COLUMNS = ["doc_id", "source_id", "shard", "text", "augmented_text", "n_calls"]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _say(msg: str) -> None:
    print(f"[nightly] {msg}", file=sys.stderr, flush=True)


@dataclass
class Night:
    """What one invocation did; written to <state>/nights/ and printed at the end."""
    owner: str
    state: str
    started_at: str = field(default_factory=_now)
    finished_at: str | None = None
    status: str = "running"  # ok | skipped | failed
    generate: dict = field(default_factory=dict)
    pending_calls: int = 0
    decision: str = ""
    round: str | None = None
    finetune: dict | None = None
    evaluations: list[dict] = field(default_factory=list)
    model: str | None = None  # the current model after this night
    error: str | None = None

    def describe(self) -> str:
        g = self.generate
        lines = [f"nightly {self.status}: state {self.state}"]
        if g:
            lines.append(f"generate: {g.get('shards_done', 0)} new shard(s), "
                         f"{g.get('shards_skipped', 0)} already done, "
                         f"{len(g.get('shards_failed') or {})} failed; "
                         f"kept calls {g.get('calls_kept') or {}}; output {g.get('output')}")
        if self.decision:
            lines.append(f"decision: {self.decision}")
        if self.finetune:
            lines.append(f"fine-tuned model: {self.finetune.get('model_dir')} "
                         f"({self.finetune.get('steps')} steps)")
        for e in self.evaluations:
            lines.append(f"evaluation of round {e['round']}: {e.get('output')}\n"
                         f"{e.get('table', '')}")
        if self.model:
            lines.append(f"current model: {self.model}")
        if self.error:
            lines.append(f"error: {self.error}")
        return "\n".join(lines)


def state_root(cfg: Config) -> str:
    return cfg.nightly.state or f"{cfg.run.output.rstrip('/')}/nightly"


def check_config(cfg: Config) -> None:
    """Refuse settings a nightly run cannot honour, before any work starts."""
    if cfg.corpus.limit is not None:
        raise UserError("the nightly refresh reads whole shards: unset corpus.limit")
    if cfg.nightly.evaluate:
        missing = [t for t in cfg.eval.tasks if t not in cfg.eval.data]
        if missing:
            raise UserError(f"nightly.evaluate needs eval.data for {', '.join(missing)} "
                            "(or set nightly.evaluate=false)")


def _summary_dict(obj: Any) -> dict:
    return json.loads(json.dumps(asdict(obj) if is_dataclass(obj) else dict(obj), default=str))


# ------------------------------------------------------------------------------------------ rounds
def pending_units(cfg: Config, rounds: list[dict]) -> tuple[Any, dict[str, int]]:
    """The generate output version and its committed complete units no round has taken: unit ->
    kept calls."""
    store = OutputStore(cfg.run.output, cfg.config_hash())
    taken = {u for r in rounds if r["version"] == store.uri() for u in r["units"]}
    pending = {unit: int(rec.get("rows", {}).get("calls", 0))
               for unit, rec in store.readable_units().items()
               if rec.get("complete") and unit not in taken}
    return store, pending


def current_model(cfg: Config, rounds: list[dict]) -> str:
    done = [r for r in rounds if r["finetuned"]]
    return done[-1]["finetuned"]["model_dir"] if done else cfg.model.path


def plan_round(state: NightlyState, store, units: dict[str, int], base_model: str,
               seq: int) -> dict:
    """Snapshot the units' documents, then commit plan.json (the round exists once plan.json
    does)."""
    names = sorted(units)
    key = json.dumps([store.uri(), names, base_model]).encode()
    rid = f"r{seq:04d}-{hashlib.sha256(key).hexdigest()[:8]}"
    records = store.readable_units()
    tables = [pq.read_table(store.path(records[u]["files"]["documents"]), filesystem=store.fs,
                            columns=DOC_COLUMNS)
              for u in names]
    snapshot = ("rounds", rid, "data", "documents.parquet")
    put_bytes(state.fs, state.path(*snapshot), table_bytes(pa.concat_tables(tables)))
    plan = {"round": rid, "seq": seq, "version": store.uri(), "config_hash": store.config_hash,
            "units": units, "calls": sum(units.values()),
            "documents": sum(t.num_rows for t in tables), "base_model": base_model,
            "data": state.uri(*snapshot), "finetune_output": state.uri("rounds", rid, "finetune"),
            "eval_output": state.uri("rounds", rid, "eval"), "planned_at": _now()}
    state.write_json(plan, "rounds", rid, "plan.json")
    plan.update(finetuned=None, evaluated=None)
    return plan


def round_config(cfg: Config, plan: dict) -> Config:
    """The fine-tuning config of a round: from its base model, on its snapshot, into its own
    folder."""
    c = cfg.model_copy(deep=True)
    c.model.path = plan["base_model"]
    c.finetune.data = plan["data"]
    c.finetune.output = plan["finetune_output"]
    c.eval.output = plan["eval_output"]
    return c


def evaluate_round(cfg: Config, models: list[str]) -> dict:
    """run_eval on the round's models; returns what evaluated.json records."""
    report = run_eval(cfg, models=models)
    return {"output": cfg.eval.output, "models": models, "files": report.files,
            "table": report.markdown(), "rows": [r.to_dict() for r in report.rows],
            "evaluated_at": _now()}


def _evaluate_where_it_fits(cfg: Config, models: list[str]) -> dict:
    # On a cluster, the driver runs on the head, which has no CPUs for work (num-cpus=0 there): run
    # the evaluation as a task that the scheduler places on a worker. Locally, in this process.
    if ray.is_initialized():
        gpus = cfg.nightly.eval_gpus
        if gpus > 0 and cfg.inference.device == "auto":  # a GPU asked for is used, or it fails
            cfg = cfg.model_copy(deep=True)
            cfg.inference.device = "cuda"
        task = ray.remote(num_cpus=cfg.nightly.eval_cpus, num_gpus=gpus,
                          max_retries=1)(_evaluate_remote)
        return ray.get(task.remote(storage_env(), cfg, models))
    return evaluate_round(cfg, models)


def _evaluate_remote(storage_env: dict[str, str], cfg: Config, models: list[str]) -> dict:
    # storage settings arrive as an argument, in memory: a runtime_env is written to Ray's logs
    os.environ.update(storage_env)
    return evaluate_round(cfg, models)


def _generate_on_ray(cfg: Config):
    return run_generate(cfg, use_ray=True)


# ------------------------------------------------------------------------------------------- night
def run_nightly(cfg: Config, *, generate: Callable | None = None,
                finetune: Callable | None = None, evaluate: Callable | None = None,
                owner: str | None = None) -> Night:
    """One night. `generate`, `finetune`, `evaluate` default to the library's run_generate,
    run_finetune and run_eval (on a worker when on a cluster); tests pass stand-ins."""
    check_config(cfg)
    generate = generate or _generate_on_ray
    finetune = finetune or run_finetune
    evaluate = evaluate or _evaluate_where_it_fits
    owner = owner or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    state = NightlyState(state_root(cfg))
    night = Night(owner=owner, state=state.uri())
    lease = Lease(state, owner, cfg.nightly.lease_ttl_s)
    if not lease.acquire():
        night.status = "skipped"
        night.decision = f"another night holds the lease: {lease.holder}"
        _say(night.decision)
        return night
    log_name = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{owner}.json"
    try:
        _night(cfg, state, lease, night, generate, finetune, evaluate)
        night.status = "ok"
    except BaseException as e:
        night.status = "failed"
        night.error = f"{type(e).__name__}: {e}"
        raise
    finally:
        night.finished_at = _now()
        try:
            state.write_json(asdict(night), "nights", log_name)
        finally:
            lease.release()
    return night


def _night(cfg: Config, state: NightlyState, lease: Lease, night: Night, generate, finetune,
           evaluate) -> None:
    # 1. generate over the new shards (resume is the data job's own: committed shards are skipped)
    _say(f"generate over {cfg.corpus.input} -> {cfg.run.output}")
    night.generate = _summary_dict(generate(cfg))
    lease.check()

    # 2. the round to work on: an unfinished one first, else a new one if enough calls are waiting
    rounds = state.rounds()
    store, pending = pending_units(cfg, rounds)
    night.pending_calls = sum(pending.values())  # what tonight's decision is based on
    waiting = night.pending_calls  # what is left waiting after tonight's round
    unfinished = [r for r in rounds if not r["finetuned"]]
    if unfinished:
        rnd = unfinished[0]
        night.decision = (f"finish round {rnd['round']} ({rnd['calls']} calls), started by an "
                          "earlier night")
    elif pending and night.pending_calls >= cfg.nightly.min_new_calls:
        rnd = plan_round(state, store, pending, current_model(cfg, rounds), seq=len(rounds) + 1)
        rounds.append(rnd)
        waiting -= rnd["calls"]
        night.decision = (f"fine-tune round {rnd['round']}: {rnd['calls']} new kept calls in "
                          f"{len(rnd['units'])} shard(s), {rnd['documents']} documents, from "
                          f"{rnd['base_model']}")
    else:
        rnd = None
        night.decision = (f"{night.pending_calls} kept calls not trained on yet (threshold "
                          f"{cfg.nightly.min_new_calls}): no fine-tuning tonight")
    _say(night.decision)

    # 3. fine-tune (a retry resumes from the round's latest checkpoint)
    if rnd is not None:
        lease.check()
        night.round = rnd["round"]
        result = _summary_dict(finetune(round_config(cfg, rnd)))
        result["finished_at"] = _now()
        state.write_json(result, "rounds", rnd["round"], "finetuned.json")
        rnd["finetuned"] = result
        night.finetune = result

    # 4. evaluate every fine-tuned round not evaluated yet: tonight's, and one whose evaluation died
    if cfg.nightly.evaluate:
        for r in [r for r in rounds if r["finetuned"] and not r["evaluated"]]:
            lease.check()
            models = [r["finetuned"]["model_dir"]]
            if cfg.nightly.eval_previous:
                models.append(r["base_model"])
            _say(f"evaluate round {r['round']}: {', '.join(models)} on {', '.join(cfg.eval.tasks)}")
            summary = evaluate(round_config(cfg, r), models)
            state.write_json(summary, "rounds", r["round"], "evaluated.json")
            r["evaluated"] = summary
            night.evaluations.append({"round": r["round"], **summary})

    night.model = current_model(cfg, rounds)
    state.write_json({
        "model": night.model, "updated_at": _now(), "version": store.uri(),
        "pending_calls": waiting,
        "min_new_calls": cfg.nightly.min_new_calls,
        "rounds": [{"round": r["round"], "calls": r["calls"], "documents": r["documents"],
                    "base_model": r["base_model"],
                    "model": (r["finetuned"] or {}).get("model_dir"),
                    "evaluated": bool(r["evaluated"]),
                    "eval": (r["evaluated"] or {}).get("output")} for r in rounds],
    }, "state.json")


def main(argv: list[str] | None = None) -> None:
    def body() -> int:
        cfg = parse_config(argv, __doc__)
        # Join the job's cluster once, so the stages share one connection. Without a cluster (a
        # laptop run) each stage starts and stops its own local Ray, as it does on its own.
        ensure_ray(cfg.ray.address, join_only=True)
        night = run_nightly(cfg)
        print(night.describe(), flush=True)
        return 1 if night.generate.get("shards_failed") or night.generate.get("errors") else 0

    run_main(body)


if __name__ == "__main__":
    main()
