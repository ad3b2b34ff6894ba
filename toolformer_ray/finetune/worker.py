"""The Ray Train worker: one DeepSpeed engine per worker, the training steps, and the checkpoints.

    train_loop(config)
      setup       the model on this node, under deepspeed.zero.Init for ZeRO-3 (partitioned as it is
                  created: no rank holds the whole model), AdamW + the lr schedule, the engine;
                  resume from Ray Train's latest checkpoint (verified before DeepSpeed unpickles it)
      base dev    the base model's dev perplexity (step 0): the baseline to beat
      each step   micro x accumulation rows per worker (BatchPlan: a function of (seed, step) only),
                  a token-weighted loss over the global batch
      checkpoint  every `checkpoint_every` steps and at the end: dev perplexity with calls disabled,
                  the DeepSpeed checkpoint, probe logits, state.json and hf/ (the export),
                  reported to Ray Train, which uploads the folder to its storage (local or s3://)
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train.v2._internal.execution import context as ray_train_context
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from toolformer_ray.finetune.data import BatchPlan, FinetuneData, gather_rows
from toolformer_ray.finetune.ds_config import bf16_supported, lr_factor
from toolformer_ray.finetune.export import gathered_state_dict, probe_logits, write_hf_export
from toolformer_ray.finetune.losses import all_reduce, evaluate_dev, forward_logits, token_nll
from toolformer_ray.finetune.resume import load_checkpoint_checked
from toolformer_ray.models import resolve_on_node

# fault drill: a worker raises before this step (1-based)
FAIL_AT_STEP_ENV = "TOOLFORMER_FINETUNE_FAIL_AT_STEP"


@dataclass
class TrainSpec:
    """Everything a worker needs (plain values: it is pickled to the workers)."""
    model_dir: str  # resolved on the driver's node
    model_source: str  # cfg.model.path: resolved again on a node that lacks model_dir
    model_cache: str
    model_revision: str
    tiny_seed: int
    ds_config: dict
    plan: BatchPlan
    lr: float
    warmup_steps: int
    lr_decay: str
    weight_decay: float
    max_steps: int
    checkpoint_every: int
    log_every: int
    seed: int
    bf16: bool | str
    gradient_checkpointing: bool
    use_gpu: bool
    cpus_per_worker: float
    fingerprint: str
    api_start_token: int | None
    probe_ids: list[int]
    export_dtype: str = "float32"  # the Hugging Face folder each checkpoint carries (hf/)
    fail_at_step: int | None = None


@dataclass
class Worker:
    """One rank's engine and what its steps need."""
    engine: Any
    hf_config: Any  # ZeRO-3's HfDeepSpeedConfig: must outlive the engine (transformers: a weakref)
    base_dir: str
    zero_stage: int
    bf16: bool
    rank: int
    world: int
    device: Any
    held_max: int  # the most parameter elements any rank held before deepspeed.initialize
    full: int  # the model's parameter elements


def _device(use_gpu: bool):
    return ray.train.torch.get_device() if use_gpu else torch.device("cpu")


def param_elements(model) -> tuple[int, int]:
    """(parameter elements this rank holds, elements of the whole model). A parameter partitioned by
    ZeRO-3's zero.Init has an empty `data` and holds its share in `ds_tensor`; `ds_numel` is its
    full size."""
    held = 0
    full = 0
    for p in model.parameters():
        part = getattr(p, "ds_tensor", None)
        held += p.data.numel() + (part.numel() if part is not None else 0)
        full += getattr(p, "ds_numel", p.numel())
    return held, full


def _worker_model_dir(spec: TrainSpec) -> str:
    """The model directory on this worker's node: the driver's, or the same model resolved here."""
    if Path(spec.model_dir, "config.json").is_file():
        return spec.model_dir
    return str(resolve_on_node(spec.model_source, spec.model_cache, spec.tiny_seed,
                               spec.model_revision))


