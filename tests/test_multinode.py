"""The data job on several Ray nodes of one machine (`ray.cluster_utils.Cluster`): every node has
its own model cache (TOOLFORMER_NODE_CACHE in the node's environment) and the model comes from
S3 (moto), so an LM actor can only compute with what it resolved on its own node. Fake GPUs
(`num_gpus` on a node) test the placement and the missing-CUDA error; a fault switch in the
node's environment makes LM actors hang. A canary secret must never reach a file under Ray's
temp dir, the output or the logs."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from toolformer_ray.config import load_config
from toolformer_ray.datajob.run import _lm_actor_count, run_generate
from toolformer_ray.datajob.stages import FAULT_ENV, LMStartError
from toolformer_ray.models import NODE_CACHE_ENV, directory_revision

from caller_model import caller_model_dir, corpus_records

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CANARY = f"canary-{uuid.uuid4().hex}"  # made at run time, so no source file contains it


@pytest.fixture
def ray_cluster(monkeypatch):
    """Start a Cluster with `nodes` = [(num_cpus, num_gpus, env), ...] (the first is the head, where
    the driver is); the raylets start without any AWS_* variable, so storage credentials can reach
    the workers only as the driver passes them. Yields (cluster, temp_dir)."""
    import ray
    from ray.cluster_utils import Cluster

    state = {}

    def start(nodes):
        temp_dir = tempfile.mkdtemp(prefix="tmn-", dir="/tmp")  # short: Ray's unix sockets are here
        saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("AWS_")}
        try:
            cluster = Cluster()
            for cpus, gpus, env in nodes:
                cluster.add_node(num_cpus=cpus, num_gpus=gpus, env_vars=env, temp_dir=temp_dir,
                                 object_store_memory=80 * 2**20)
            cluster.wait_for_nodes()
        finally:
            os.environ.update(saved)
        ray.init(address=cluster.address, log_to_driver=False)
        state.update(cluster=cluster, temp_dir=temp_dir)
        return cluster, temp_dir

    yield start
    if state:
        ray.shutdown()
        state["cluster"].shutdown()
        shutil.rmtree(state["temp_dir"], ignore_errors=True)


def write_corpus(d: Path, files: int, docs: int) -> Path:
    d.mkdir()
    for k in range(files):
        with open(d / f"part-{k}.jsonl", "w") as f:
            for r in corpus_records(docs, seed=40 + k, prefix=f"m{k}"):
                f.write(json.dumps(r) + "\n")
    return d


def make_cfg(model: str, cache: Path, corpus: Path | str, out: Path | str, **extra):
    overrides = [
        f"model.path={model}", "model.dtype=float32", f"model.cache_dir={cache}",
        "tools={Calculator: {k: 3, m: 3, tau_f: -0.5, workers: 1, worker_cpus: 0.25}}",
        f"corpus.input={corpus}", f"run.output={out}", "ray.lm_actor_cpus=0.75",
        "ray.reader_cpus=0.25",
        "ray.torch_threads=1", "ray.docs_per_task=3", "sampling.max_call_tokens=16",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


def calls(version_dir: str) -> pd.DataFrame:
    import pyarrow.dataset as pads

    df = pads.dataset(f"{version_dir}/calls", format="parquet").to_table().to_pandas()
    return df.sort_values(["doc_id", "tool", "token_pos", "call"]).reset_index(drop=True)


def files_containing(roots: list[Path], needle: str) -> list[str]:
    hits = []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                p = Path(dirpath) / name
                try:
                    if p.is_file() and not p.is_symlink() and needle.encode() in p.read_bytes():
                        hits.append(str(p))
                except OSError:  # a socket or a file removed while we walk
                    pass
    return hits


def test_multinode_s3_model_per_node_caches_same_rows_as_no_ray_and_no_secret_written(
        ray_cluster, s3_endpoint, tmp_path, monkeypatch, capfd):
    # the model lives only on S3; the driver and each worker node resolve it into their own cache
    model_uri = s3_endpoint.uri("models", "caller")
    s3_endpoint.fs().put(str(caller_model_dir()) + "/", model_uri + "/", recursive=True)
    corpus = s3_endpoint.uri("corpus")
    local = write_corpus(tmp_path / "corpus", files=3, docs=3)
    for p in sorted(local.iterdir()):
        s3_endpoint.fs().put(str(p), f"{corpus}/{p.name}")
    caches = {n: tmp_path / f"cache-{n}" for n in ("driver", "head", "w1", "w2")}
    # the head node offers no CPU: every actor and task runs on a worker node, one LM actor on each
    ray_cluster([(0, 0, {NODE_CACHE_ENV: str(caches["head"])}),
                 (1, 0, {NODE_CACHE_ENV: str(caches["w1"])}),
                 (1, 0, {NODE_CACHE_ENV: str(caches["w2"])})])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY)  # moto takes any; the job must not write it
    monkeypatch.delenv(NODE_CACHE_ENV, raising=False)
    cfg = make_cfg(model_uri, caches["driver"], corpus, tmp_path / "out", **{"ray.lm_actors": 2})
    import toolformer_ray.datajob.corpus.listing as corpus_mod

    def no_hashing_here(fs, path):
        raise AssertionError(f"the driver hashed {path}: new inputs are hashed in Ray tasks")

    with monkeypatch.context() as m:
        m.setattr(corpus_mod, "sha256_file", no_hashing_here)
        summary = run_generate(cfg, use_ray=True, progress=False)
    assert summary.shards_done == 3 and not summary.shards_failed, summary.describe()

    # each worker node downloaded and checked its own copy; nothing was put in the head node's cache
    revs = {n: [directory_revision(p) for p in caches[n].glob("remote-*") if p.is_dir()]
            for n in caches}
    assert len(revs["w1"]) == 1 and revs["w1"] == revs["w2"] == revs["driver"], revs
    assert not revs["head"]
    t = calls(summary.output)
    assert len(t) > 0 and set(t["model"]) == {model_uri}
    assert set(t["model_revision"]) == set(revs["driver"])

    # the same rows as one process without Ray
    t2 = calls(run_generate(make_cfg(model_uri, caches["driver"], corpus, tmp_path / "out-noray"),
                            use_ray=False, progress=False).output)
    cols = ["doc_id", "tool", "token_pos", "call", "result", "model", "model_revision"]
    pd.testing.assert_frame_equal(t[cols], t2[cols])
    losses = ["loss_plus", "loss_no_call", "loss_call_no_result"]
    pd.testing.assert_frame_equal(t[losses], t2[losses], atol=1e-5)

    # the canary secret reached the workers (they read S3) but no file: Ray's temp dir (session logs
    # of every node, runtime-env agent, GCS), the output, the caches, and nothing printed
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    assert session.is_dir() and any(session.rglob("*.log"))
    roots = [session.parent, tmp_path]
    assert not files_containing(roots, CANARY)
    out, err = capfd.readouterr()
    assert CANARY not in out + err


def test_multinode_fake_gpus_one_actor_per_gpu_missing_cuda_names_the_node(ray_cluster, tmp_path):
    # workers import jobs.nightly (the eval task) from this checkout
    path = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    ray_cluster([(1, 0, path), (1, 2, path)])  # a node with 2 (fake) GPUs and no CUDA
    cfg = make_cfg(str(caller_model_dir()), tmp_path / "cache", write_corpus(tmp_path / "c", 1, 2),
                   tmp_path / "out", **{"ray.lm_actor_gpus": 1, "ray.lm_actor_cpus": 0.25,
                                        "ray.lm_actor_start_timeout_s": 120})
    assert _lm_actor_count(cfg) == 2  # one per GPU
    half = cfg.model_copy(deep=True)
    half.ray.lm_actor_gpus = 0.5
    assert _lm_actor_count(half) == 4
    with pytest.raises(LMStartError) as e:
        run_generate(cfg, use_ray=True, progress=False)
    msg = str(e.value)
    assert "lm_actor_gpus=1" in msg and "CUDA is not available on node" in msg
    # the GPU Ray assigned to that actor, not all of the node's
    assert "Ray gave it GPU 0" in msg or "Ray gave it GPU 1" in msg

    # the nightly eval asks Ray for a GPU when the config says so, and then must get CUDA there
    import ray

    from jobs.nightly import _evaluate_where_it_fits

    data = ROOT / "tests/fixtures/eval/asdiv.jsonl"
    ecfg = make_cfg(str(caller_model_dir()), tmp_path / "cache", tmp_path / "c", tmp_path / "o", **{
        "nightly.eval_gpus": 1, "nightly.eval_cpus": 0.25, "eval.tasks": "[math]", "eval.limit": 1,
        "eval.data": "{math: %s}" % data, "eval.output": tmp_path / "ev"})
    with pytest.raises(ray.exceptions.RayTaskError,
                       match="device 'cuda' asked for but CUDA is not available"):
        _evaluate_where_it_fits(ecfg, [str(caller_model_dir())])


def test_multinode_lm_actor_that_cannot_start_or_hangs_ends_with_a_message(ray_cluster, tmp_path):
    import ray

    ray_cluster([(1, 0, {}), (1, 0, {FAULT_ENV: "hang_init"})])
    corpus = write_corpus(tmp_path / "c", 2, 2)
    model = str(caller_model_dir())
    # a GPU no node has: the deadline says so
    cfg = make_cfg(model, tmp_path / "cache", corpus, tmp_path / "out",
                   **{"ray.lm_actors": 1, "ray.lm_actor_gpus": 1,
                      "ray.lm_actor_start_timeout_s": 3})
    with pytest.raises(LMStartError, match=r"did not start in 3 s .*no node has CPU:0.75, GPU:1"):
        run_generate(cfg, use_ray=True, progress=False)
    # an actor whose start-up hangs (the hanging node is the only one with a free CPU:0.75 left)
    cfg = make_cfg(model, tmp_path / "cache", corpus, tmp_path / "out",
                   **{"ray.lm_actors": 2, "ray.lm_actor_start_timeout_s": 20})
    with pytest.raises(LMStartError, match=r"1 of 2 LM actors did not start in 20 s"):
        run_generate(cfg, use_ray=True, progress=False)
    deadline = time.time() + 30  # the actors are released (ray.kill frees their CPUs later)
    while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == 2


def test_multinode_hung_lm_task_fails_its_shards_with_a_message(ray_cluster, tmp_path):
    ray_cluster([(1, 0, {FAULT_ENV: "hang_sample"})])
    cfg = make_cfg(str(caller_model_dir()), tmp_path / "cache", write_corpus(tmp_path / "c", 2, 2),
                   tmp_path / "out", **{"ray.lm_actors": 1, "ray.lm_actor_cpus": 0.5,
                                        "ray.lm_task_timeout_s": 4})
    summary = run_generate(cfg, use_ray=True, progress=False)
    assert summary.shards_done == 0 and len(summary.shards_failed) == 2
    for err in summary.shards_failed.values():
        assert "LMTimeout" in err and "did not answer sample in 4 s" in err
