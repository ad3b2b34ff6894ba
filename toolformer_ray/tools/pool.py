"""Moved to toolformer_ray/tools/executor.py (issue 19); kept until generate.py and bench.py import
it from there. Delete after the merge."""
from toolformer_ray.tools.executor import LocalToolExecutor, Pending, RayToolExecutor  # noqa: F401
