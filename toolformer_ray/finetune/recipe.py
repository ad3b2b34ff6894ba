"""run_finetune: the driver's side of fine-tuning, as named steps (torchtune's recipe).

    plan       read C* -> packed rows + dev split (data.py); DeepSpeed JSON (ds_config.py);
               the model
    resources  join / start Ray (ray_session), check the cluster can hold the workers
    resume     the run's fingerprint; a folder with the same one is resumed, another one refused
               (resume.py); run.json written for a fresh run
    train      TorchTrainer, one DeepSpeed engine per worker (worker.py); progress.py logs
               each report
    pick best  the checkpoint with the lowest dev perplexity with calls disabled; else the last
    export     its hf/ copied to <output>/model, storage to storage (export.py)
    report     logs uploaded for s3://, loss curve, FinetuneResult
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.constants import is_v2_enabled

from toolformer_ray.api_text import Markers
from toolformer_ray.config import Config
from toolformer_ray.finetune.data import (BatchPlan, FinetuneData, FinetuneError, batch_plan,
                                          prepare_data, read_documents)
from toolformer_ray.finetune.ds_config import deepspeed_config, warmup_steps_for
from toolformer_ray.finetune.export import PROBE_TOKENS, publish_export
from toolformer_ray.finetune.progress import ProgressLogger, load_metrics, plot_loss_curve
from toolformer_ray.finetune.resume import (CHECKPOINTS, _check_resumable, fingerprint_hash,
                                            fingerprint_parts, url_fs)
from toolformer_ray.finetune.worker import FAIL_AT_STEP_ENV, TrainSpec, train_loop
from toolformer_ray.fsutil import is_local, local_abs
from toolformer_ray.models import directory_revision, load_tokenizer, resolve_model_dir
from toolformer_ray.ray_session import ensure_ray

log = logging.getLogger(__name__)

WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
              "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}


@dataclass
class FinetuneResult:
    output: str  # the run folder (local or s3://)
    model_dir: str  # the exported Hugging Face directory
    steps: int  # optimizer steps done (the last checkpoint's step)
    max_steps: int
    resumed_from: int | None  # the step this invocation started at, if it resumed
    best_step: int
    best_checkpoint: str
    best_dev_ppl: float | None  # dev perplexity with calls disabled
    base_dev_ppl: float | None  # the same for the model before fine-tuning
    first_loss: float | None
    last_loss: float | None
    export_max_abs_diff: float | None  # exported model vs the checkpoint's own logits on a probe
    data_stats: dict = field(default_factory=dict)
    elapsed_s: float = 0.0
    loss_curve: str | None = None
    tensorboard: str | None = None

    def describe(self) -> str:
        lines = [f"fine-tuned model: {self.model_dir}"]
        resumed = f", resumed at step {self.resumed_from}" if self.resumed_from else ""
        loss = (f"; loss {self.first_loss:.4f} -> {self.last_loss:.4f}"
                if self.first_loss is not None and self.last_loss is not None else "")
        lines.append(f"steps: {self.steps}/{self.max_steps}{resumed}{loss}")
        ppl = ""
        if self.best_dev_ppl is not None:
            ppl = f", dev perplexity {self.best_dev_ppl:.4g} with calls disabled"
        if self.best_dev_ppl is not None and self.base_dev_ppl is not None:
            ppl += f" (base model {self.base_dev_ppl:.4g})"
        lines.append(f"best checkpoint: step {self.best_step} ({self.best_checkpoint}){ppl}")
        s = self.data_stats
        if s:
            lines.append(f"data: {s['documents']} documents "
                         f"({s['documents_with_calls']} with calls); trained on "
                         f"{s['train_augmented_texts']} augmented + "
                         f"{s['train_original_texts']} original texts = {s['train_rows']} rows of "
                         f"{s['max_length']} tokens; dev {s['dev_rows']} rows")
        if self.export_max_abs_diff is not None:
            lines.append("export check: max |logit difference| vs the checkpoint = "
                         f"{self.export_max_abs_diff:.2e}")
        if self.loss_curve:
            lines.append(f"loss curve: {self.loss_curve}; TensorBoard: {self.tensorboard}")
        lines.append(f"took {self.elapsed_s:.0f} s")
        return "\n".join(lines)


@dataclass
class Run:
    """What the steps hand on: the plan, then where the run lives."""
    plan: BatchPlan
    ds_config: dict
    model_dir: Path
    tokenizer: Any
    markers: Markers
    data_uri: str
    data: FinetuneData
    output: str = ""  # local absolute path or s3://... without a trailing slash
    parts: dict = field(default_factory=dict)  # the fingerprint (run.json)
    fingerprint: str = ""
    resuming: bool = False
    log_dir: Path | None = None  # metrics.jsonl, tensorboard/, loss_curve.png (staged for s3://)


# ------------------------------------------------------------------------------------------ steps

def _plan(cfg: Config) -> Run:
    """Settings, model and data: everything decided before any output is written."""
    ft = cfg.finetune
    if cfg.markers.special_tokens:
        raise FinetuneError("finetune does not support markers.special_tokens yet "
                            "(plain-text markers only)")
    plan = batch_plan(ft.global_batch_size, ft.micro_batch_size, ft.num_workers)
    ds_config = deepspeed_config(ft.deepspeed_config, plan)
    model_dir = resolve_model_dir(cfg.model.path, cfg.model.cache_dir, cfg.model.tiny_seed)
    model_dir = model_dir.resolve()
    tokenizer = load_tokenizer(model_dir)
    data_uri = ft.data or f"{cfg.run.output.rstrip('/')}/{cfg.config_hash()}"
    if ft.data is None:
        fs, path = url_fs(data_uri)
        if not fs.exists(path):
            raise FinetuneError(f"no generate output for this config at {data_uri}: run "
                                "`toolformer-ray generate` first, or set finetune.data")
    markers = Markers.from_config(cfg.markers)
    data = prepare_data(read_documents(data_uri), tokenizer, markers=markers,
                        max_length=ft.max_length, original_text_ratio=ft.original_text_ratio,
                        mask_tool_results=ft.mask_tool_results, dev_fraction=ft.dev_fraction,
                        dev_max_sequences=ft.dev_max_sequences, seed=cfg.run.seed)
    log.info("finetune data: %s", data.stats)
    return Run(plan=plan, ds_config=ds_config, model_dir=model_dir, tokenizer=tokenizer,
               markers=markers, data_uri=data_uri, data=data)


def _open_output(cfg: Config, run: Run) -> None:
    """Fingerprint the run; resume a compatible run in the output folder, refuse another one, or
    start a fresh one (run.json, and the logs of an unfinished earlier attempt cleared)."""
    ft = cfg.finetune
    run.output = local_abs(ft.output) if is_local(ft.output) else ft.output.rstrip("/")
    run.parts = fingerprint_parts(cfg, run.data, directory_revision(run.model_dir), run.ds_config,
                                  run.plan)
    run.fingerprint = fingerprint_hash(run.parts)
    run.resuming = _check_resumable(run.output, run.parts)
    fs, root = url_fs(run.output)
    fs.makedirs(root, exist_ok=True)
    if not run.resuming:
        fs.pipe_file(f"{root}/run.json", json.dumps(
            {"fingerprint": run.parts, "fingerprint_hash": run.fingerprint, "data": run.data_uri,
             "model": str(run.model_dir), "data_stats": run.data.stats,
             "finetune": ft.model_dump(mode="json")}, indent=1).encode())
    # Logs are written where the controller runs (the driver's node); for s3:// they are staged in
    # a temporary folder and uploaded at the end.
    local = is_local(run.output)
    run.log_dir = Path(run.output) if local else Path(tempfile.mkdtemp(prefix="ft-logs-"))
    run.log_dir.mkdir(parents=True, exist_ok=True)
    if not run.resuming:  # a fresh run: the logs of an earlier, unfinished attempt are not its own
        (run.log_dir / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(run.log_dir / "tensorboard", ignore_errors=True)
    elif not local and fs.exists(f"{root}/metrics.jsonl"):
        fs.get(f"{root}/metrics.jsonl", str(run.log_dir / "metrics.jsonl"))


def _train_spec(cfg: Config, run: Run) -> TrainSpec:
    ft = cfg.finetune
    # Probe for the export check: the start of the first dev row (else the first training row).
    source = run.data.dev if len(run.data.dev) else run.data.train
    probe_ids = source.input_ids[0, :min(PROBE_TOKENS, int(source.lengths[0]))].tolist()
    start_ids = run.tokenizer(run.markers.start, add_special_tokens=False).input_ids
    fail_at = os.environ.get(FAIL_AT_STEP_ENV)
    return TrainSpec(
        model_dir=str(run.model_dir), model_source=cfg.model.path,
        model_cache=str(Path(cfg.model.cache_dir).resolve()),
        model_revision=run.parts["model_revision"], tiny_seed=cfg.model.tiny_seed,
        ds_config=run.ds_config, plan=run.plan, lr=ft.lr,
        warmup_steps=warmup_steps_for(ft.max_steps, ft.warmup_ratio), lr_decay=ft.lr_decay,
        weight_decay=ft.weight_decay, max_steps=ft.max_steps,
        checkpoint_every=ft.checkpoint_every, log_every=ft.log_every, seed=cfg.run.seed,
        bf16=ft.bf16, gradient_checkpointing=ft.gradient_checkpointing, use_gpu=ft.use_gpu,
        cpus_per_worker=ft.cpus_per_worker, fingerprint=run.fingerprint,
        api_start_token=start_ids[0] if start_ids else None, probe_ids=probe_ids,
        export_dtype=ft.export_dtype, fail_at_step=int(fail_at) if fail_at else None)


def _check_resources(cfg: Config, started_here: bool) -> None:
    ft = cfg.finetune
    need_cpu = ft.num_workers * ft.cpus_per_worker
    have = ray.cluster_resources()
    problem = None
    if have.get("CPU", 0) < need_cpu:
        problem = (f"{ft.num_workers} workers x {ft.cpus_per_worker} CPU need {need_cpu:g} CPUs; "
                   f"the cluster has {have.get('CPU', 0):g}")
    elif ft.use_gpu and have.get("GPU", 0) < ft.num_workers:
        problem = (f"{ft.num_workers} GPU workers need {ft.num_workers} GPUs; "
                   f"the cluster has {have.get('GPU', 0):g}")
    if problem and started_here:  # a local Ray never grows: waiting would hang forever
        raise FinetuneError(problem + " (set finetune.num_workers / cpus_per_worker / use_gpu)")
    if problem:
        log.warning("%s; waiting for the autoscaler", problem)


def _train(cfg: Config, run: Run, spec: TrainSpec) -> ray.train.Result:
    """Ray Train's fit on this (joined or local) Ray; a local Ray started here is stopped after."""
    ft = cfg.finetune
    if not is_v2_enabled():
        raise FinetuneError("finetune needs Ray Train V2: unset RAY_TRAIN_V2_ENABLED=0")
    started_ray = ensure_ray(cfg.ray.address, cfg.ray.num_cpus, dashboard=True)
    try:
        _check_resources(cfg, started_ray)
        env = dict(WORKER_ENV)
        if not ft.use_gpu:
            env["DS_ACCELERATOR"] = "cpu"
        resources = {"CPU": ft.cpus_per_worker} | ({"GPU": 1} if ft.use_gpu else {})
        has_dev = len(run.data.dev) > 0
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"spec": spec, "data": ray.put(run.data)},
            scaling_config=ray.train.ScalingConfig(num_workers=ft.num_workers, use_gpu=ft.use_gpu,
                                                   resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                name=CHECKPOINTS, storage_path=run.output,
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=ft.keep_checkpoints,
                    checkpoint_score_attribute="dev_ppl" if has_dev else "step",
                    checkpoint_score_order="min" if has_dev else "max"),
                failure_config=ray.train.FailureConfig(max_failures=ft.max_failures),
                callbacks=[ProgressLogger(str(run.log_dir), ft.max_steps)],
                worker_runtime_env={"env_vars": env},
                logging_config=ray.train.LoggingConfig(log_level="WARNING")),
        )
        try:
            return trainer.fit()
        except ray.train.TrainingFailedError as e:
            raise RuntimeError(f"fine-tuning failed: {e}\nThe checkpoints in "
                               f"{run.output}/{CHECKPOINTS} are kept: run the same command again "
                               "to resume from the latest one.") from e
    finally:
        if started_ray:
            ray.shutdown()


