"""Print jobs/runtime_env.yaml as JSON, with the storage credentials of *this* shell added, for

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env-json "$(python -m jobs.runtime_env)" -- python -m jobs.nightly --config configs/cluster.yaml

The credentials go from your environment to the job's runtime environment in memory; nothing is written to
a file. Only variables that are set are passed. They are visible to whoever can read the job's details on
the dashboard: on a shared cluster give the nodes a role (instance profile, IRSA) instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

# What S3 clients (s3fs/botocore, pyarrow) and the Hub read: keys, session token, region, a custom endpoint.
FORWARDED = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
             "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "HF_TOKEN")
DEFAULT_FILE = Path(__file__).with_name("runtime_env.yaml")


def runtime_env(path: str | Path = DEFAULT_FILE, environ: dict[str, str] | None = None,
                forward: tuple[str, ...] = FORWARDED) -> dict:
    environ = os.environ if environ is None else environ
    env = yaml.safe_load(Path(path).read_text()) or {}
    env_vars = dict(env.get("env_vars") or {})
    env_vars.update({k: environ[k] for k in forward if environ.get(k)})
    env["env_vars"] = env_vars
    return env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--file", default=str(DEFAULT_FILE), help="runtime_env YAML to start from")
    parser.add_argument("--forward", action="append", default=[], metavar="NAME",
                        help="also pass this environment variable (repeatable)")
    args = parser.parse_args(argv)
    env = runtime_env(args.file, forward=FORWARDED + tuple(args.forward))
    sys.stdout.write(json.dumps(env))


if __name__ == "__main__":
    main()
