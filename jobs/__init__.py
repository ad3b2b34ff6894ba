"""Entrypoints for `ray job submit` and schedulers: `python -m jobs.<name> --config FILE`.

Each one reads a config, calls the library and prints what it did; nothing of the method lives here.
They run wherever the job's driver runs (the head node under `ray job submit`, a laptop with a local
Ray otherwise) and join the job's cluster through RAY_ADDRESS, which `ray job submit` sets.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from toolformer_ray.config import Config, load_config
from toolformer_ray.errors import UserError


def parse_config(argv: list[str] | None, description: str) -> Config:
    parser = argparse.ArgumentParser(description=description.strip().splitlines()[0])
    parser.add_argument("--config", "-c", required=True,
                        help="YAML config (e.g. configs/cluster.yaml)")
    parser.add_argument("--set", "-s", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a config value, e.g. --set run.output=s3://bucket/runs "
                             "(repeatable)")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides)


def run_main(body: Callable[[], int]) -> None:
    """Run a job body; a user error (bad config, missing input) is one line on stderr and exit code
    2, so the job's status says what to fix without a traceback to dig through."""
    try:
        code = body()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    sys.stdout.flush()
    sys.exit(code)
