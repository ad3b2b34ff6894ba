"""What makes a run resumable, and what makes a checkpoint safe to load.

run.json in the output folder records the run's fingerprint (data digest, model revision,
hyper-parameters): a folder holding another fingerprint is refused, never silently mixed.
DeepSpeed unpickles its shards, which can run code, so verify_checkpoint checks the plain-JSON
state.json (this run's fingerprint), `latest` and the files' owners before anything is loaded;
resuming from a folder still means trusting whoever can write to it (docs/finetune.md).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import fsspec

from toolformer_ray.config import Config
from toolformer_ray.finetune.data import BatchPlan, FinetuneData, FinetuneError
from toolformer_ray.finetune.ds_config import warmup_steps_for

CHECKPOINTS = "checkpoints"  # Ray Train run name: <output>/checkpoints/step_000010/


def url_fs(uri: str):
    """(fsspec file system, path without a trailing slash) of a local path or URI."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path.rstrip("/")


def fingerprint_parts(cfg: Config, data: FinetuneData, model_revision: str, ds_config: dict,
                      plan: BatchPlan) -> dict:
    """What must not change for a run to be resumed: the data rows, the model, the optimisation
    settings."""
    ft = cfg.finetune
    return {
        "data": data.digest(), "model_revision": model_revision, "deepspeed": ds_config,
        "global_batch_size": plan.global_batch, "micro_batch_size": plan.micro,
        "num_workers": plan.workers, "lr": ft.lr,
        "warmup_steps": warmup_steps_for(ft.max_steps, ft.warmup_ratio), "lr_decay": ft.lr_decay,
        "weight_decay": ft.weight_decay, "max_steps": ft.max_steps, "seed": cfg.run.seed,
        "bf16": ft.bf16,
    }


def fingerprint_hash(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _check_resumable(output: str, parts: dict) -> bool:
    """True when `output` holds a compatible earlier run (to resume), False when it holds none."""
    fs, root = url_fs(output)
    run_file = f"{root}/run.json"
    if not fs.exists(f"{root}/{CHECKPOINTS}/checkpoint_manager_snapshot.json"):
        return False  # nothing to resume (an earlier attempt, if any, never reached a checkpoint)
    if not fs.exists(run_file):
        raise FinetuneError(f"{output} holds checkpoints but no run.json: "
                            "use another finetune.output")
    old = json.loads(fs.cat_file(run_file)).get("fingerprint", {})
    changed = [f"{k}: {old.get(k)!r} -> {parts.get(k)!r}" for k in sorted(set(old) | set(parts))
               if old.get(k) != parts.get(k) and k != "deepspeed"]
    if old.get("deepspeed") != parts.get("deepspeed"):
        changed.append("deepspeed config")
    if changed:
        raise FinetuneError(f"{output} holds a fine-tuning run with other settings "
                            f"({'; '.join(changed)}); resuming needs the same ones: use another "
                            "finetune.output, or delete the old run")
    return True


def verify_checkpoint(ckpt_dir: str | Path, fingerprint: str) -> int:
    """Refuse a checkpoint before any of it is unpickled, and return its step.

    DeepSpeed loads its shards with torch.load(weights_only=False), which runs whatever code a file
    names, so loading means trusting the folder. What can be checked first, from plain files:
    state.json (JSON) names this run's fingerprint, `latest` names that step's tag (DeepSpeed joins
    it into a path), and no file or folder is a link, writable by other users, or owned by a user
    other than this one (or root). This stops a checkpoint of another run and a tampered shared
    folder; it cannot stop someone who can write as this user (docs/finetune.md: resuming from a
    folder means trusting it)."""
    root = Path(ckpt_dir)
    me = os.getuid()
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        problem = ("a symbolic link" if path.is_symlink() else
                   f"owned by uid {st.st_uid}" if st.st_uid not in (me, 0) else
                   "world-writable" if st.st_mode & 0o002 else None)
        if problem:
            raise FinetuneError(f"checkpoint {root}: {path.relative_to(root)} is {problem}; "
                                "refusing to unpickle it (resuming from a folder means "
                                "trusting it)")
    try:
        state = json.loads((root / "state.json").read_text())
        step = int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FinetuneError(f"checkpoint {root}: no readable state.json ({e}); "
                            "refusing to load it") from None
    if state.get("fingerprint") != fingerprint:
        raise FinetuneError(f"checkpoint {root} belongs to another run (fingerprint "
                            f"{state.get('fingerprint')!r}, this run {fingerprint!r}); "
                            "refusing to load it")
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    if latest != f"step{step}":
        raise FinetuneError(f"checkpoint {root}: 'latest' names {latest!r}, state.json step {step}")
    return step


def load_checkpoint_checked(engine, ckpt_dir: str | Path, fingerprint: str) -> int:
    """verify_checkpoint, then DeepSpeed's load (weights, optimizer, lr schedule); returns the
    step."""
    step = verify_checkpoint(ckpt_dir, fingerprint)
    loaded, client = engine.load_checkpoint(str(ckpt_dir))
    if loaded is None:
        raise RuntimeError(f"could not load the DeepSpeed checkpoint in {ckpt_dir}")
    if client.get("fingerprint") != fingerprint or int(client["step"]) != step:
        raise RuntimeError(f"checkpoint {ckpt_dir}: its DeepSpeed client state disagrees with "
                           "state.json")
    return step
