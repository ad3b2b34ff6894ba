"""The nightly evaluation asks Ray for a GPU when `nightly.eval_gpus` says so (issue 14, item 2's last part):
a local Ray with one GPU in its resource accounting (no CUDA needed) shows which GPU the task was given."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import ray
from ray import cloudpickle  # Ray's own copy, which pickles remote functions

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # jobs/ is a top-level folder

from jobs import nightly  # noqa: E402
from toolformer_ray.config import load_config  # noqa: E402

pytestmark = pytest.mark.slow


def gpus_given(storage_env, cfg, models):
    """Stands in for the eval task's body: what Ray assigned to the task."""
    return {"gpus": [int(g) for g in ray.get_gpu_ids()], "models": models}


def test_nightly_eval_asks_ray_for_a_gpu_when_configured(monkeypatch):
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import tests/
    monkeypatch.setattr(nightly, "_evaluate_remote", gpus_given)
    ray.init(address="local", num_cpus=1, num_gpus=1, include_dashboard=False)
    try:
        on_gpu = load_config(None, ["nightly.eval_gpus=1", "nightly.eval_cpus=1"])
        assert nightly._evaluate_where_it_fits(on_gpu, ["m"]) == {"gpus": [0], "models": ["m"]}
        on_cpu = load_config(None, ["nightly.eval_cpus=1"])  # the default: no GPU
        assert nightly._evaluate_where_it_fits(on_cpu, ["m"]) == {"gpus": [], "models": ["m"]}
    finally:
        ray.shutdown()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
