"""`ray job submit` for real: a Ray head started with `ray start --head` (token auth on, dashboard on
127.0.0.1), the generate job and then the nightly job submitted with the `ray` CLI exactly as a laptop would
(--working-dir, --runtime-env-json from `python -m jobs.runtime_env`), on tiny data with the tiny caller
model. Inputs, outputs and the nightly state are on S3 (moto). The S3 credentials are the node's own (its
environment, as a Kubernetes Secret would give it); the runtime env from the submitter's shell carries only
the endpoint. The secret key is a canary: no file under the head's temp dir may contain it afterwards.

The head is stopped by SIGTERM to its own `ray start --block` process (which shuts its node down), then any
process left whose command line names this head's temp dir is killed by pid: `ray stop` would stop every
Ray on the machine, including other people's.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

from caller_model import caller_model_dir, corpus_records

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Head:
    address: str  # http://127.0.0.1:PORT, the dashboard / job server
    env: dict[str, str]  # a client environment that authenticates (RAY_AUTH_MODE=token + RAY_AUTH_TOKEN)
    temp_dir: str


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `python` in an entrypoint = this venv's
    return env


CANARY = f"canary-{uuid.uuid4().hex}"  # made at run time: this file is in the uploaded working dir


@pytest.fixture(scope="module")
def ray_head(s3_server):
    temp_dir = tempfile.mkdtemp(prefix="trh-", dir="/tmp")  # short: Ray's unix sockets live under it
    dash = _free_port()
    token = uuid.uuid4().hex
    # No drain on SIGTERM: a test head has no work worth waiting 30 s for.
    env = {**_base_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    # the node's own credentials (moto takes any key); the job gets them from here, never a runtime env
    node_env = {**env, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": CANARY,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_server}
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(_free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
           "--dashboard-agent-grpc-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
           "--runtime-env-agent-port", str(_free_port()), "--num-cpus", "2", "--temp-dir", temp_dir,
           "--disable-usage-stats"]
    log = open(Path(temp_dir) / "ray-start.log", "wb")
    proc = subprocess.Popen(cmd, env=node_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError("ray start exited:\n" + (Path(temp_dir) / "ray-start.log").read_text()[-3000:])
            try:
                req = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
                urllib.request.urlopen(req, timeout=2).read()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(1)
        yield Head(address, env, temp_dir)
    finally:
        proc.terminate()  # `ray start --block` drains and stops its node on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        time.sleep(1)
        for p in psutil.process_iter(["pid", "cmdline"]):  # stragglers of this head only
            try:
                if temp_dir in " ".join(p.info["cmdline"] or []):
                    p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(head: Head, runtime_env_json: str, module: str, config: Path, timeout: float = 600) -> str:
    """`ray job submit ... -- python -m <module> --config <config>`; returns the job's log, fails on error."""
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head.address, "--working-dir", str(ROOT),
           "--runtime-env-json", runtime_env_json, "--", "python", "-m", module, "--config", str(config)]
    r = subprocess.run(cmd, env=head.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{module} failed:\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def put_corpus(fs, uri: str, name: str, records: list[dict]) -> None:
    with fs.open(f"{uri}/{name}", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))


