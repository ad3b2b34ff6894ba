"""The nightly refresh's bookkeeping (jobs/nightly.py, jobs/state.py) on real output storage, without Ray.

Generation, fine-tuning and evaluation are stand-ins here: generation commits shard tables through the real
OutputStore (as run_generate does), fine-tuning checks the round's data snapshot and writes a model folder.
The real stages run under `ray job submit` in tests/test_jobs_submit.py.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # jobs/ is a top-level folder, not part of the installed package

from jobs.nightly import run_nightly
from jobs.runtime_env import FORWARDED, SECRETS, SecretInRuntimeEnv, runtime_env
from jobs.state import Lease, NightlyState
from toolformer_ray.config import load_config
from toolformer_ray.errors import UserError
from toolformer_ray.datajob.records import CALLS_SCHEMA, DOCUMENTS_SCHEMA
from toolformer_ray.storage import OutputStore


def make_cfg(tmp_path: Path, **extra):
    values = {"run.output": str(tmp_path / "out"), "corpus.input": str(tmp_path / "corpus"),
              "nightly.min_new_calls": 5, "nightly.lease_ttl_s": 1.0, "eval.tasks": "[math]",
              "eval.data.math": "tests/fixtures/eval/asdiv.jsonl", "model.path": "base-model", **extra}
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


class Corpus:
    """Stand-in for run_generate: each night commits the shards added since, `calls` kept calls each."""

    def __init__(self):
        self.shards: dict[str, int] = {}  # shard id -> kept calls
        self.runs = 0

    def add(self, shard: str, calls: int) -> None:
        self.shards[shard] = calls

    def __call__(self, cfg):
        self.runs += 1
        store = OutputStore(cfg.run.output, cfg.config_hash())
        done = store.committed_shards()
        new = [s for s in self.shards if s not in done]
        for shard in new:
            n = self.shards[shard]
            docs = [{"doc_id": f"{shard}-d{i}", "source_id": f"{shard}-r{i}", "shard": shard, "text": f"text {i}",
                     "augmented_text": f"text [Calculator({i}+1) -> {i + 1}] {i}", "n_calls": 1} for i in range(n)]
            calls = [{"doc_id": d["doc_id"], "shard": shard, "tool": "Calculator", "call": "1+1"} for d in docs]
            store.write_shard(shard, {"documents": pa.Table.from_pylist(docs, DOCUMENTS_SCHEMA),
                                      "calls": pa.Table.from_pylist(calls, CALLS_SCHEMA)},
                              {"shard_id": shard, "funnel": {"Calculator": {"kept_after_cap": n}}})
        return {"output": store.uri(), "shards_done": len(new), "shards_skipped": len(done), "shards_failed": {},
                "calls_kept": {"Calculator": sum(self.shards[s] for s in new)}}


class Trainer:
    """Stand-in for run_finetune: records what it was asked, can fail, writes a model folder."""

    def __init__(self, fail_times: int = 0):
        self.calls: list[dict] = []
        self.fail_times = fail_times

    def __call__(self, cfg):
        docs = pq.read_table(cfg.finetune.data).column("doc_id").to_pylist()
        self.calls.append({"base": cfg.model.path, "data": cfg.finetune.data, "output": cfg.finetune.output,
                           "docs": docs})
        if self.fail_times:
            self.fail_times -= 1
            raise RuntimeError("worker died")
        model = Path(cfg.finetune.output) / "model"
        model.mkdir(parents=True, exist_ok=True)
        (model / "config.json").write_text("{}")
        return {"model_dir": str(model), "steps": 2, "output": cfg.finetune.output}


class Evaluator:
    def __init__(self, fail_times: int = 0):
        self.calls: list[list[str]] = []
        self.fail_times = fail_times

    def __call__(self, cfg, models):
        self.calls.append(list(models))
        if self.fail_times:
            self.fail_times -= 1
            raise RuntimeError("eval died")
        return {"output": cfg.eval.output, "models": models, "table": "| math | ... |"}


def night(cfg, corpus, trainer, evaluator, **kw):
    return run_nightly(cfg, generate=corpus, finetune=trainer, evaluate=evaluator, **kw)


def test_calls_accumulate_until_the_threshold_and_each_shard_is_trained_once(tmp_path):
    cfg = make_cfg(tmp_path)
    corpus, trainer, evaluator = Corpus(), Trainer(), Evaluator()
    corpus.add("s1", 3)
    n1 = night(cfg, corpus, trainer, evaluator)
    assert n1.status == "ok" and n1.pending_calls == 3 and trainer.calls == []  # 3 < 5: wait
    corpus.add("s2", 2)
    n2 = night(cfg, corpus, trainer, evaluator)
    assert n2.generate["shards_done"] == 1 and n2.pending_calls == 5
    assert len(trainer.calls) == 1 and trainer.calls[0]["base"] == "base-model"
    assert sorted(trainer.calls[0]["docs"]) == sorted([f"s1-d{i}" for i in range(3)] + ["s2-d0", "s2-d1"])
    assert evaluator.calls == [[str(Path(trainer.calls[0]["output"]) / "model"), "base-model"]]
    # nothing new: no fine-tuning, no evaluation, the same model
    n3 = night(cfg, corpus, trainer, evaluator)
    assert n3.generate["shards_done"] == 0 and len(trainer.calls) == 1 and len(evaluator.calls) == 1
    assert n3.model == n2.model == str(Path(trainer.calls[0]["output"]) / "model")
    # the second round starts from the first round's model and sees only the new shard
    corpus.add("s3", 6)
    night(cfg, corpus, trainer, evaluator)
    assert len(trainer.calls) == 2 and trainer.calls[1]["base"] == n2.model
    assert sorted(trainer.calls[1]["docs"]) == [f"s3-d{i}" for i in range(6)]
    state = NightlyState(str(tmp_path / "out" / "nightly"))
    summary = state.read_json("state.json")
    assert [r["calls"] for r in summary["rounds"]] == [5, 6] and summary["pending_calls"] == 0
    assert summary["model"] == str(Path(trainer.calls[1]["output"]) / "model")
    assert len(list((tmp_path / "out" / "nightly" / "nights").glob("*.json"))) == 4
    assert state.read_json("lease.json") is None  # released


def test_a_failed_night_is_continued_not_replanned(tmp_path):
    cfg = make_cfg(tmp_path)
    corpus, trainer, evaluator = Corpus(), Trainer(fail_times=1), Evaluator(fail_times=1)
    corpus.add("s1", 5)
    with pytest.raises(RuntimeError, match="worker died"):
        night(cfg, corpus, trainer, evaluator)
    logs = [json.loads(p.read_text()) for p in (tmp_path / "out" / "nightly" / "nights").glob("*.json")]
    assert [lg["status"] for lg in logs] == ["failed"] and "worker died" in logs[0]["error"]
    # the retry has a new shard as well: it still finishes the planned round first, on the same data
    corpus.add("s2", 9)
    with pytest.raises(RuntimeError, match="eval died"):
        night(cfg, corpus, trainer, evaluator)
    assert len(trainer.calls) == 2 and trainer.calls[0] == trainer.calls[1]
    assert sorted(trainer.calls[1]["docs"]) == [f"s1-d{i}" for i in range(5)]
    # the next night evaluates the finished round without training it again, and plans the waiting shard
    n = night(cfg, corpus, trainer, evaluator)
    assert len(evaluator.calls) == 3 and evaluator.calls[1] == evaluator.calls[0]
    assert len(trainer.calls) == 3 and sorted(trainer.calls[2]["docs"]) == [f"s2-d{i}" for i in range(9)]
    rounds = NightlyState(str(tmp_path / "out" / "nightly")).rounds()
    assert [r["seq"] for r in rounds] == [1, 2] and all(r["finetuned"] and r["evaluated"] for r in rounds)
    assert set(rounds[0]["units"]) == {"s1"} and set(rounds[1]["units"]) == {"s2"}
    assert n.status == "ok"


def test_lease_keeps_a_second_night_out_and_expires_when_its_holder_dies(tmp_path):
    cfg = make_cfg(tmp_path)
    state = NightlyState(str(tmp_path / "out" / "nightly"))
    holder = Lease(state, "night-A", ttl=1.0)
    assert holder.acquire()
    try:
        t = time.time()
        skipped = night(cfg, Corpus(), Trainer(), Evaluator(), owner="night-B")
        assert skipped.status == "skipped" and "night-A" in skipped.decision
        assert time.time() - t >= 1.0  # it waited for the lease to expire, and A kept renewing it
    finally:
        holder.release()
    # a holder that died (no renewals) leaves a record that expires: the next night takes over
    Lease(state, "night-dead", ttl=1.0)._write()
    corpus = Corpus()
    assert night(cfg, corpus, Trainer(), Evaluator(), owner="night-C").status == "ok" and corpus.runs == 1


def test_two_nights_starting_together_do_not_both_run(tmp_path):
    state = NightlyState(str(tmp_path / "state"))
    # a read-back pause far above the few ms between a night's first read and its write, as with real ones
    leases = [Lease(state, f"n{i}", ttl=1.0, settle=0.5) for i in range(2)]
    got = [None, None]
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, leases[i].acquire())) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for lease in leases:
        lease.release()
    assert sorted(got) == [False, True]


def test_settings_a_night_cannot_honour_are_refused_before_any_work(tmp_path):
    corpus = Corpus()
    with pytest.raises(UserError, match="corpus.limit"):
        night(make_cfg(tmp_path, **{"corpus.limit": 10}), corpus, Trainer(), Evaluator())
    with pytest.raises(UserError, match="eval.data for qa"):
        night(make_cfg(tmp_path, **{"eval.tasks": "[math,qa]"}), corpus, Trainer(), Evaluator())
    assert corpus.runs == 0


def test_runtime_env_passes_settings_never_credentials(tmp_path, capsys):
    env = runtime_env(ROOT / "jobs" / "runtime_env.yaml",
                      environ={"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK", "AWS_SESSION_TOKEN": "ST",
                               "AWS_DEFAULT_REGION": "eu-west-1", "AWS_ENDPOINT_URL": "", "HOME": "/root"})
    assert env["env_vars"]["AWS_DEFAULT_REGION"] == "eu-west-1"
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                "HOME"} & set(env["env_vars"])
    assert "SK" not in json.dumps(env) and "ST" not in json.dumps(env)
    assert env["working_dir"] == "." and ".venv" in env["excludes"]
    committed = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    assert not [k for k in committed["env_vars"] if k in FORWARDED + SECRETS]  # no credential in git
    # asking to forward a secret is refused in one line, exit 2, and prints nothing to pass on
    from jobs.runtime_env import main

    for name in ("AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "MY_DB_PASSWORD"):
        with pytest.raises(SystemExit) as e:
            main(["--forward", name])
        out, err = capsys.readouterr()
        assert e.value.code == 2 and out == "" and err.startswith("error: refusing to put " + name)
    bad = tmp_path / "env.yaml"
    bad.write_text("env_vars: {AWS_SECRET_ACCESS_KEY: x}\n")
    with pytest.raises(SecretInRuntimeEnv, match="AWS_SECRET_ACCESS_KEY"):
        runtime_env(bad, environ={})


class FakeKube:
    """A Kubernetes API server for RayJobs, just enough for the launcher: POST creates (409 if the name
    exists), GET returns the object with the next of `statuses`; requests must carry the bearer token."""

    def __init__(self, statuses: list[dict]):
        import http.server

        self.objects: dict[str, dict] = {}
        self.statuses = list(statuses)
        self.posts = 0
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                if self.headers["Authorization"] != "Bearer sa-token":
                    return self._send(401, {"message": "Unauthorized"})
                fake.posts += 1
                obj = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                name = obj["metadata"]["name"]
                if not self.path.endswith("/namespaces/ns/rayjobs"):
                    return self._send(404, {"message": self.path})
                if name in fake.objects:
                    return self._send(409, {"message": f'rayjobs.ray.io "{name}" already exists'})
                fake.objects[name] = obj
                return self._send(201, obj)

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                if name not in fake.objects:
                    return self._send(404, {"message": "not found"})
                status = fake.statuses.pop(0) if len(fake.statuses) > 1 else fake.statuses[0]
                return self._send(200, {**fake.objects[name], "status": status})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_cronjob_launcher_creates_tonights_rayjob_once_and_waits_for_it():
    from jobs.launch_rayjob import Api, launch, night_name

    manifest = yaml.safe_load((ROOT / "cluster/kuberay/nightly-cronjob/rayjob-nightly.yaml").read_text())
    kube = FakeKube([{"jobDeploymentStatus": "Initializing"},
                     {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
                     {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}])
    api = Api(kube.url, "sa-token", None)
    logs = []
    try:
        assert launch(api, manifest, "ns", poll_s=0.01, log=logs.append) == 0
        name = night_name("toolformer-nightly")
        assert list(kube.objects) == [name] and kube.objects[name]["spec"] == manifest["spec"]
        # a retried launcher pod the same night adopts the RayJob instead of starting a second night
        kube.statuses = [{"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "message": "deadline"}]
        assert launch(api, manifest, "ns", poll_s=0.01, log=logs.append) == 1
        assert kube.posts == 2 and len(kube.objects) == 1 and "exists already" in logs[-2]
        with pytest.raises(RuntimeError, match="HTTP 401"):
            launch(Api(kube.url, "wrong", None), manifest, "ns", poll_s=0.01, log=logs.append)
    finally:
        kube.server.shutdown()
