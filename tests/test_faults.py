"""Faults inside a full `generate` on Ray (issue 17, items 9 and 13): a tool worker killed mid-batch, an LM
actor killed mid-batch, the S3 output endpoint stopped for longer than the retries, the tool pools'
driver thread dying. Each run ends (nothing waits forever), says what happened, and a resumed run gives
the same rows as an uninterrupted one."""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from toolformer_ray import cli
from toolformer_ray.datajob import run, stages
from toolformer_ray.config import ToolConfig
from toolformer_ray.datajob.run import run_generate
from toolformer_ray.tools import REGISTRY
from toolformer_ray.tools.calculator import Calculator
from toolformer_ray.tools.executor import RayToolExecutor

from caller_model import caller_model_dir, corpus_records
from test_generate import make_cfg, tables, write_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def caller():
    return str(caller_model_dir())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    for k in range(3):
        write_jsonl(d / f"part-{k}.jsonl", corpus_records(4, seed=40 + k, prefix=f"f{k}"))
    return d


@pytest.fixture(scope="module")
def reference(caller, corpus, tmp_path_factory, ray_local):
    summary = run_generate(make_cfg(caller, corpus, tmp_path_factory.mktemp("ref")), use_ray=True, progress=False)
    assert summary.ok and summary.shards_done == 3
    t = tables(summary.output)
    assert len(t["calls"]) > 0  # the comparison below means something
    return t


def assert_same_rows(expected: dict, got: dict) -> None:
    for name in ("calls", "documents", "quarantine"):
        drop = ["model"] if name == "calls" else []
        pd.testing.assert_frame_equal(expected[name].drop(columns=drop), got[name].drop(columns=drop), atol=1e-5)


def last_run(summary) -> dict:
    return json.loads(Path(summary.manifest).read_text())["runs"][-1]


class KillOnceCalculator(Calculator):
    """The real Calculator, whose worker process kills itself in the middle of its first batch."""
    marker = ""  # set by the test; shipped with the class

    def run(self, inputs, dates=None):
        if not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().run(inputs, dates)


def test_tool_worker_killed_mid_batch(caller, corpus, tmp_path, reference, monkeypatch):
    monkeypatch.setattr(KillOnceCalculator, "marker", str(tmp_path / "killed"))
    monkeypatch.setitem(REGISTRY, "Calculator", KillOnceCalculator)
    summary = run_generate(make_cfg(caller, corpus, tmp_path / "out"), use_ray=True, progress=False)
    assert (tmp_path / "killed").exists(), "the worker was never killed"
    assert summary.ok and summary.shards_done == 3
    stats = last_run(summary)["tool_stats"]["Calculator"]
    assert stats["worker_restarts"] >= 1 and stats["retries"] >= 1 and stats["failures"] == 0
    assert_same_rows(reference, tables(summary.output))


def test_lm_actor_killed_mid_batch(caller, corpus, tmp_path, reference, monkeypatch, ray_local):
    killed = {}
    real_init = stages.RayBackend.__init__

    def init(self, cfg, model_dir):
        real_init(self, cfg, model_dir)
        pid = ray_local.get(self.actors[0].__ray_call__.remote(lambda actor: os.getpid()))

        def killer():  # SIGKILL the actor once it has a batch in hand
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not any(self.load.values()):
                time.sleep(0.005)
            time.sleep(0.05)
            killed["in_flight"] = sum(self.load.values())
            os.kill(pid, signal.SIGKILL)
            killed["pid"] = pid

        threading.Thread(target=killer, daemon=True).start()

    monkeypatch.setattr(stages.RayBackend, "__init__", init)
    summary = run_generate(make_cfg(caller, corpus, tmp_path / "out"), use_ray=True, progress=False)
    assert killed.get("in_flight", 0) > 0, killed
    with pytest.raises(ProcessLookupError):
        os.kill(killed["pid"], 0)  # really gone: Ray restarted the actor and retried its task
    assert summary.ok and summary.shards_done == 3
    assert_same_rows(reference, tables(summary.output))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_s3_outage_longer_than_retries(caller, corpus, tmp_path, reference, monkeypatch, capsys):
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()  # no client of another test's endpoint
    boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket="outage")
    real_commit = run.commit_shard
    commits = []

    def commit_then_outage(*args, **kw):
        kept = real_commit(*args, **kw)
        commits.append(kept)
        if len(commits) == 1:
            server.stop()  # down for the rest of the run: every later write exhausts its retries
        return kept

    monkeypatch.setattr(run, "commit_shard", commit_then_outage)
    cfg = make_cfg(caller, corpus, "s3://outage/runs")
    argv = ["toolformer-ray", "generate", "-i", str(corpus), "-o", "s3://outage/runs"]
    for key in ("model.path", "model.dtype", "model.cache_dir", "ray.docs_per_task", "ray.torch_threads",
                "sampling.max_call_tokens"):
        section, name = key.split(".")
        argv += ["-s", f"{key}={getattr(getattr(cfg, section), name)}"]
    argv += ["-s", "tools={Calculator: {k: 3, m: 3, tau_f: -0.5, workers: 1, worker_cpus: 0.25}}",
             "-s", "ray.lm_actor_cpus=0.5"]
    monkeypatch.setattr(sys, "argv", argv)
    try:
        with pytest.raises(SystemExit) as e:
            cli.main()
        out, err = capsys.readouterr()
        assert e.value.code == 1, err
        assert "1 shard(s) processed" in out and "2 failed" in out and "EndpointConnectionError" in out
        assert "manifest/report not written" in out and "run the same command again" in err
        # the endpoint back, the same command finishes the two failed shards
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        monkeypatch.setattr(run, "commit_shard", real_commit)
        with pytest.raises(SystemExit) as e:
            cli.main()
        out, err = capsys.readouterr()
        assert e.value.code == 0, err
        assert "2 shard(s) processed, 1 already done, 0 failed" in out
        fs = s3fs.S3FileSystem()
        version = out.split("output:", 1)[1].split()[0][len("s3://"):]
        fs.get(version, str(tmp_path / "copy"), recursive=True)
        assert_same_rows(reference, tables(str(tmp_path / "copy")))
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()


def test_dead_pool_driver_thread_fails_calls_instead_of_hanging(ray_local, monkeypatch):
    ex = RayToolExecutor({"Calculator": ToolConfig(workers=1, worker_cpus=0.25)})
    try:
        assert ex.run("Calculator", ["1+1"]) == ["2"]

        def broken(ref):
            raise RuntimeError("driver bug")

        monkeypatch.setattr(ex, "_complete", broken)
        pending = ex.submit("Calculator", ["2+2", "3+3"])
        assert pending.get(timeout=30) == [None, None]  # resolved as failures, not left waiting
        assert ex.run("Calculator", ["4+4"]) == [None]  # later calls fail at once
        assert "driver thread died: RuntimeError: driver bug" in ex.pool_errors()["Calculator"]
        assert ex.stats()["Calculator"]["failures"] == 3
    finally:
        ex.shutdown()