def _setup(spec: TrainSpec, rank: int, world: int) -> Worker:
    # deepspeed is imported here, on the workers only: at import it picks its accelerator (and logs
    # "Setting accelerator to CPU" on a GPU-less driver) and costs the driver ~2 s for nothing.
    import deepspeed

    device = _device(spec.use_gpu)
    if not spec.use_gpu:
        torch.set_num_threads(max(1, int(spec.cpus_per_worker)))
    bf16 = bf16_supported(spec.use_gpu) if spec.bf16 == "auto" else bool(spec.bf16)
    ds_config = {**spec.ds_config, "bf16": {"enabled": bf16}}
    torch.manual_seed(spec.seed)
    zero_stage = int(ds_config["zero_optimization"]["stage"])
    # ZeRO-3: while the HfDeepSpeedConfig lives, from_pretrained builds the model under
    # deepspeed.zero.Init, each parameter partitioned across the ranks as it is created (rank 0
    # reads the files into host memory and scatters them layer by layer), so no rank holds the
    # whole model.
    deepspeed.init_distributed()  # adopts Ray Train's process group; zero.Init sizes from it
    hf_config = HfDeepSpeedConfig(ds_config) if zero_stage == 3 else None
    base_dir = _worker_model_dir(spec)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32,
                                                 use_safetensors=True)
    model.config.use_cache = False
    held, full = param_elements(model)
    (held_max,) = all_reduce([float(held)], device, dist.ReduceOp.MAX)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # no weight decay on norms and biases (a zero.Init parameter keeps its real shape in ds_shape)
    decay = [p for p in model.parameters() if len(getattr(p, "ds_shape", p.shape)) >= 2]
    no_decay = [p for p in model.parameters() if len(getattr(p, "ds_shape", p.shape)) < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr, betas=(0.9, 0.999), eps=1e-8, fused=spec.use_gpu or None)
    schedule = partial(lr_factor, warmup_steps=spec.warmup_steps, max_steps=spec.max_steps,
                       decay=spec.lr_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    return Worker(engine=engine, hf_config=hf_config, base_dir=base_dir, zero_stage=zero_stage,
                  bf16=bf16, rank=rank, world=world, device=device, held_max=int(held_max),
                  full=int(full))


def _train_step(w: Worker, spec: TrainSpec, data: FinetuneData, step: int) -> dict[str, Any]:
    """One optimizer step (0-based `step`) over this rank's share of the global batch."""
    plan = spec.plan
    n_rows = len(data.train)
    t0 = time.perf_counter()
    rows = plan.step_rows(step, n_rows, spec.seed)  # [accumulation, workers, micro]
    targets = data.train.n_targets(rows.ravel())
    nll_sum = 0.0
    t_compute = 0.0
    for a in range(plan.accumulation):
        t_micro = time.perf_counter()
        batch = gather_rows(data.train, rows[a, w.rank])
        ids, logits = forward_logits(w.engine, batch, w.device)
        nll, mask = token_nll(logits, ids, torch.from_numpy(batch["loss_mask"]).to(w.device))
        micro_nll = (nll * mask).sum()
        # Token-weighted mean over the whole global batch: DeepSpeed averages gradients over
        # workers, so each micro-batch's sum is scaled by world / (targets in the global batch).
        w.engine.backward(micro_nll * (w.world / max(targets, 1)), scale_wrt_gas=False)
        t_compute += time.perf_counter() - t_micro  # forward + backward (+ ZeRO's grad reduction)
        w.engine.step()  # the update at the accumulation boundary (+ ZeRO's parameter gather)
        nll_sum += float(micro_nll.detach())
    (nll_total,) = all_reduce([nll_sum], w.device)
    elapsed = time.perf_counter() - t0
    done = step + 1
    return {
        "step": done,
        "loss": nll_total / max(targets, 1),
        "lr": spec.lr * lr_factor(step, spec.warmup_steps, spec.max_steps, spec.lr_decay),
        "tokens_per_s": float(data.train.lengths[rows.ravel()].sum()) / elapsed,
        "step_time_s": elapsed,
        "fwd_bwd_time_s": t_compute,
        "epoch": done * plan.global_batch / n_rows,
    }


def _checkpoint(w: Worker, spec: TrainSpec, data: FinetuneData, metrics: dict) -> None:
    """Dev perplexity, then the checkpoint folder (DeepSpeed shards; on rank 0 also probe logits,
    hf/ and state.json), reported to Ray Train, which uploads it to its storage."""
    done = metrics["step"]
    metrics.update(evaluate_dev(w.engine, data.dev, spec.plan.micro, w.rank, w.world, w.device,
                                spec.api_start_token))
    logits = probe_logits(w.engine, spec.probe_ids, w.device)
    compute_dtype = "bfloat16" if w.bf16 else "float32"
    weights = gathered_state_dict(w.engine, w.zero_stage, w.rank)  # collective under ZeRO-3
    with tempfile.TemporaryDirectory(prefix="ft-ckpt-") as tmp:
        w.engine.save_checkpoint(tmp, tag=f"step{done}",
                                 client_state={"step": done, "fingerprint": spec.fingerprint})
        if w.rank == 0:
            probe = {"input_ids": torch.tensor(spec.probe_ids), "logits": logits.contiguous()}
            save_file(probe, os.path.join(tmp, "probe.safetensors"))
            # The Hugging Face folder, written here and uploaded with the checkpoint by this
            # worker: the export is a copy of the best one's hf/, so the driver never pulls
            # weights or optimizer states.
            diff = write_hf_export(weights, w.engine.module, w.base_dir, Path(tmp, "hf"),
                                   spec.export_dtype, probe, compute_dtype)
            metrics["export_max_abs_diff"] = diff
            Path(tmp, "state.json").write_text(json.dumps(
                {"step": done, "fingerprint": spec.fingerprint, "metrics": metrics,
                 "compute_dtype": compute_dtype, "export_dtype": spec.export_dtype,
                 "export_max_abs_diff": diff}, indent=1))
        del weights
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"step_{done:06d}")


