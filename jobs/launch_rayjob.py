"""Create tonight's RayJob from a manifest and wait for it: the body of the plain Kubernetes CronJob
that schedules the nightly refresh where KubeRay's RayCronJob feature gate is off
(cluster/kuberay/nightly-cronjob/).

    python -m jobs.launch_rayjob --manifest /etc/toolformer/rayjob-nightly.yaml

- The RayJob is named <manifest name>-<UTC date>: a retried launcher pod finds tonight's RayJob
  already there (409) and waits for it instead of starting a second night.
- It waits until the RayJob finishes, so the CronJob's Job stays active for the whole night and
  `concurrencyPolicy: Forbid` keeps the next night from starting on top of it; the Job's
  activeDeadlineSeconds bounds the wait.
- Exit code 0 when the Ray job SUCCEEDED, 1 otherwise.

It talks to the Kubernetes API with the pod's service account (token, CA and namespace mounted by
Kubernetes) using only the standard library, so the project image can run it without kubectl.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# RayJob status.jobDeploymentStatus values after which nothing changes
DONE = {"Complete", "Failed"}


class Api:
    """The few Kubernetes API calls needed, with the pod's service account."""

    def __init__(self, server: str, token: str, ca_file: str | None):
        self.server = server.rstrip("/")
        self.token = token
        self.context = None
        if server.startswith("https"):
            self.context = ssl.create_default_context(cafile=ca_file)

    @classmethod
    def in_cluster(cls) -> "Api":
        host = os.environ["KUBERNETES_SERVICE_HOST"]
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        host = f"[{host}]" if ":" in host else host  # IPv6 service address
        token = (SA_DIR / "token").read_text().strip()
        return cls(f"https://{host}:{port}", token, str(SA_DIR / "ca.crt"))

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.server}{path}", data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json",
            "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30, context=self.context) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")


def night_name(base: str, now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"{base}-{now:%Y%m%d}"


def launch(api: Api, manifest: dict, namespace: str, poll_s: float = 30.0, log=print) -> int:
    """Create (or adopt) tonight's RayJob, wait for it to finish; 0 if its Ray job succeeded."""
    rayjob = json.loads(json.dumps(manifest))  # a copy
    name = night_name(rayjob["metadata"]["name"])
    rayjob["metadata"]["name"] = name
    rayjob["metadata"].setdefault("labels", {})["toolformer-ray/night"] = name.rsplit("-", 1)[-1]
    path = f"/apis/ray.io/v1/namespaces/{namespace}/rayjobs"
    status, body = api.request("POST", path, rayjob)
    if status == 409:
        log(f"RayJob {name} exists already (a retried launcher): waiting for it")
    elif status >= 300:
        raise RuntimeError(f"creating RayJob {name} failed: HTTP {status} "
                           f"{body.get('message', body)}")
    else:
        log(f"created RayJob {namespace}/{name}")
    while True:
        status, body = api.request("GET", f"{path}/{name}")
        if status >= 300:
            raise RuntimeError(f"reading RayJob {name} failed: HTTP {status} "
                               f"{body.get('message', body)}")
        st = body.get("status") or {}
        if st.get("jobDeploymentStatus") in DONE:
            log(f"RayJob {name}: {st.get('jobDeploymentStatus')}, Ray job {st.get('jobStatus')} "
                f"{st.get('message', '')}".rstrip())
            return 0 if st.get("jobStatus") == "SUCCEEDED" else 1
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--manifest", required=True, help="RayJob YAML (mounted from a ConfigMap)")
    parser.add_argument("--namespace", default=None, help="default: the pod's own namespace")
    parser.add_argument("--poll-seconds", type=float, default=30.0)
    args = parser.parse_args(argv)
    manifest = yaml.safe_load(Path(args.manifest).read_text())
    namespace = args.namespace or (SA_DIR / "namespace").read_text().strip()
    sys.exit(launch(Api.in_cluster(), manifest, namespace, args.poll_seconds,
                    log=lambda m: print(m, flush=True)))


if __name__ == "__main__":
    main()
