"""Where models run: "auto" takes the GPU when there is one; a GPU asked for without CUDA is one
clear error naming the node, never a silent CPU run (this machine has no CUDA: that is what is
tested here). And a model resolved on a node is checked against the driver's revision."""
from __future__ import annotations

import pytest
import torch

from toolformer_ray.config import load_config
from toolformer_ray.models import ModelError, pick_device
from toolformer_ray.tools.mt import MT
from toolformer_ray.tools.qa import QA

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")


def test_auto_is_cpu_without_cuda_and_cuda_is_an_error():
    assert pick_device("auto") == "cpu" and pick_device("cpu") == "cpu"
    with pytest.raises(ModelError,
                       match=r"device 'cuda' asked for but CUDA is not available on \S+"):
        pick_device("cuda")


def test_infer_eval_and_tools_take_a_device():
    from toolformer_ray.config import ConfigError
    from toolformer_ray.inference import decoder_from_config

    cfg = load_config(None, ["model.path=tiny", "inference.device=cuda"])
    with pytest.raises(ModelError, match="CUDA is not available"):
        decoder_from_config(cfg)
    assert decoder_from_config(load_config(None, ["model.path=tiny"])).model.device.type == "cpu"
    with pytest.raises(ConfigError, match="inference.device"):
        load_config(None, ["inference.device=gpu"])
    with pytest.raises(ModelError, match="CUDA is not available"):
        QA({"model": "tiny", "device": "cuda"}).load()
    mt = MT({"model": "tiny", "device": "cuda"})
    with pytest.raises(ModelError, match="CUDA is not available"):
        mt.load()


def test_node_resolution_checks_the_revision_reuses_unchanged_download(tmp_path, monkeypatch):
    import shutil

    from caller_model import caller_model_dir
    from toolformer_ray.models import NODE_CACHE_ENV, directory_revision, resolve_on_node

    src = tmp_path / "store" / "caller"
    shutil.copytree(caller_model_dir(), src)
    (src / "revision.json").unlink()  # as a user's folder: no stamp of ours
    uri = f"file://{src}"
    monkeypatch.setenv(NODE_CACHE_ENV, str(tmp_path / "node"))  # the node's cache wins
    first = resolve_on_node(uri, tmp_path / "configured", revision=None)
    assert first.parent == tmp_path / "node" and not (tmp_path / "configured").exists()
    rev = directory_revision(first)
    stamp = (first / "revision.json").stat().st_mtime_ns
    assert resolve_on_node(uri, None, revision=rev) == first
    assert (first / "revision.json").stat().st_mtime_ns == stamp  # reused, not downloaded again
    with pytest.raises(ModelError, match=r"on node \S+.*differs from the driver's \(revision"):
        resolve_on_node(uri, None, revision="0" * 16)
    (src / "config.json").write_text((src / "config.json").read_text() + " ")  # the folder changed
    assert directory_revision(resolve_on_node(uri, None)) != rev
