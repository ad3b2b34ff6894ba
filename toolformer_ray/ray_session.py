"""One way to get a Ray connection: join the job's cluster, else start a local Ray.

Every stage (generate, finetune, nightly, benchmarks) calls `ensure_ray`; whoever started Ray stops
it.
"""
from __future__ import annotations

import os

import ray


def cluster_address(address: str | None = None) -> str | None:
    """The cluster to join: the config's `ray.address`, else RAY_ADDRESS (set by `ray job
    submit`)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def ensure_ray(address: str | None = None, num_cpus: int | None = None, *,
               dashboard: bool = False, join_only: bool = False) -> bool:
    """Connect once; True when this call started a local Ray (so the caller should shut it down).

    `dashboard`: Ray Train's placement-group cleaner polls the state API, which lives in the
    dashboard; without it the job log fills with "Failed to query Ray Train Controller actor state"
    every second. `join_only`: join a cluster when there is one, never start a local Ray (the
    nightly driver, whose stages start their own when run on a laptop)."""
    if ray.is_initialized():
        return False
    target = cluster_address(address)
    if target:
        ray.init(address=target, log_to_driver=True)
        return False
    if join_only:
        return False
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, log_to_driver=True)
    return True