def _pick_best(result: ray.train.Result, run: Run) -> tuple[Any, dict]:
    """The best checkpoint: lowest dev perplexity with calls disabled (the paper's criterion); else
    the last. Returns (checkpoint, its metrics)."""
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if "step" in m]
    if not candidates:
        raise RuntimeError(f"the run reported no checkpoint under {run.output}/{CHECKPOINTS}")
    if len(run.data.dev):
        return min(candidates, key=lambda cm: (cm[1]["dev_ppl"], -cm[1]["step"]))
    return max(candidates, key=lambda cm: cm[1]["step"])


def _upload_logs(run: Run) -> None:
    """For s3://: the staged logs go next to the checkpoints; the staging folder is removed."""
    fs, root = url_fs(run.output)
    for name in ("metrics.jsonl", "loss_curve.png"):
        if (run.log_dir / name).is_file():
            fs.put(str(run.log_dir / name), f"{root}/{name}")
    if (run.log_dir / "tensorboard").is_dir():
        fs.put(str(run.log_dir / "tensorboard") + "/", f"{root}/tensorboard/", recursive=True)
    shutil.rmtree(run.log_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------- the recipe

def run_finetune(cfg: Config) -> FinetuneResult:
    """Fine-tune `cfg.model` on the augmented corpus and export the best checkpoint (see the
    package doc)."""
    t_start = time.time()
    ft = cfg.finetune
    run = _plan(cfg)
    _open_output(cfg, run)
    result = _train(cfg, run, _train_spec(cfg, run))
    best, best_metrics = _pick_best(result, run)

    records = load_metrics(run.log_dir / "metrics.jsonl")
    # Ray keeps only the keep_checkpoints best, so the last step may have left best_checkpoints:
    # ask the log too.
    last_step = max([m["step"] for _, m in (result.best_checkpoints or []) if "step" in m]
                    + [r["step"] for r in records if "step" in r])
    this_run = [r for r in records if r.get("time", 0) >= t_start and "start_step" in r]
    if this_run and this_run[0]["start_step"]:
        resumed_from = this_run[0]["start_step"]
    elif run.resuming and not this_run:  # nothing left to train: only re-exported
        resumed_from = last_step
    else:
        resumed_from = None
    if records:
        plot_loss_curve(records, run.log_dir / "loss_curve.png",
                        title=f"fine-tuning {cfg.model.path} on {Path(run.data_uri).name}")

    best_uri = f"{run.output}/{CHECKPOINTS}/{Path(best.path).name}"
    model_uri = f"{run.output}/model"
    publish_export(best_uri, model_uri, metadata={
        "base_model": str(run.model_dir), "base_model_revision": run.parts["model_revision"],
        "checkpoint": best.path, "step": best_metrics["step"],
        "dev_ppl": best_metrics.get("dev_ppl"), "fingerprint": run.fingerprint,
        "data": run.data_uri, "export_dtype": ft.export_dtype,
        "finetune": ft.model_dump(mode="json")})
    if not is_local(run.output):
        _upload_logs(run)
    losses = [r["loss"] for r in records if "loss" in r]
    base_dev_ppl = next((r["dev_ppl"] for r in records if r["step"] == 0 and "dev_ppl" in r), None)
    return FinetuneResult(
        output=run.output, model_dir=model_uri, steps=last_step, max_steps=ft.max_steps,
        resumed_from=resumed_from, best_step=int(best_metrics["step"]),
        best_checkpoint=best.path, best_dev_ppl=best_metrics.get("dev_ppl"),
        base_dev_ppl=base_dev_ppl, first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        export_max_abs_diff=best_metrics.get("export_max_abs_diff"), data_stats=run.data.stats,
        elapsed_s=time.time() - t_start,
        loss_curve=f"{run.output}/loss_curve.png" if records else None,
        tensorboard=f"{run.output}/tensorboard")
