"""The optimisation settings: the DeepSpeed JSON (batch sizes filled in from the finetune config),
the lr schedule AdamW follows, and whether bf16 is worth using on this hardware."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from toolformer_ray.finetune.data import BatchPlan, FinetuneError

_REPO_ROOT = Path(__file__).resolve().parents[2]


def lr_factor(step: int, warmup_steps: int, max_steps: int, decay: str = "none") -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warm-up, then constant
    (the paper), linear or cosine decay to 0 at max_steps."""
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


def resolve_path(path: str) -> Path:
    """A config-relative file: as given (from the working directory), else inside the repository."""
    for candidate in (Path(path).expanduser(), _REPO_ROOT / path):
        if candidate.is_file():
            return candidate.resolve()
    raise FinetuneError(f"DeepSpeed config not found: {path}")


def deepspeed_config(path: str, plan: BatchPlan) -> dict:
    """The DeepSpeed JSON with the batch sizes filled in from the finetune config ("auto" or equal
    values). The optimizer and lr schedule come from the finetune config, so the JSON must not
    define them."""
    file = resolve_path(path)
    try:
        ds = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise FinetuneError(f"{file}: not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise FinetuneError(f"{file}: the top level must be an object")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise FinetuneError(f"{file}: remove '{key}': the optimizer (AdamW) and lr schedule "
                                "are set by finetune.lr, warmup_ratio, lr_decay and weight_decay")
    stage = (ds.get("zero_optimization") or {}).get("stage")
    if stage not in (2, 3):
        raise FinetuneError(f"{file}: zero_optimization.stage must be 2 or 3 (got {stage!r})")
    wanted = {"train_batch_size": plan.global_batch, "train_micro_batch_size_per_gpu": plan.micro,
              "gradient_accumulation_steps": plan.accumulation}
    for key, value in wanted.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise FinetuneError(f"{file}: {key} is {ds[key]} but the finetune config gives "
                                f'{value}; set it to "auto" (batch sizes come from '
                                "finetune.global_batch_size etc.)")
        ds[key] = value
    bf16 = ds.get("bf16")
    if bf16 is not None and not isinstance(bf16, dict):
        raise FinetuneError(f"{file}: 'bf16' must be an object")
    ds.pop("bf16", None)  # decided by finetune.bf16 on the workers (hardware dependent)
    if (ds.get("fp16") or {}).get("enabled") is True:
        raise FinetuneError(f"{file}: fp16 is not supported; use finetune.bf16")
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise FinetuneError(f"{file}: 'auto' is only understood for batch sizes and bf16, "
                            f"not for {leftover}")
    return ds


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def bf16_supported(use_gpu: bool) -> bool:
    if use_gpu:
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    # AVX512-BF16 / AMX: fast bf16 matmuls on the CPU
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