def test_client_without_the_token_is_refused(ray_head):
    r = subprocess.run([str(BIN / "ray"), "job", "list", "--address", ray_head.address], env=_base_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Authentication required" in r.stdout + r.stderr


def test_submit_generate_then_nightly(ray_head, s3_endpoint, tmp_path, monkeypatch):
    fs = s3_endpoint.fs()
    corpus = s3_endpoint.uri("corpus")
    for k in range(2):
        put_corpus(fs, corpus, f"part-{k}.jsonl", corpus_records(6, seed=30 + k, prefix=f"j{k}"))
    cfg = {
        "run": {"name": "jobs-test", "output": s3_endpoint.uri("runs")},
        "model": {"path": str(caller_model_dir().resolve()), "dtype": "float32",
                  "cache_dir": str(ROOT / ".cache/models")},
        "corpus": {"input": corpus},
        "tools": {"Calculator": {"k": 3, "m": 3, "tau_f": -0.5, "workers": 1, "worker_cpus": 0.25}},
        "sampling": {"max_call_tokens": 16},
        "ray": {"lm_actor_cpus": 0.5, "torch_threads": 1, "docs_per_task": 4},
        # relative paths resolve in the job's working directory (the uploaded checkout)
        "finetune": {"deepspeed_config": "configs/ds_zero2.json", "num_workers": 1, "cpus_per_worker": 1,
                     "max_length": 32, "global_batch_size": 2, "micro_batch_size": 1, "max_steps": 2,
                     "checkpoint_every": 2, "dev_fraction": 0.2, "bf16": False, "lr": 1e-3},
        "inference": {"torch_threads": 1},
        "eval": {"tasks": ["math"], "data": {"math": "tests/fixtures/eval/asdiv.jsonl"}, "limit": 2,
                 "modes": ["tools", "disabled"], "max_new_tokens": 8},
        "nightly": {"min_new_calls": 1, "lease_ttl_s": 60},
    }
    config = tmp_path / "jobs-test.yaml"
    config.write_text(yaml.safe_dump(cfg))
    # the documented laptop command: --runtime-env-json "$(python -m jobs.runtime_env)"
    client_env = {**ray_head.env, **s3_endpoint.env}
    env_json = subprocess.run([sys.executable, "-m", "jobs.runtime_env"], env=client_env, cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout
    assert json.loads(env_json)["env_vars"]["AWS_ENDPOINT_URL"] == s3_endpoint.url
    assert "AWS_SECRET_ACCESS_KEY" not in json.loads(env_json)["env_vars"]

    t0 = time.time()
    out = submit(ray_head, env_json, "jobs.generate", config)
    t_generate = time.time() - t0
    assert "generate: 2 shard(s) processed" in out, out[-3000:]
    from toolformer_ray.config import load_config

    version = f"{s3_endpoint.bucket}/runs/{load_config(config).config_hash()}"
    assert len(fs.ls(f"{version}/_committed")) == 2
    manifest = json.loads(fs.cat(f"{version}/manifest.json"))
    kept = manifest["funnel"]["Calculator"]["kept_after_cap"]
    assert kept > 0

    # a new file under the prefix: the nightly job generates only it, then fine-tunes and evaluates
    put_corpus(fs, corpus, "part-2.jsonl", corpus_records(6, seed=32, prefix="j2"))
    t0 = time.time()
    out = submit(ray_head, env_json, "jobs.nightly", config)
    t_nightly = time.time() - t0
    assert "nightly ok" in out and "1 new shard(s), 2 already done" in out, out[-4000:]
    state = f"{s3_endpoint.bucket}/runs/nightly"
    summary = json.loads(fs.cat(f"{state}/state.json"))
    (rnd,) = summary["rounds"]
    plan = json.loads(fs.cat(f"{state}/rounds/{rnd['round']}/plan.json"))
    assert len(plan["units"]) == 3 and plan["calls"] == sum(plan["units"].values()) >= kept
    model = summary["model"]
    assert model.startswith("s3://") and model == rnd["model"]
    assert {"config.json", "model.safetensors"} <= {p.rsplit("/", 1)[-1] for p in fs.ls(model)}
    finetuned = json.loads(fs.cat(f"{state}/rounds/{rnd['round']}/finetuned.json"))
    assert finetuned["steps"] == 2 and finetuned["export_max_abs_diff"] is not None
    results = json.loads(fs.cat(f"{state}/rounds/{rnd['round']}/eval/results.json"))
    assert {(r["model"], r["mode"]) for r in results["rows"]} == {
        ("model", "tools"), ("model", "disabled"), (Path(cfg["model"]["path"]).name, "tools"),
        (Path(cfg["model"]["path"]).name, "disabled")}
    (night_log,) = [json.loads(fs.cat(p)) for p in fs.ls(f"{state}/nights")]
    assert night_log["status"] == "ok" and night_log["round"] == rnd["round"]

    # the same night again (a retry after success): nothing new to generate, nothing to fine-tune
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.syspath_prepend(str(ROOT))
    from jobs.nightly import run_nightly

    again = run_nightly(load_config(config))
    assert again.status == "ok" and again.generate["shards_done"] == 0 and again.finetune is None
    assert again.pending_calls == 0 and not again.evaluations and again.model == model
    print(f"\ngenerate job {t_generate:.0f} s, nightly job {t_nightly:.0f} s")
    # the canary secret was used by every job (S3 throughout) but written nowhere on the node
    hits = [str(p) for p in Path(ray_head.temp_dir).rglob("*") if p.is_file() and not p.is_symlink()
            and CANARY.encode() in p.read_bytes()]
    assert not hits and any(Path(ray_head.temp_dir).rglob("runtime_env_agent*.log"))
