"""benchmarks/gpu_check.py cannot rot: its CPU toy mode runs here, as the GPU machine would run it
(no Ray, no DeepSpeed importable; nothing beyond the Ray-free core of the package imported)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = """
import runpy, sys
sys.modules["ray"] = sys.modules["deepspeed"] = None  # the GPU machine has neither
sys.argv = ["gpu_check.py", "--device", "cpu", "--quick", "--out", sys.argv[1]]
runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")
heavy = [m for m in ("toolformer_ray.config", "toolformer_ray.tools", "pydantic", "pyarrow")
         if m in sys.modules]
assert not heavy, heavy
"""


@pytest.mark.slow
def test_gpu_check_quick_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "-c", RUN, str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["exact_fp32_ok"] is True and r["seconds"] < r["budget_s"]
    m = r["models"]["toy"]
    assert m["attention"]["mode"] == "fast" and m["kernels"] == ["cpu-flash"]
    e = m["exactness_fp32"]
    assert max(e["p_i_max_abs_log_diff"], e["marker_max_abs_log_diff"],
               e["loss_max_abs_diff"]) < 1e-4
    t, d = m["throughput"], m["decoding"]
    assert t["docs_per_s"] > 0 and t["tokens_per_s"] > 0 and 0 < t["floor_over_ours"]
    assert all(v > 0 for v in t["needed_tokens"].values())
    assert d["kv_tokens_per_s"] > 0 and d["reencode_tokens_per_s"] > 0
    assert "sample+score" in proc.stdout and "tool-aware decoding" in proc.stdout
