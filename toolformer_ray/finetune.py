"""Fine-tuning on the augmented corpus C* with DeepSpeed ZeRO (stage 2 or 3) under Ray Train.

    run_finetune(cfg)
      driver   read C* -> pack rows + dev split (finetune_data) -> ray.put
               check the output folder: a run with the same fingerprint is resumed, another one refused
      workers  TorchTrainer, one DeepSpeed engine per worker (gloo + DS_ACCELERATOR=cpu locally, NCCL on GPUs);
               ZeRO-3 builds the model under deepspeed.zero.Init (partitioned as it is created: no rank
               holds the whole model); every step: micro x accumulation rows per worker, a token-weighted
               loss; every `checkpoint_every` steps and at the end: dev perplexity with calls disabled, a
               DeepSpeed checkpoint + probe logits + hf/ (the weights gathered to rank 0, one module at a
               time, written as a Hugging Face folder and checked against the probe), all written by the
               workers to Ray Train storage (local or s3://)
      driver   best checkpoint by dev perplexity -> its hf/ copied to model/ (storage to storage: the
               driver never pulls weights or optimizer states); loss curve PNG

Output folder (`finetune.output`, local or s3://):
    run.json            the run's fingerprint (data digest, model, hyper-parameters): what resuming needs
    checkpoints/        Ray Train storage: step_000010/ ... (DeepSpeed shards, probe.safetensors,
                        state.json, hf/: the Hugging Face folder of the weights at that step)
    model/              the exported best model (safetensors, config, tokenizer, finetune.json)
    metrics.jsonl       one line per logged step; tensorboard/ the same as TensorBoard events
    loss_curve.png

Resuming: Ray Train restores its checkpoint list from `checkpoints/`; the workers load the latest DeepSpeed
checkpoint (weights, optimizer, lr schedule) and continue at its step. DeepSpeed unpickles the shards, which
can run code: verify_checkpoint checks the plain-JSON state.json (this run's fingerprint), `latest` and the
files' owners first; resuming from a folder still means trusting whoever can write to it.
The rows of step s are a function of
(seed, s) only (finetune_data.BatchPlan), so the resumed run trains on exactly the rows the first one would have.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from toolformer_ray.api_text import Markers
from toolformer_ray.config import Config
from toolformer_ray.errors import UserError
from toolformer_ray.finetune_data import (BatchPlan, FinetuneData, Packed, batch_plan, gather_rows, prepare_data,
                                          read_documents)

log = logging.getLogger(__name__)

FAIL_AT_STEP_ENV = "TOOLFORMER_FINETUNE_FAIL_AT_STEP"  # fault drill: a worker raises before this step (1-based)
CHECKPOINTS = "checkpoints"  # Ray Train run name: <output>/checkpoints/step_000010/
PROBE_TOKENS = 16
_REPO_ROOT = Path(__file__).resolve().parents[1]


class FinetuneError(UserError, ValueError):
    """Bad fine-tuning settings, or an output folder that holds an incompatible run."""


# ------------------------------------------------------------------------------------------- pure parts

def lr_factor(step: int, warmup_steps: int, max_steps: int, decay: str = "none") -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warm-up, then constant (the
    paper), linear or cosine decay to 0 at max_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "none" or max_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
    if decay == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps_for(max_steps: int, warmup_ratio: float) -> int:
    return int(math.ceil(warmup_ratio * max_steps))


def token_nll(logits, input_ids, loss_mask, disabled_token: int | None = None):
    """Negative log-likelihood of each next token, [B, T-1], and its loss mask (token t is predicted from
    the logits at t-1). With `disabled_token`, tool calls are disabled as in the paper's evaluation: that
    token's probability is set to 0 and the rest renormalised, except where the text itself continues with
    it (plain text may contain " [" too; its own probability is used there)."""
    import torch
    import torch.nn.functional as F

    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    flat_logits, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    nll = F.cross_entropy(flat_logits, flat_targets, reduction="none").view_as(targets)
    if disabled_token is not None:
        blocked = flat_logits.clone()
        blocked[:, disabled_token] = float("-inf")
        nll_blocked = F.cross_entropy(blocked, flat_targets, reduction="none").view_as(targets)
        nll = torch.where(targets == disabled_token, nll, nll_blocked)
    return nll, loss_mask[:, 1:].to(nll.dtype)


def resolve_path(path: str) -> Path:
    """A config-relative file: as given (from the working directory), else inside the repository."""
    for candidate in (Path(path).expanduser(), _REPO_ROOT / path):
        if candidate.is_file():
            return candidate.resolve()
    raise FinetuneError(f"DeepSpeed config not found: {path}")


def deepspeed_config(path: str, plan: BatchPlan) -> dict:
    """The DeepSpeed JSON with the batch sizes filled in from the finetune config ("auto" or equal values).
    The optimizer and lr schedule come from the finetune config, so the JSON must not define them."""
    file = resolve_path(path)
    try:
        ds = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise FinetuneError(f"{file}: not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise FinetuneError(f"{file}: the top level must be an object")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise FinetuneError(f"{file}: remove '{key}': the optimizer (AdamW) and lr schedule are set by "
                                "finetune.lr, warmup_ratio, lr_decay and weight_decay")
    stage = (ds.get("zero_optimization") or {}).get("stage")
    if stage not in (2, 3):
        raise FinetuneError(f"{file}: zero_optimization.stage must be 2 or 3 (got {stage!r})")
    wanted = {"train_batch_size": plan.global_batch, "train_micro_batch_size_per_gpu": plan.micro,
              "gradient_accumulation_steps": plan.accumulation}
    for key, value in wanted.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise FinetuneError(f"{file}: {key} is {ds[key]} but the finetune config gives {value}; "
                                'set it to "auto" (batch sizes come from finetune.global_batch_size etc.)')
        ds[key] = value
    bf16 = ds.get("bf16")
    if bf16 is not None and not isinstance(bf16, dict):
        raise FinetuneError(f"{file}: 'bf16' must be an object")
    ds.pop("bf16", None)  # decided by finetune.bf16 on the workers (hardware dependent)
    if (ds.get("fp16") or {}).get("enabled") is True:
        raise FinetuneError(f"{file}: fp16 is not supported; use finetune.bf16")
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise FinetuneError(f"{file}: 'auto' is only understood for batch sizes and bf16, not for {leftover}")
    return ds


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def bf16_supported(use_gpu: bool) -> bool:
    import torch

    if use_gpu:
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # AVX512-BF16 / AMX: fast bf16 matmuls


# ------------------------------------------------------------------------------------------ worker side

@dataclass
class TrainSpec:
    """Everything a worker needs (plain values: it is pickled to the workers)."""
    model_dir: str  # resolved on the driver's node
    model_source: str  # cfg.model.path: resolved again on a node that lacks model_dir (s3://, "default")
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


def _device(use_gpu: bool):
    import torch

    if use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def _all_reduce_sum(values: list[float], device) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _forward_logits(engine, batch: dict, device):
    import torch

    ids = torch.from_numpy(batch["input_ids"]).to(device)
    attention = torch.from_numpy(batch["attention_mask"]).to(device)
    return ids, engine(input_ids=ids, attention_mask=attention, use_cache=False).logits


def _all_reduce_max(values: list[float], device) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def evaluate_dev(engine, dev: Packed, micro: int, rank: int, world: int, device, api_start_token: int | None) -> dict:
    """Dev perplexity over the packed dev rows, split across ranks. Every rank runs the same number of
    forward passes (ZeRO-3 gathers parameters collectively), padding its share with zero-weight rows."""
    import torch

    n = len(dev)
    if n == 0:
        return {}
    per_rank = -(-n // world)
    lo, hi = rank * per_rank, min(n, (rank + 1) * per_rank)
    sums = [0.0, 0.0, 0.0]  # nll with calls disabled, plain nll, targets
    engine.eval()
    with torch.no_grad():
        for start in range(0, per_rank, micro):
            idx = lo + start + np.arange(micro)
            real = idx < hi
            batch = gather_rows(dev, np.where(real, idx, 0))
            ids, logits = _forward_logits(engine, batch, device)
            mask_np = batch["loss_mask"] * real[:, None]
            loss_mask = torch.from_numpy(mask_np).to(device)
            nll_off, mask = token_nll(logits, ids, loss_mask, api_start_token)
            nll_on, _ = token_nll(logits, ids, loss_mask)
            sums[0] += float((nll_off * mask).sum())
            sums[1] += float((nll_on * mask).sum())
            sums[2] += float(mask.sum())
    engine.train()
    off, on, count = _all_reduce_sum(sums, device)
    if count == 0:
        return {}
    return {"dev_ppl": math.exp(off / count), "dev_ppl_plain": math.exp(on / count), "dev_loss": off / count}


def probe_logits(engine, probe_ids: list[int], device):
    import torch

    engine.eval()
    with torch.no_grad():
        ids = torch.tensor([probe_ids], dtype=torch.long, device=device)
        logits = engine(input_ids=ids, use_cache=False).logits[0].float().cpu()
    engine.train()
    return logits


def param_elements(model) -> tuple[int, int]:
    """(parameter elements this rank holds, elements of the whole model). A parameter partitioned by ZeRO-3's
    zero.Init has an empty `data` and holds its share in `ds_tensor`; `ds_numel` is its full size."""
    held = full = 0
    for p in model.parameters():
        part = getattr(p, "ds_tensor", None)
        held += p.data.numel() + (part.numel() if part is not None else 0)
        full += getattr(p, "ds_numel", p.numel())
    return held, full


def verify_checkpoint(ckpt_dir: str | Path, fingerprint: str) -> int:
    """Refuse a checkpoint before any of it is unpickled, and return its step.

    DeepSpeed loads its shards with torch.load(weights_only=False), which runs whatever code a file names, so
    loading means trusting the folder. What can be checked first, from plain files: state.json (JSON) names
    this run's fingerprint, `latest` names that step's tag (DeepSpeed joins it into a path), and no file or
    folder is a link, writable by other users, or owned by a user other than this one (or root). This stops
    a checkpoint of another run and a tampered shared folder; it cannot stop someone who can write as this
    user (docs/finetune.md: resuming from a folder means trusting it)."""
    root = Path(ckpt_dir)
    me = os.getuid()
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        problem = ("a symbolic link" if path.is_symlink() else
                   f"owned by uid {st.st_uid}" if st.st_uid not in (me, 0) else
                   "world-writable" if st.st_mode & 0o002 else None)
        if problem:
            raise FinetuneError(f"checkpoint {root}: {path.relative_to(root)} is {problem}; refusing to "
                                "unpickle it (resuming from a folder means trusting it)")
    try:
        state = json.loads((root / "state.json").read_text())
        step = int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FinetuneError(f"checkpoint {root}: no readable state.json ({e}); refusing to load it") from None
    if state.get("fingerprint") != fingerprint:
        raise FinetuneError(f"checkpoint {root} belongs to another run (fingerprint "
                            f"{state.get('fingerprint')!r}, this run {fingerprint!r}); refusing to load it")
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    if latest != f"step{step}":
        raise FinetuneError(f"checkpoint {root}: 'latest' names {latest!r}, state.json step {step}")
    return step


def load_checkpoint_checked(engine, ckpt_dir: str | Path, fingerprint: str) -> int:
    """verify_checkpoint, then DeepSpeed's load (weights, optimizer, lr schedule); returns the step."""
    step = verify_checkpoint(ckpt_dir, fingerprint)
    loaded, client = engine.load_checkpoint(str(ckpt_dir))
    if loaded is None:
        raise RuntimeError(f"could not load the DeepSpeed checkpoint in {ckpt_dir}")
    if client.get("fingerprint") != fingerprint or int(client["step"]) != step:
        raise RuntimeError(f"checkpoint {ckpt_dir}: its DeepSpeed client state disagrees with state.json")
    return step


