"""Static checks of everything that is deployed but cannot run here (no Kubernetes, no Docker engine, no
cloud): the Ray cluster launcher YAML (Ray's own schema), the KubeRay manifests, the CronJob fallback, the
Dockerfile and its ignore file, configs/cluster.yaml. Every YAML parses; required fields are present;
entrypoints name modules that exist; config paths resolve; versions and images agree across files; every pod
fits the node type it is pinned to (about 90 % of its allocatable); the GPU group holds the LM actors and the
fine-tuning workers the config asks for; RayJob deadlines, retries and clean-up are what the comments say;
the image's torch is built for its base's CUDA."""
from __future__ import annotations

import copy
import json
import fnmatch
import importlib.util
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # jobs/ is a top-level folder, not part of the installed package

from toolformer_ray.config import load_config  # noqa: E402

KUBERAY = ROOT / "cluster" / "kuberay"
IMAGE_HOME = "/home/ray/toolformer-ray"  # the checkout's place in the image (docker/Dockerfile)
DAY = 24 * 3600
INSTANCE_TYPE = "node.kubernetes.io/instance-type"
# Allocatable as EKS reports it on the node types the manifests pin (capacity less the kubelet's and the
# system's reserves and the eviction threshold, rounded down); docs/operating.md has the same table.
NODES = {
    "m6i.2xlarge": {"cpu": 7.9, "memory_gib": 29.9, "gpu": 0},  # 8 vCPU / 32 GiB: the head
    "m6i.4xlarge": {"cpu": 15.8, "memory_gib": 59.5, "gpu": 0},  # 16 vCPU / 64 GiB: tool pools
    "p4d.24xlarge": {"cpu": 95.6, "memory_gib": 1100.0, "gpu": 8},  # 96 vCPU / 1152 GiB / 8x A100 40 GB
}
REQUEST_SHARE = (0.85, 0.95)  # of the node's allocatable: about 90 %, the rest for DaemonSets
# NVIDIA driver floor of each CUDA toolkit (CUDA release notes, Linux x86_64)
DRIVER_FLOOR = {"cu121": "530.30.02", "cu124": "550.54.14", "cu126": "560.28.03", "cu128": "570.26",
                "cu130": "580.65.06"}