def train_loop(config: dict) -> None:
    """The Ray Train worker function: one DeepSpeed engine per worker."""
    # Ray 2.60 logs every report (with its whole metrics dict) at INFO on a logger named by its file
    # path, outside "ray.train", so LoggingConfig does not quiet it; the controller's progress line
    # says the same.
    logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)
    spec: TrainSpec = config["spec"]
    data: FinetuneData = ray.get(config["data"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    world = ctx.get_world_size()
    if world != spec.plan.workers:
        raise RuntimeError(f"expected {spec.plan.workers} workers, got {world}")
    w = _setup(spec, rank, world)

    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            start_step = load_checkpoint_checked(w.engine, ckpt_dir, spec.fingerprint)
    if start_step == 0 and len(data.dev):  # the base model's dev perplexity: the baseline to beat
        base = evaluate_dev(w.engine, data.dev, spec.plan.micro, rank, world, w.device,
                            spec.api_start_token)
        ray.train.report({"step": 0, **base})
    w.engine.train()
    for step in range(start_step, spec.max_steps):
        if spec.fail_at_step is not None and step + 1 == spec.fail_at_step:
            raise RuntimeError(f"injected failure before step {step + 1} ({FAIL_AT_STEP_ENV})")
        metrics = _train_step(w, spec, data, step)
        metrics.update({
            "start_step": start_step,  # > 0: this invocation resumed from a checkpoint at that step
            "bf16": w.bf16,
            "rank_param_elements_max": w.held_max,
            "model_param_elements": w.full,
        })
        grad_norm = w.engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        done = step + 1
        if done % spec.checkpoint_every == 0 or done == spec.max_steps:
            _checkpoint(w, spec, data, metrics)
        elif done % spec.log_every == 0:
            ray.train.report(metrics)
