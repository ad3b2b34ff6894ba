"""The Hugging Face export: every checkpoint carries hf/ (the weights gathered to rank 0, written as
a plain Hugging Face folder and checked against the engine's own probe logits); the run's result is
a storage-to-storage copy of the best checkpoint's hf/ to <output>/model."""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
from transformers.integrations import deepspeed as hf_ds

from toolformer_ray.finetune.resume import url_fs
from toolformer_ray.fsutil import is_local, local_abs
from toolformer_ray.models import load_tokenizer

PROBE_TOKENS = 16


def probe_logits(engine, probe_ids: list[int], device):
    engine.eval()
    with torch.no_grad():
        ids = torch.tensor([probe_ids], dtype=torch.long, device=device)
        logits = engine(input_ids=ids, use_cache=False).logits[0].float().cpu()
    engine.train()
    return logits


def gathered_state_dict(engine, zero_stage: int, rank: int):
    """The engine's full weights on rank 0 (CPU tensors), None on the other ranks. Every rank must
    call it: under ZeRO-3 the parameters are gathered one module at a time (collectives), so no rank
    ever holds the whole model on its device; the copy builds up in rank 0's host memory."""
    if zero_stage == 3:
        # DeepSpeed's own gather (what save_16bit_model and HF Trainer use), without a .bin file
        return engine._zero3_consolidated_16bit_state_dict()
    if rank != 0:
        return None
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


@contextlib.contextmanager
def _hf_zero3_detached():
    """transformers builds every model under zero.Init (a collective) while an HfDeepSpeedConfig is
    alive; loading the exported folder on rank 0 alone must not."""
    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def write_hf_export(state_dict: dict, model, base_model_dir: str | Path, out_dir: Path, dtype: str,
                    probe: dict | None = None, compute_dtype: str = "float32") -> float | None:
    """A plain Hugging Face folder (safetensors, config, generation config, tokenizer) from gathered
    weights, loaded back to check it: the largest |logit difference| against the engine's own probe
    logits."""
    base_model_dir = Path(base_model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    cast = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.save_pretrained(out_dir, state_dict=cast, safe_serialization=True)
    config = AutoConfig.from_pretrained(base_model_dir)  # the base's (use_cache on; training: off)
    config.dtype = dtype
    config.save_pretrained(out_dir)
    if (base_model_dir / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(base_model_dir).save_pretrained(out_dir)
    load_tokenizer(base_model_dir).save_pretrained(out_dir)
    for f in out_dir.iterdir():  # save_pretrained leaves them 0600; serving may be another user
        f.chmod(0o644)
    del cast
    if probe is None:
        return None
    with _hf_zero3_detached():
        exported = AutoModelForCausalLM.from_pretrained(
            out_dir, dtype=getattr(torch, compute_dtype), use_safetensors=True)
    exported.eval()
    with torch.no_grad():
        logits = exported(input_ids=probe["input_ids"][None].long()).logits[0].float()
    return float((logits - probe["logits"]).abs().max())


def publish_export(checkpoint_uri: str, target: str, metadata: dict) -> None:
    """Copy a checkpoint's hf/ folder (written by rank 0 when it saved) to `target`, plus
    finetune.json. Storage to storage: a server-side copy on S3, a file copy locally; the weights
    never pass through here."""
    source = f"{checkpoint_uri.rstrip('/')}/hf"
    meta = json.dumps(metadata, indent=1, default=str).encode()
    missing = f"{checkpoint_uri} has no hf/ export (a checkpoint of an older version?)"
    if is_local(target):
        src = Path(local_abs(source))
        dest = Path(local_abs(target))
        if not (src / "config.json").is_file():
            raise RuntimeError(missing)
        staging = dest.with_name(dest.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(src, staging)
        (staging / "finetune.json").write_bytes(meta)
        (staging / "finetune.json").chmod(0o644)
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
        return
    fs, src = url_fs(source)
    _, dest = url_fs(target)
    files = fs.find(src)
    if f"{src}/config.json" not in files:
        raise RuntimeError(missing)
    if fs.exists(dest):
        fs.rm(dest, recursive=True)
    for f in files:
        fs.copy(f, dest + f[len(src):])
    fs.pipe_file(f"{dest}/finetune.json", meta)
