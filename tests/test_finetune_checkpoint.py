"""A checkpoint is checked before DeepSpeed unpickles any of it (issue 17, item 8).

DeepSpeed loads its shards with torch.load(weights_only=False): a pickle runs the code it names. The shard
here is a real torch.save file whose unpickling touches a marker file; the loader is DeepSpeed's own
TorchCheckpointEngine, as in engine.load_checkpoint. A checkpoint of another run, a `latest` that points
elsewhere, a world-writable file or a link must be refused with the marker still absent.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from toolformer_ray.finetune import FinetuneError, load_checkpoint_checked, verify_checkpoint

FINGERPRINT = "0123456789abcdef"


class Payload:
    """Unpickling this creates `marker`: a stand-in for arbitrary code in a tampered shard."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


class DeepSpeedLikeEngine:
    """engine.load_checkpoint as DeepSpeed does it: read `latest`, torch.load the tag's shard unrestricted."""

    def load_checkpoint(self, load_dir: str):
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        tag = Path(load_dir, "latest").read_text().strip()
        state = TorchCheckpointEngine().load(str(Path(load_dir, tag, "mp_rank_00_model_states.pt")))
        return load_dir, {k: v for k, v in state.items() if k in ("step", "fingerprint")}


def make_checkpoint(root: Path, marker: Path, fingerprint: str = FINGERPRINT, step: int = 4) -> Path:
    ckpt = root / f"step_{step:06d}"
    (ckpt / f"step{step}").mkdir(parents=True)
    torch.save({"step": step, "fingerprint": FINGERPRINT, "module": Payload(marker)},
               ckpt / f"step{step}" / "mp_rank_00_model_states.pt")
    (ckpt / "latest").write_text(f"step{step}")
    (ckpt / "state.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint}))
    for p in [ckpt, *ckpt.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return ckpt


def test_a_checkpoint_of_this_run_loads(tmp_path):
    marker = tmp_path / "unpickled"
    ckpt = make_checkpoint(tmp_path, marker)
    assert load_checkpoint_checked(DeepSpeedLikeEngine(), ckpt, FINGERPRINT) == 4
    assert marker.exists()  # the loader really unpickles: the refusals below are meaningful


def test_another_runs_checkpoint_is_refused_before_unpickling(tmp_path):
    marker = tmp_path / "unpickled"
    ckpt = make_checkpoint(tmp_path, marker, fingerprint="ffffffffffffffff")
    with pytest.raises(FinetuneError, match="belongs to another run"):
        load_checkpoint_checked(DeepSpeedLikeEngine(), ckpt, FINGERPRINT)
    assert not marker.exists()


def test_missing_state_is_refused_before_unpickling(tmp_path):
    marker = tmp_path / "unpickled"
    ckpt = make_checkpoint(tmp_path, marker)
    (ckpt / "state.json").unlink()
    with pytest.raises(FinetuneError, match="no readable state.json"):
        load_checkpoint_checked(DeepSpeedLikeEngine(), ckpt, FINGERPRINT)
    assert not marker.exists()


def test_latest_pointing_elsewhere_is_refused(tmp_path):
    marker = tmp_path / "unpickled"
    ckpt = make_checkpoint(tmp_path, marker)
    (ckpt / "latest").write_text("../step_000004/step4")
    with pytest.raises(FinetuneError, match="'latest' names"):
        load_checkpoint_checked(DeepSpeedLikeEngine(), ckpt, FINGERPRINT)
    assert not marker.exists()


@pytest.mark.parametrize("what", ["world-writable shard", "world-writable folder", "symlinked shard"])
def test_a_folder_others_could_have_changed_is_refused(tmp_path, what):
    marker = tmp_path / "unpickled"
    ckpt = make_checkpoint(tmp_path, marker)
    shard = ckpt / "step4" / "mp_rank_00_model_states.pt"
    if what == "world-writable shard":
        shard.chmod(0o666)
    elif what == "world-writable folder":
        (ckpt / "step4").chmod(0o777)
    else:
        elsewhere = tmp_path / "elsewhere.pt"
        shard.rename(elsewhere)
        shard.symlink_to(elsewhere)
    with pytest.raises(FinetuneError, match="world-writable|symbolic link"):
        verify_checkpoint(ckpt, FINGERPRINT)
    with pytest.raises(FinetuneError):
        load_checkpoint_checked(DeepSpeedLikeEngine(), ckpt, FINGERPRINT)
    assert not marker.exists()