def _gathered_state_dict(engine, zero_stage: int, rank: int):
    """The engine's full weights on rank 0 (CPU tensors), None on the other ranks. Every rank must call it:
    under ZeRO-3 the parameters are gathered one module at a time (collectives), so no rank ever holds the
    whole model on its device; the copy builds up in rank 0's host memory."""
    if zero_stage == 3:
        # DeepSpeed's own gather (what save_16bit_model and HF Trainer use), without writing a .bin file
        return engine._zero3_consolidated_16bit_state_dict()
    if rank != 0:
        return None
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


@contextlib.contextmanager
def _hf_zero3_detached():
    """transformers builds every model under zero.Init (a collective) while an HfDeepSpeedConfig is alive;
    loading the exported folder on rank 0 alone must not."""
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def write_hf_export(state_dict: dict, model, base_model_dir: str | Path, out_dir: Path, dtype: str,
                    probe: dict | None = None, compute_dtype: str = "float32") -> float | None:
    """A plain Hugging Face folder (safetensors, config, generation config, tokenizer) from gathered weights,
    loaded back to check it: the largest |logit difference| against the engine's own probe logits."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from toolformer_ray.models import load_tokenizer

    base_model_dir = Path(base_model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    cast = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.save_pretrained(out_dir, state_dict=cast, safe_serialization=True)
    config = AutoConfig.from_pretrained(base_model_dir)  # the base's (use_cache on: training turned it off)
    config.dtype = dtype
    config.save_pretrained(out_dir)
    if (base_model_dir / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(base_model_dir).save_pretrained(out_dir)
    load_tokenizer(base_model_dir).save_pretrained(out_dir)
    for f in out_dir.iterdir():  # save_pretrained leaves the weights 0600; serving may run as another user
        f.chmod(0o644)
    del cast
    if probe is None:
        return None
    with _hf_zero3_detached():
        exported = AutoModelForCausalLM.from_pretrained(out_dir, dtype=getattr(torch, compute_dtype),
                                                        use_safetensors=True)
    exported.eval()
    with torch.no_grad():
        logits = exported(input_ids=probe["input_ids"][None].long()).logits[0].float()
    return float((logits - probe["logits"]).abs().max())


def _worker_model_dir(spec: TrainSpec) -> str:
    """The model directory on this worker's node: the driver's, or the same model resolved here."""
    if Path(spec.model_dir, "config.json").is_file():
        return spec.model_dir
    from toolformer_ray.models import directory_revision, resolve_model_dir

    local = resolve_model_dir(spec.model_source, spec.model_cache, spec.tiny_seed)
    if directory_revision(local) != spec.model_revision:
        raise RuntimeError(f"model {spec.model_source} on this node ({local}) differs from the driver's "
                           f"(revision {directory_revision(local)} != {spec.model_revision}); use an s3:// model")
    return str(local)


def train_loop(config: dict) -> None:
    """The Ray Train worker function: one DeepSpeed engine per worker."""
    import deepspeed
    import ray
    import ray.train
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    # Ray 2.60 logs every report (with its whole metrics dict) at INFO on a logger named by its file path,
    # outside "ray.train", so LoggingConfig does not quiet it; the controller's progress line says the same.
    from ray.train.v2._internal.execution import context as _ray_context

    logging.getLogger(_ray_context.__file__).setLevel(logging.WARNING)
    spec: TrainSpec = config["spec"]
    data: FinetuneData = ray.get(config["data"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    plan = spec.plan
    if world != plan.workers:
        raise RuntimeError(f"expected {plan.workers} workers, got {world}")
    device = _device(spec.use_gpu)
    if not spec.use_gpu:
        torch.set_num_threads(max(1, int(spec.cpus_per_worker)))
    bf16 = bf16_supported(spec.use_gpu) if spec.bf16 == "auto" else bool(spec.bf16)
    ds_config = {**spec.ds_config, "bf16": {"enabled": bf16}}

    torch.manual_seed(spec.seed)
    zero_stage = int(ds_config["zero_optimization"]["stage"])
    # ZeRO-3: while this object lives, from_pretrained builds the model under deepspeed.zero.Init, each
    # parameter partitioned across the ranks as it is created (rank 0 reads the files into host memory and
    # scatters them layer by layer), so no rank holds the whole model as parameters. It must outlive the
    # engine (transformers keeps only a weakref).
    deepspeed.init_distributed()  # adopts Ray Train's process group; zero.Init sizes its partitions from it
    hf_ds_config = HfDeepSpeedConfig(ds_config) if zero_stage == 3 else None  # noqa: F841 (kept alive)
    base_dir = _worker_model_dir(spec)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, use_safetensors=True)
    model.config.use_cache = False
    held, full = param_elements(model)
    (held_max,) = _all_reduce_max([float(held)], device)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # no weight decay on norms and biases (a zero.Init parameter keeps its real shape in ds_shape)
    decay = [p for p in model.parameters() if len(getattr(p, "ds_shape", p.shape)) >= 2]
    no_decay = [p for p in model.parameters() if len(getattr(p, "ds_shape", p.shape)) < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr, betas=(0.9, 0.999), eps=1e-8, fused=spec.use_gpu or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, warmup_steps=spec.warmup_steps, max_steps=spec.max_steps, decay=spec.lr_decay))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)

    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            start_step = load_checkpoint_checked(engine, ckpt_dir, spec.fingerprint)

    n_rows = len(data.train)
    if start_step == 0 and len(data.dev):  # the base model's dev perplexity: the baseline to beat
        base = evaluate_dev(engine, data.dev, plan.micro, rank, world, device, spec.api_start_token)
        ray.train.report({"step": 0, **base})
    engine.train()
    for step in range(start_step, spec.max_steps):
        if spec.fail_at_step is not None and step + 1 == spec.fail_at_step:
            raise RuntimeError(f"injected failure before step {step + 1} ({FAIL_AT_STEP_ENV})")
        t0 = time.perf_counter()
        rows = plan.step_rows(step, n_rows, spec.seed)  # [accumulation, workers, micro]
        targets = data.train.n_targets(rows.ravel())
        nll_sum, t_compute = 0.0, 0.0
        for a in range(plan.accumulation):
            t_micro = time.perf_counter()
            batch = gather_rows(data.train, rows[a, rank])
            ids, logits = _forward_logits(engine, batch, device)
            nll, mask = token_nll(logits, ids, torch.from_numpy(batch["loss_mask"]).to(device))
            micro_nll = (nll * mask).sum()
            # Token-weighted mean over the whole global batch: DeepSpeed averages gradients over workers,
            # so each micro-batch's sum is scaled by world / (targets in the global batch).
            engine.backward(micro_nll * (world / max(targets, 1)), scale_wrt_gas=False)
            t_compute += time.perf_counter() - t_micro  # forward + backward (+ ZeRO's gradient reduction)
            engine.step()  # the optimizer update at the accumulation boundary (+ ZeRO's parameter gather)
            nll_sum += float(micro_nll.detach())
        (nll_total,) = _all_reduce_sum([nll_sum], device)
        elapsed = time.perf_counter() - t0
        done = step + 1
        metrics: dict[str, Any] = {
            "step": done,
            "loss": nll_total / max(targets, 1),
            "lr": spec.lr * lr_factor(step, spec.warmup_steps, spec.max_steps, spec.lr_decay),
            "tokens_per_s": float(data.train.lengths[rows.ravel()].sum()) / elapsed,
            "step_time_s": elapsed,
            "fwd_bwd_time_s": t_compute,
            "epoch": done * plan.global_batch / n_rows,
            "start_step": start_step,  # > 0: this invocation resumed from a checkpoint at that step
            "bf16": bf16,
            # the most parameter elements any rank held before deepspeed.initialize, and the model's
            "rank_param_elements_max": int(held_max),
            "model_param_elements": int(full),
        }
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        if done % spec.checkpoint_every == 0 or done == spec.max_steps:
            metrics.update(evaluate_dev(engine, data.dev, plan.micro, rank, world, device, spec.api_start_token))
            logits = probe_logits(engine, spec.probe_ids, device)
            compute_dtype = "bfloat16" if bf16 else "float32"
            weights = _gathered_state_dict(engine, zero_stage, rank)  # collective under ZeRO-3
            with tempfile.TemporaryDirectory(prefix="ft-ckpt-") as tmp:
                engine.save_checkpoint(tmp, tag=f"step{done}", client_state={"step": done, "fingerprint": spec.fingerprint})
                if rank == 0:
                    probe = {"input_ids": torch.tensor(spec.probe_ids), "logits": logits.contiguous()}
                    save_file(probe, os.path.join(tmp, "probe.safetensors"))
                    # The Hugging Face folder, written here and uploaded with the checkpoint by this
                    # worker: the export is a copy of the best one's hf/, so the driver never pulls
                    # weights or optimizer states.
                    diff = write_hf_export(weights, engine.module, base_dir, Path(tmp, "hf"),
                                           spec.export_dtype, probe, compute_dtype)
                    metrics["export_max_abs_diff"] = diff
                    Path(tmp, "state.json").write_text(json.dumps(
                        {"step": done, "fingerprint": spec.fingerprint, "metrics": metrics,
                         "compute_dtype": compute_dtype, "export_dtype": spec.export_dtype,
                         "export_max_abs_diff": diff}, indent=1))
                del weights
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"step_{done:06d}")
        elif done % spec.log_every == 0:
            ray.train.report(metrics)


# ------------------------------------------------------------------------------------------ driver side

def _progress_logger_cls():
    from ray.train import UserCallback

    class ProgressLogger(UserCallback):
        """Runs in the Ray Train controller (on the driver's node): console lines, metrics.jsonl, TensorBoard."""

        def __init__(self, log_dir: str, max_steps: int):
            self.log_dir = log_dir
            self.max_steps = max_steps
            self._writer = None

        def after_report(self, run_context, metrics, checkpoint):
            m = dict(metrics[0]) if metrics else {}
            if "step" not in m:
                return
            if checkpoint is not None:
                m["checkpoint"] = checkpoint.path
            m["time"] = time.time()
            os.makedirs(self.log_dir, exist_ok=True)
            with open(os.path.join(self.log_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(m) + "\n")
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(os.path.join(self.log_dir, "tensorboard"))
            step = int(m["step"])
            for key in ("loss", "lr", "tokens_per_s", "grad_norm", "epoch"):
                if key in m:
                    self._writer.add_scalar(f"train/{key}", m[key], step)
            for key in ("dev_ppl", "dev_ppl_plain", "dev_loss"):
                if key in m:
                    self._writer.add_scalar(f"dev/{key}", m[key], step)
            self._writer.flush()
            if "loss" in m:
                line = (f"[finetune] step {step}/{self.max_steps}  loss {m['loss']:.4f}  lr {m['lr']:.2e}  "
                        f"{m['tokens_per_s']:,.0f} tok/s")
            else:
                line = "[finetune] before training:"
            if "dev_ppl" in m:
                line += f"  dev ppl {m['dev_ppl']:.4g} (calls disabled)"
            if checkpoint is not None:
                line += "  [checkpoint]"
            print(line, flush=True)

    return ProgressLogger


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
        ppl = f", dev perplexity {self.best_dev_ppl:.4g} with calls disabled" if self.best_dev_ppl is not None else ""
        if self.best_dev_ppl is not None and self.base_dev_ppl is not None:
            ppl += f" (base model {self.base_dev_ppl:.4g})"
        lines.append(f"best checkpoint: step {self.best_step} ({self.best_checkpoint}){ppl}")
        s = self.data_stats
        if s:
            lines.append(f"data: {s['documents']} documents ({s['documents_with_calls']} with calls); trained on "
                         f"{s['train_augmented_texts']} augmented + {s['train_original_texts']} original texts = "
                         f"{s['train_rows']} rows of {s['max_length']} tokens; dev {s['dev_rows']} rows")
        if self.export_max_abs_diff is not None:
            lines.append(f"export check: max |logit difference| vs the checkpoint = {self.export_max_abs_diff:.2e}")
        if self.loss_curve:
            lines.append(f"loss curve: {self.loss_curve}; TensorBoard: {self.tensorboard}")
        lines.append(f"took {self.elapsed_s:.0f} s")
        return "\n".join(lines)


def _fs(uri: str):
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path.rstrip("/")


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _local_abs(uri: str) -> str:
    return str(Path(uri.removeprefix("file://")).expanduser().resolve())


def fingerprint_parts(cfg: Config, data: FinetuneData, model_revision: str, ds_config: dict, plan: BatchPlan) -> dict:
    """What must not change for a run to be resumed: the data rows, the model, the optimisation settings."""
    ft = cfg.finetune
    return {
        "data": data.digest(), "model_revision": model_revision, "deepspeed": ds_config,
        "global_batch_size": plan.global_batch, "micro_batch_size": plan.micro, "num_workers": plan.workers,
        "lr": ft.lr, "warmup_steps": warmup_steps_for(ft.max_steps, ft.warmup_ratio), "lr_decay": ft.lr_decay,
        "weight_decay": ft.weight_decay, "max_steps": ft.max_steps, "seed": cfg.run.seed, "bf16": ft.bf16,
    }


def _check_resumable(output: str, parts: dict) -> bool:
    """True when `output` holds a compatible earlier run (to resume), False when it holds none."""
    fs, root = _fs(output)
    run_file = f"{root}/run.json"
    if not fs.exists(f"{root}/{CHECKPOINTS}/checkpoint_manager_snapshot.json"):
        return False  # nothing to resume (an earlier attempt, if any, never reached a checkpoint)
    if not fs.exists(run_file):
        raise FinetuneError(f"{output} holds checkpoints but no run.json: use another finetune.output")
    old = json.loads(fs.cat_file(run_file)).get("fingerprint", {})
    changed = [f"{k}: {old.get(k)!r} -> {parts.get(k)!r}" for k in sorted(set(old) | set(parts))
               if old.get(k) != parts.get(k) and k != "deepspeed"]
    if old.get("deepspeed") != parts.get("deepspeed"):
        changed.append("deepspeed config")
    if changed:
        raise FinetuneError(f"{output} holds a fine-tuning run with other settings ({'; '.join(changed)}); "
                            "resuming needs the same ones: use another finetune.output, or delete the old run")
    return True


def _ensure_ray(cfg: Config) -> bool:
    """Join the configured / job's cluster, else start a local Ray; True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # Ray Train's placement-group cleaner polls the state API, which lives in the dashboard: without
        # it, the job log fills with "Failed to query Ray Train Controller actor state" every second.
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=True)
    return True


def _check_resources(cfg: Config, started_here: bool) -> None:
    import ray

    ft = cfg.finetune
    need_cpu = ft.num_workers * ft.cpus_per_worker
    have = ray.cluster_resources()
    problem = None
    if have.get("CPU", 0) < need_cpu:
        problem = f"{ft.num_workers} workers x {ft.cpus_per_worker} CPU need {need_cpu:g} CPUs; the cluster has {have.get('CPU', 0):g}"
    elif ft.use_gpu and have.get("GPU", 0) < ft.num_workers:
        problem = f"{ft.num_workers} GPU workers need {ft.num_workers} GPUs; the cluster has {have.get('GPU', 0):g}"
    if problem and started_here:  # a local Ray never grows: waiting would hang forever
        raise FinetuneError(problem + " (set finetune.num_workers / cpus_per_worker / use_gpu)")
    if problem:
        log.warning("%s; waiting for the autoscaler", problem)


def load_metrics(path: str | Path) -> list[dict]:
    """metrics.jsonl -> one record per step (the latest line wins: a resumed run redoes steps after its
    checkpoint)."""
    by_step: dict[int, dict] = {}
    p = Path(path)
    if p.is_file():
        for line in p.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


def plot_loss_curve(records: list[dict], png: str | Path, title: str = "fine-tuning") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    steps = [r["step"] for r in records if "loss" in r]
    ax.plot(steps, [r["loss"] for r in records if "loss" in r], label="train loss", color="tab:blue")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    dev = [(r["step"], r["dev_loss"]) for r in records if "dev_loss" in r]
    if dev:
        ax.plot(*zip(*dev), "o-", label="dev loss, calls disabled", color="tab:orange")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def publish_export(checkpoint_uri: str, target: str, metadata: dict) -> None:
    """Copy a checkpoint's hf/ folder (written by rank 0 when it saved) to `target`, plus finetune.json.
    Storage to storage: a server-side copy on S3, a file copy locally; the weights never pass through here."""
    source = f"{checkpoint_uri.rstrip('/')}/hf"
    meta = json.dumps(metadata, indent=1, default=str).encode()
    if _is_local(target):
        src, dest = Path(_local_abs(source)), Path(_local_abs(target))
        if not (src / "config.json").is_file():
            raise RuntimeError(f"{checkpoint_uri} has no hf/ export (a checkpoint of an older version?)")
        staging = dest.with_name(dest.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(src, staging)
        (staging / "finetune.json").write_bytes(meta)
        (staging / "finetune.json").chmod(0o644)
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
        return
    fs, src = _fs(source)
    _, dest = _fs(target)
    files = fs.find(src)
    if f"{src}/config.json" not in files:
        raise RuntimeError(f"{checkpoint_uri} has no hf/ export (a checkpoint of an older version?)")
    if fs.exists(dest):
        fs.rm(dest, recursive=True)
    for f in files:
        fs.copy(f, dest + f[len(src):])
    fs.pipe_file(f"{dest}/finetune.json", meta)


def run_finetune(cfg: Config) -> FinetuneResult:
    """Fine-tune `cfg.model` on the augmented corpus and export the best checkpoint (see the module doc)."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    t_start = time.time()
    ft = cfg.finetune
    if cfg.markers.special_tokens:
        raise FinetuneError("finetune does not support markers.special_tokens yet (plain-text markers only)")
    plan = batch_plan(ft.global_batch_size, ft.micro_batch_size, ft.num_workers)
    ds_config = deepspeed_config(ft.deepspeed_config, plan)

    from toolformer_ray.models import directory_revision, load_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir(cfg.model.path, cfg.model.cache_dir, cfg.model.tiny_seed).resolve()
    tokenizer = load_tokenizer(model_dir)
    data_uri = ft.data or f"{cfg.run.output.rstrip('/')}/{cfg.config_hash()}"
    if ft.data is None and not _fs(data_uri)[0].exists(_fs(data_uri)[1]):
        raise FinetuneError(f"no generate output for this config at {data_uri}: run `toolformer-ray generate` "
                            "first, or set finetune.data")
    markers = Markers.from_config(cfg.markers)
    data = prepare_data(read_documents(data_uri), tokenizer, markers=markers, max_length=ft.max_length,
                        original_text_ratio=ft.original_text_ratio, mask_tool_results=ft.mask_tool_results,
                        dev_fraction=ft.dev_fraction, dev_max_sequences=ft.dev_max_sequences, seed=cfg.run.seed)
    log.info("finetune data: %s", data.stats)

    output = _local_abs(ft.output) if _is_local(ft.output) else ft.output.rstrip("/")
    parts = fingerprint_parts(cfg, data, directory_revision(model_dir), ds_config, plan)
    fingerprint = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    resuming = _check_resumable(output, parts)
    fs, root = _fs(output)
    fs.makedirs(root, exist_ok=True)
    if not resuming:
        fs.pipe_file(f"{root}/run.json", json.dumps(
            {"fingerprint": parts, "fingerprint_hash": fingerprint, "data": data_uri, "model": str(model_dir),
             "data_stats": data.stats, "finetune": ft.model_dump(mode="json")}, indent=1).encode())

    # Logs are written where the controller runs (the driver's node); for s3:// they are staged in a
    # temporary folder and uploaded at the end.
    log_dir = Path(output) if _is_local(output) else Path(tempfile.mkdtemp(prefix="ft-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    if not resuming:  # a fresh run: the logs of an earlier, unfinished attempt do not belong to it
        (log_dir / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(log_dir / "tensorboard", ignore_errors=True)
    elif not _is_local(output) and fs.exists(f"{root}/metrics.jsonl"):
        fs.get(f"{root}/metrics.jsonl", str(log_dir / "metrics.jsonl"))

    # Probe for the export check: the start of the first dev row (else the first training row).
    source = data.dev if len(data.dev) else data.train
    probe_ids = source.input_ids[0, :min(PROBE_TOKENS, int(source.lengths[0]))].tolist()
    start_ids = tokenizer(markers.start, add_special_tokens=False).input_ids
    fail_at = os.environ.get(FAIL_AT_STEP_ENV)
    spec = TrainSpec(
        model_dir=str(model_dir), model_source=cfg.model.path, model_cache=str(Path(cfg.model.cache_dir).resolve()),
        model_revision=parts["model_revision"], tiny_seed=cfg.model.tiny_seed, ds_config=ds_config, plan=plan, lr=ft.lr,
        warmup_steps=warmup_steps_for(ft.max_steps, ft.warmup_ratio), lr_decay=ft.lr_decay,
        weight_decay=ft.weight_decay, max_steps=ft.max_steps, checkpoint_every=ft.checkpoint_every,
        log_every=ft.log_every, seed=cfg.run.seed, bf16=ft.bf16, gradient_checkpointing=ft.gradient_checkpointing,
        use_gpu=ft.use_gpu, cpus_per_worker=ft.cpus_per_worker, fingerprint=fingerprint,
        api_start_token=start_ids[0] if start_ids else None, probe_ids=probe_ids,
        export_dtype=ft.export_dtype,
        fail_at_step=int(fail_at) if fail_at else None)

    import ray
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.constants import is_v2_enabled

    if not is_v2_enabled():
        raise FinetuneError("finetune needs Ray Train V2: unset RAY_TRAIN_V2_ENABLED=0")
    started_ray = _ensure_ray(cfg)
    try:
        _check_resources(cfg, started_ray)
        env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
               "TRANSFORMERS_VERBOSITY": "error"}
        if not ft.use_gpu:
            env["DS_ACCELERATOR"] = "cpu"
        resources = {"CPU": ft.cpus_per_worker} | ({"GPU": 1} if ft.use_gpu else {})
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"spec": spec, "data": ray.put(data)},
            scaling_config=ray.train.ScalingConfig(num_workers=ft.num_workers, use_gpu=ft.use_gpu,
                                                   resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                name=CHECKPOINTS, storage_path=output,
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=ft.keep_checkpoints,
                    checkpoint_score_attribute="dev_ppl" if len(data.dev) else "step",
                    checkpoint_score_order="min" if len(data.dev) else "max"),
                failure_config=ray.train.FailureConfig(max_failures=ft.max_failures),
                callbacks=[_progress_logger_cls()(str(log_dir), ft.max_steps)],
                worker_runtime_env={"env_vars": env},
                logging_config=ray.train.LoggingConfig(log_level="WARNING")),
        )
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as e:
            raise RuntimeError(f"fine-tuning failed: {e}\nThe checkpoints in {output}/{CHECKPOINTS} are kept: "
                               "run the same command again to resume from the latest one.") from e
    finally:
        if started_ray:
            ray.shutdown()

    # The best checkpoint: lowest dev perplexity with calls disabled (the paper's criterion); else the last.
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if "step" in m]
    if not candidates:
        raise RuntimeError(f"the run reported no checkpoint under {output}/{CHECKPOINTS}")
    if len(data.dev):
        best, best_metrics = min(candidates, key=lambda cm: (cm[1]["dev_ppl"], -cm[1]["step"]))
    else:
        best, best_metrics = max(candidates, key=lambda cm: cm[1]["step"])
    records = load_metrics(log_dir / "metrics.jsonl")
    # Ray keeps only the keep_checkpoints best, so the last step may have left best_checkpoints: ask the log.
    last_step = max([m["step"] for _, m in candidates] + [r["step"] for r in records if "step" in r])
    this_run = [r for r in records if r.get("time", 0) >= t_start and "start_step" in r]
    resumed_from = this_run[0]["start_step"] if this_run and this_run[0]["start_step"] else (
        last_step if resuming and not this_run else None)
    png = log_dir / "loss_curve.png"
    if records:
        plot_loss_curve(records, png, title=f"fine-tuning {cfg.model.path} on {Path(data_uri).name}")

    best_uri = f"{output}/{CHECKPOINTS}/{Path(best.path).name}"
    model_uri = f"{output}/model"
    publish_export(best_uri, model_uri, metadata={
        "base_model": str(model_dir), "base_model_revision": parts["model_revision"], "checkpoint": best.path,
        "step": best_metrics["step"], "dev_ppl": best_metrics.get("dev_ppl"), "fingerprint": fingerprint,
        "data": data_uri, "export_dtype": ft.export_dtype, "finetune": ft.model_dump(mode="json")})
    diff = best_metrics.get("export_max_abs_diff")
    if not _is_local(output):
        for name in ("metrics.jsonl", "loss_curve.png"):
            if (log_dir / name).is_file():
                fs.put(str(log_dir / name), f"{root}/{name}")
        if (log_dir / "tensorboard").is_dir():
            fs.put(str(log_dir / "tensorboard") + "/", f"{root}/tensorboard/", recursive=True)
        shutil.rmtree(log_dir, ignore_errors=True)
    losses = [r["loss"] for r in records if "loss" in r]
    return FinetuneResult(
        output=output, model_dir=model_uri, steps=last_step, max_steps=ft.max_steps, resumed_from=resumed_from,
        best_step=int(best_metrics["step"]), best_checkpoint=best.path, best_dev_ppl=best_metrics.get("dev_ppl"),
        base_dev_ppl=next((r["dev_ppl"] for r in records if r["step"] == 0 and "dev_ppl" in r), None),
        first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
        export_max_abs_diff=diff, data_stats=data.stats, elapsed_s=time.time() - t_start,
        loss_curve=f"{output}/loss_curve.png" if records else None, tensorboard=f"{output}/tensorboard")