# RayJobSpec of KubeRay 1.6 (its CRD reference): any other key would be pruned without a word
RAYJOB_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "preRunningDeadlineSeconds", "shutdownAfterJobFinishes", "suspend"}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.strip().split("==")
            out[name.lower().replace("_", "-")] = version
    return out


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def module_exists(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def cpu_quantity(q) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def memory_gib(q: str) -> float:
    units = {"Ki": 2**-20, "Mi": 2**-10, "Gi": 1.0, "Ti": 2**10}
    for suffix, factor in units.items():
        if q.endswith(suffix):
            return float(q[:-2]) * factor
    raise AssertionError(f"memory {q!r}: use Ki/Mi/Gi/Ti")


def local_path(path: str) -> Path:
    """A path as the image sees it -> the same file in this checkout."""
    return ROOT / path[len(IMAGE_HOME) + 1:] if path.startswith(IMAGE_HOME + "/") else ROOT / path


def check_entrypoint(command: str) -> tuple[str, object]:
    """`python -m jobs.x --config FILE [--set k=v ...]`: the module exists and the config loads with the
    overrides. Returns (module, config)."""
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-m"], command
    module = argv[2]
    assert module_exists(module), f"no module {module}"
    config, overrides = None, []
    rest = argv[3:]
    while rest:
        flag, value, rest = rest[0], rest[1], rest[2:]
        if flag in ("--config", "-c"):
            config = value
        elif flag in ("--set", "-s"):
            overrides.append(value)
        else:
            pytest.fail(f"unexpected argument {flag} in {command!r}")
    assert config and local_path(config).is_file(), f"config {config} not found"
    return module, load_config(local_path(config), overrides)


def all_yaml() -> list[Path]:
    files = [p for d in ("cluster", "configs", "jobs") for p in (ROOT / d).rglob("*.y*ml")]
    assert len(files) >= 10
    return sorted(files)


@pytest.mark.parametrize("path", all_yaml(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_parses(path):
    docs = load_all(path)
    assert docs and all(isinstance(d, dict) for d in docs)


# ------------------------------------------------------------------------------ Ray cluster launcher
def test_cluster_launcher_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load(ROOT / "cluster" / "ray-cluster.aws.yaml")
    validate_config(prepare_config(copy.deepcopy(raw)))  # what `ray up` does before touching the cloud
    types = raw["available_node_types"]
    assert raw["head_node_type"] in types and types[raw["head_node_type"]]["resources"] == {"CPU": 0}
    workers = {k: v for k, v in types.items() if k != raw["head_node_type"]}
    gpu_types = {v["node_config"]["InstanceType"] for v in workers.values()
                 if v["node_config"]["InstanceType"].startswith(("g", "p"))}
    # the same GPU node shape as the KubeRay manifests (configs/cluster.yaml is sized for it)
    kuberay_gpu = gpu_group()[0]["template"]["spec"]["nodeSelector"][INSTANCE_TYPE]
    assert gpu_types == {kuberay_gpu}
    for v in workers.values():
        assert 0 <= v["min_workers"] <= v["max_workers"] <= raw["max_workers"]
    assert "--num-cpus=0" in " ".join(raw["head_start_ray_commands"])
    for cmds in (raw["head_start_ray_commands"], raw["worker_start_ray_commands"]):
        assert "RAY_AUTH_MODE=token" in cmds[-1]
    assert "~/.ray/auth_token" in raw["file_mounts"]
    assert raw["docker"]["image"] == the_image()


# ----------------------------------------------------------------------------------------- KubeRay
def cluster_specs() -> dict[str, dict]:
    return {
        "raycluster.yaml": load(KUBERAY / "raycluster.yaml")["spec"],
        "rayjob-generate.yaml": load(KUBERAY / "rayjob-generate.yaml")["spec"]["rayClusterSpec"],
        "rayjob-nightly.yaml": load(KUBERAY / "nightly-cronjob" / "rayjob-nightly.yaml")["spec"]["rayClusterSpec"],
        "raycronjob-nightly.yaml": load(KUBERAY / "raycronjob-nightly.yaml")["spec"]["jobTemplate"]["rayClusterSpec"],
    }


def the_image() -> str:
    return f"REGISTRY/toolformer-ray:{project()['version']}"


def test_ray_cluster_specs_are_complete_and_identical():
    specs = cluster_specs()
    first = specs["raycluster.yaml"]
    for name, spec in specs.items():
        assert spec == first, f"{name}: rayClusterSpec differs from raycluster.yaml"
    assert first["rayVersion"] == pins()["ray"]
    assert first["authOptions"] == {"mode": "token"} and first["enableInTreeAutoscaling"] is True
    head = first["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in first["workerGroupSpecs"]}
    assert set(groups) == {"gpu-workers", "cpu-workers"}
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    for template in [head["template"]] + [g["template"] for g in groups.values()]:
        (container,) = template["spec"]["containers"]
        assert container["image"] == the_image()
        assert container["resources"]["requests"] == container["resources"]["limits"]  # no overcommit surprises
        assert template["spec"]["serviceAccountName"] == "toolformer-ray"
        assert {"secretRef": {"name": "toolformer-s3", "optional": True}} in container["envFrom"]
    sa = load(KUBERAY / "serviceaccount.yaml")
    assert sa["kind"] == "ServiceAccount" and sa["metadata"]["name"] == "toolformer-ray"


def pod_templates(spec: dict) -> dict[str, dict]:
    return {"head": spec["headGroupSpec"]["template"],
            **{g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]}}


@pytest.mark.parametrize("name", list(cluster_specs()))
def test_every_pod_asks_for_about_90_percent_of_the_node_it_is_pinned_to(name):
    """A pod larger than its node's allocatable stays Pending forever; one far smaller wastes the node."""
    for group, template in pod_templates(cluster_specs()[name]).items():
        node_type = template["spec"]["nodeSelector"][INSTANCE_TYPE]
        node = NODES[node_type]
        (container,) = template["spec"]["containers"]
        req = container["resources"]["requests"]
        cpu, mem = cpu_quantity(req["cpu"]), memory_gib(req["memory"])
        lo, hi = REQUEST_SHARE
        assert lo * node["cpu"] <= cpu <= hi * node["cpu"], f"{name} {group}: {cpu} CPU on {node_type}"
        assert lo * node["memory_gib"] <= mem <= hi * node["memory_gib"], f"{name} {group}: {mem} GiB"
        gpus = int(req.get("nvidia.com/gpu", 0))
        assert gpus == node["gpu"], f"{name} {group}: {gpus} of the {node['gpu']} GPUs of a {node_type}"
        if gpus:
            tolerated = {t["key"] for t in template["spec"].get("tolerations", [])}
            assert "nvidia.com/gpu" in tolerated, f"{name} {group}: GPU nodes are tainted"
        for vol in template["spec"].get("volumes", []):  # a memory emptyDir counts in the pod's memory
            if vol.get("emptyDir", {}).get("medium") == "Memory":
                assert memory_gib(vol["emptyDir"]["sizeLimit"]) < mem / 4, f"{name} {group}: /dev/shm"


def gpu_group() -> tuple[dict, int, float]:
    """(the GPU worker group, GPUs per pod, CPUs per pod)."""
    (group,) = [g for g in cluster_specs()["raycluster.yaml"]["workerGroupSpecs"]
                if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    res = group["template"]["spec"]["containers"][0]["resources"]
    assert res["limits"] == res["requests"]
    return group, int(res["limits"]["nvidia.com/gpu"]), cpu_quantity(res["limits"]["cpu"])


def test_the_gpu_group_holds_the_lm_actors_and_the_finetune_workers():
    """configs/cluster.yaml against the GPU nodes: a multi-GPU node, the LM actors filling whole nodes with
    the CPUs they ask for, ZeRO-3 fine-tuning over NCCL with one worker per GPU on whole nodes."""
    cfg = load_config(ROOT / "configs" / "cluster.yaml")
    group, gpus, cpus = gpu_group()
    assert gpus >= 4, "the fine-tuning path is sized for multi-GPU nodes"
    nodes = group["maxReplicas"]
    ray_cfg = cfg.ray
    assert 0 < ray_cfg.lm_actor_gpus <= 1 and (1 / ray_cfg.lm_actor_gpus).is_integer()
    per_node = int(gpus / ray_cfg.lm_actor_gpus)  # actors one node holds by GPUs
    assert ray_cfg.lm_actors % per_node == 0 and ray_cfg.lm_actors <= per_node * nodes, (
        f"{ray_cfg.lm_actors} LM actors x {ray_cfg.lm_actor_gpus} GPU on nodes of {gpus} GPUs (max {nodes})")
    assert per_node * ray_cfg.lm_actor_cpus <= cpus, "the actors' CPUs do not fit beside their GPUs"
    ft = cfg.finetune
    assert ft.use_gpu  # Ray Train's torch backend is NCCL on GPUs
    stage = json.loads((ROOT / ft.deepspeed_config).read_text())["zero_optimization"]["stage"]
    assert stage == 3
    assert ft.num_workers % gpus == 0 and ft.num_workers <= gpus * nodes, (
        f"{ft.num_workers} fine-tuning workers on nodes of {gpus} GPUs (max {nodes}): whole nodes only")
    assert gpus * ft.cpus_per_worker <= cpus, "the fine-tuning workers' CPUs do not fit on one node"
    if cfg.nightly.eval_gpus:
        assert cfg.nightly.eval_gpus <= gpus and cfg.nightly.eval_cpus <= cpus
    (cpu_group,) = [g for g in cluster_specs()["raycluster.yaml"]["workerGroupSpecs"]
                    if g["groupName"] != group["groupName"]]
    cpu_pod = cpu_quantity(cpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    tools = [t for t in cfg.tools.values() if t.enabled]
    assert all(t.worker_cpus <= cpu_pod for t in tools)
    assert sum(t.workers * t.worker_cpus for t in tools) <= cpu_pod * cpu_group["maxReplicas"]


def check_deletion_rules(spec: dict) -> None:
    """KubeRay 1.6's validation of deletionStrategy.deletionRules (it fails the RayJob otherwise), and that
    every terminal outcome deletes the cluster and, later, the RayJob itself."""
    rules = spec["deletionStrategy"]["deletionRules"]
    # rules exclude the older clean-up fields
    assert not spec.get("shutdownAfterJobFinishes") and not spec.get("ttlSecondsAfterFinished")
    by_condition: dict[tuple, dict] = {}
    for rule in rules:
        cond = rule["condition"]
        keys = {"jobStatus", "jobDeploymentStatus"} & set(cond)
        assert len(keys) == 1, rule
        (key,) = keys
        assert cond[key] in ({"SUCCEEDED", "FAILED"} if key == "jobStatus" else {"Failed"}), rule
        assert cond.get("ttlSeconds", 0) >= 0
        policy = rule["policy"]
        assert policy in {"DeleteCluster", "DeleteWorkers", "DeleteSelf", "DeleteNone"}
        assert not (policy == "DeleteWorkers" and spec["rayClusterSpec"].get("enableInTreeAutoscaling"))
        ttls = by_condition.setdefault((key, cond[key]), {})
        assert policy not in ttls, f"duplicate {policy} for {cond}"
        ttls[policy] = cond.get("ttlSeconds", 0)
    for condition, ttls in by_condition.items():
        order = [ttls[p] for p in ("DeleteWorkers", "DeleteCluster", "DeleteSelf") if p in ttls]
        assert order == sorted(order), f"{condition}: Workers <= Cluster <= Self TTLs"
    for outcome in [("jobStatus", "SUCCEEDED"), ("jobStatus", "FAILED"), ("jobDeploymentStatus", "Failed")]:
        ttls = by_condition.get(outcome, {})
        assert {"DeleteCluster", "DeleteSelf"} <= set(ttls), f"{outcome}: the cluster and the RayJob must go"
        assert ttls["DeleteCluster"] <= 3600 and ttls["DeleteSelf"] <= 14 * DAY


def worst_case_seconds(spec: dict) -> int:
    """KubeRay restarts activeDeadlineSeconds with each attempt (a fresh cluster), and does not retry an
    attempt that ran out of time: a RayJob lasts at most (backoffLimit + 1) x activeDeadlineSeconds."""
    return (spec["backoffLimit"] + 1) * spec["activeDeadlineSeconds"]


@pytest.mark.parametrize("path,module", [
    (KUBERAY / "rayjob-generate.yaml", "jobs.generate"),
    (KUBERAY / "nightly-cronjob" / "rayjob-nightly.yaml", "jobs.nightly"),
])
def test_rayjobs_run_existing_modules_on_resolvable_configs_and_are_bounded(path, module):
    doc = load(path)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob" and doc["metadata"]["name"]
    spec = doc["spec"]
    found, cfg = check_entrypoint(spec["entrypoint"])
    assert found == module
    assert cfg.run.output.startswith("s3://") and cfg.corpus.input.startswith("s3://")  # a retry = a fresh cluster
    assert (ROOT / cfg.finetune.deepspeed_config).is_file()  # resolves next to the package in the image
    assert set(spec) <= RAYJOB_FIELDS, f"not RayJob fields: {set(spec) - RAYJOB_FIELDS}"
    assert spec["backoffLimit"] >= 1
    assert 0 < spec["activeDeadlineSeconds"] <= DAY / 2
    # a cluster that cannot start (no node, image pull) fails the attempt long before the deadline
    assert 0 < spec["preRunningDeadlineSeconds"] <= spec["activeDeadlineSeconds"] / 4
    if module == "jobs.nightly":  # a night, retries included, ends before the next one starts
        assert worst_case_seconds(spec) < DAY
    check_deletion_rules(spec)
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(env, dict) and not any(k.startswith("AWS_") for k in env.get("env_vars", {}))


CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")


def test_raycronjob_schedules_the_nightly_rayjob():
    doc = load(KUBERAY / "raycronjob-nightly.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCronJob"
    spec = doc["spec"]
    assert set(spec) == {"schedule", "jobTemplate"}  # KubeRay 1.6's RayCronJob: no other fields (strict apply)
    fields = spec["schedule"].split()
    assert len(fields) == 5 and all(CRON_FIELD.match(f) for f in fields)
    nightly = load(KUBERAY / "nightly-cronjob" / "rayjob-nightly.yaml")["spec"]
    assert spec["jobTemplate"] == nightly
    # once a day, and a night (retries included) ends before the next one starts
    assert fields[2:] == ["*", "*", "*"] and worst_case_seconds(spec["jobTemplate"]) < DAY


def test_cronjob_fallback_creates_the_rayjob_and_forbids_overlap():
    kdir = KUBERAY / "nightly-cronjob"
    kust = load(kdir / "kustomization.yaml")
    for f in kust["resources"] + [f for g in kust["configMapGenerator"] for f in g["files"]]:
        assert (kdir / f).is_file(), f
    docs = {d["kind"]: d for d in load_all(kdir / "cronjob.yaml")}
    assert set(docs) == {"ServiceAccount", "Role", "RoleBinding", "CronJob"}
    cron = docs["CronJob"]
    assert cron["apiVersion"] == "batch/v1"
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid" and len(spec["schedule"].split()) == 5
    assert spec["schedule"] == load(KUBERAY / "raycronjob-nightly.yaml")["spec"]["schedule"]
    job = spec["jobTemplate"]["spec"]
    rayjob = load(kdir / "rayjob-nightly.yaml")
    # the launcher outlives its RayJob, every attempt included (so Forbid covers the whole night), and is
    # itself bounded
    assert worst_case_seconds(rayjob["spec"]) < job["activeDeadlineSeconds"] < DAY
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    (container,) = pod["containers"]
    assert container["image"] == the_image()
    cmd = container["command"]
    assert cmd[:2] == ["python", "-m"] and module_exists(cmd[2])
    manifest = Path(cmd[cmd.index("--manifest") + 1])
    (mount,) = [m for m in container["volumeMounts"] if str(manifest).startswith(m["mountPath"])]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    (gen,) = kust["configMapGenerator"]
    assert volume["configMap"]["name"] == gen["name"] and manifest.name in gen["files"]
    assert kust["generatorOptions"]["disableNameSuffixHash"] is True  # referenced by its fixed name
    rules = docs["Role"]["rules"]
    assert any("ray.io" in r["apiGroups"] and "rayjobs" in r["resources"] and {"create", "get"} <= set(r["verbs"])
               for r in rules)
    binding = docs["RoleBinding"]
    assert binding["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    assert binding["subjects"][0]["name"] == docs["ServiceAccount"]["metadata"]["name"]


def test_every_image_is_the_projects_at_its_version():
    images = set()
    for path in (ROOT / "cluster").rglob("*.yaml"):
        images |= set(re.findall(r"image:\s*(\S+)", path.read_text()))
    assert images == {the_image()}


def test_documented_job_modules_exist():
    texts = [p.read_text() for p in [*(ROOT / "cluster").rglob("*.yaml"), *(ROOT / "jobs").glob("*.py"),
                                     ROOT / "jobs" / "runtime_env.yaml", ROOT / "configs" / "cluster.yaml",
                                     ROOT / "docs" / "operating.md", ROOT / "docker" / "Dockerfile"]]
    modules = {m for t in texts for m in re.findall(r"python -m (jobs\.\w+)", t)}
    assert {"jobs.generate", "jobs.finetune", "jobs.nightly", "jobs.runtime_env", "jobs.launch_rayjob"} <= modules
    for m in modules:
        assert module_exists(m), m
    for t in texts:
        for path in re.findall(r"--config (configs/[\w.-]+)", t):
            assert (ROOT / path).is_file(), path


# ---------------------------------------------------------------------------------- configs/cluster.yaml
def test_cluster_config_loads_and_its_paths_resolve():
    cfg = load_config(ROOT / "configs" / "cluster.yaml")
    s3 = [cfg.run.output, cfg.corpus.input, cfg.finetune.output, cfg.eval.output,
          cfg.tools["WikiSearch"].options["index"], cfg.eval.data["math"]]
    assert all(p.startswith("s3://") for p in s3)
    assert len({p.split("/")[2] for p in s3}) == 1  # one bucket to replace
    assert (ROOT / cfg.finetune.deepspeed_config).is_file()
    assert cfg.corpus.limit is None  # the nightly refresh refuses a limit
    ft = cfg.finetune
    assert ft.use_gpu and ft.global_batch_size % (ft.micro_batch_size * ft.num_workers) == 0
    assert cfg.ray.lm_actor_gpus > 0 and Path(cfg.model.cache_dir).is_absolute()
    assert set(cfg.eval.tasks) <= set(cfg.eval.data)
    # the images' default model is converted into this config's cache at build time
    assert "toolformer-ray model --config configs/cluster.yaml" in (ROOT / "docker" / "Dockerfile").read_text()


# -------------------------------------------------------------------------------------------- Docker
def dockerfile() -> str:
    return (ROOT / "docker" / "Dockerfile").read_text()


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes; a directory pattern covers its files."""
    result = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat[1:] if neg else pat
        pat = pat.rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if pat == "**" or any(fnmatch.fnmatch(p, pat) for p in prefixes) or fnmatch.fnmatch(path, pat):
            result = not neg
    return result


def test_dockerfile_is_based_on_the_pinned_ray_with_cuda_and_python():
    (base,) = re.findall(r"^ARG RAY_IMAGE=(\S+)$", dockerfile(), flags=re.M)
    # a fixed CUDA (cuXYZ), not the `-gpu` alias, which moves between Ray releases
    m = re.fullmatch(r"rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>\d+)-(?P<cuda>cu\d+)", base)
    assert m, base
    assert m["ray"] == pins()["ray"]
    req = project()["requires-python"]  # ">=3.11,<3.12"
    major, minor = m["py"][0], int(m["py"][1:])
    assert f">={major}.{minor}" in req and f"<{major}.{minor + 1}" in req
    assert re.search(r"^FROM \$\{RAY_IMAGE\}$", dockerfile(), flags=re.M)


def test_torch_is_built_for_the_base_images_cuda_and_the_driver_floor_is_written_down():
    text = dockerfile()
    (cuda,) = re.findall(r"^ARG RAY_IMAGE=rayproject/ray:[\d.]+-py\d+-(cu\d+)$", text, flags=re.M)
    torch_pins = re.findall(r"torch==([\d.]+)\+(cu\d+)", text)
    assert torch_pins == [(pins()["torch"], cuda)], torch_pins  # constraints' torch, the base's CUDA
    indexes = re.findall(r"--index-url https://download\.pytorch\.org/whl/(cu\d+)", text)
    assert indexes == [cuda]
    # the build itself compares torch's CUDA with the base's (CUDA_VERSION of NVIDIA's images)
    assert "torch.version.cuda == base" in text and "os.environ['CUDA_VERSION']" in text
    floor = DRIVER_FLOOR[cuda]
    assert f"driver >= {floor}" in text
    assert f"driver >= {floor}" in (ROOT / "cluster" / "ray-cluster.aws.yaml").read_text()
    assert f"driver >= {floor}" in (ROOT / "docs" / "operating.md").read_text()


def test_dockerfile_pins_agree_with_constraints_and_makefile():
    text = dockerfile()
    installs = re.findall(r"pip install ([^\n\\&]+)", text)
    assert installs
    for line in installs:
        if "--no-deps" not in line:
            assert "-c constraints.txt" in line, line  # every resolved install is held to the pins
    constraint_pins = pins()
    make = (ROOT / "Makefile").read_text()
    for name, version in re.findall(r"([A-Za-z0-9_.-]+)==([\w.]+)", text):
        key = name.lower().replace("_", "-")
        if key in constraint_pins:
            assert constraint_pins[key] == version, name
        else:
            assert f"{name}=={version}" in make, f"{name}=={version} is pinned neither in constraints.txt nor Makefile"
    # the requirements come from pyproject.toml, and every dependency there is pinned in constraints.txt
    assert "tomllib.load(open('pyproject.toml'" in text
    for dep in project()["dependencies"]:
        name = re.split(r"[\[<>=!~ ]", dep, 1)[0].lower().replace("_", "-")
        assert name in constraint_pins, f"{dep} has no pin in constraints.txt"


def test_every_copy_source_exists_and_is_sent_to_the_builder():
    ignore = ROOT / "docker" / "Dockerfile.dockerignore"  # BuildKit's ignore file for docker/Dockerfile
    patterns = [ln.strip() for ln in ignore.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    copies = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile(), flags=re.M)
    sources = [s for line in copies for s in line.split()]
    assert {"pyproject.toml", "constraints.txt", "toolformer_ray", "jobs", "configs"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), f"COPY source {src} does not exist in the build context (repo root)"
        files = [src] if (ROOT / src).is_file() else [
            str(p.relative_to(ROOT)) for p in (ROOT / src).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        assert files and not any(ignored(f, patterns) for f in files), f"{src} is excluded by {ignore.name}"
    for secret in [".venv/bin/python", ".cache/models/x", "runs/local/x", ".git/config", "tests/test_jobs.py",
                   "toolformer_ray/__pycache__/x.pyc"]:
        assert ignored(secret, patterns), f"{secret} would be sent to the builder"
