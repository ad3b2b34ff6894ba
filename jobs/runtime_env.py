"""Print jobs/runtime_env.yaml as JSON, with the non-secret storage settings of this shell, for

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env-json "$(python -m jobs.runtime_env)" \
        -- python -m jobs.nightly --config configs/cluster.yaml

Only settings pass (region, a custom endpoint such as MinIO's), never credentials: Ray's runtime-env
agent writes the whole runtime env to its log (a 0644 file on every node), the dashboard shows it.
The job's credentials come from the nodes: their identity (instance profile, IRSA), else their own
environment (a Kubernetes Secret through envFrom); the job's driver hands them to its actors in
memory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

# What S3 clients (s3fs/botocore, pyarrow) read that is not secret: the region, a custom endpoint.
FORWARDED = ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
# Never forwarded, even when asked for: they would be written to the nodes' logs.
SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
           "HF_TOKEN")
DEFAULT_FILE = Path(__file__).with_name("runtime_env.yaml")


class SecretInRuntimeEnv(ValueError):
    pass


def _is_secret(name: str) -> bool:
    words = set(name.upper().split("_"))  # whole words: TOKENIZERS_PARALLELISM is no token
    return name in SECRETS or bool(
        words & {"SECRET", "TOKEN", "PASSWORD", "PASSWD", "CREDENTIALS", "KEY"})


def runtime_env(path: str | Path = DEFAULT_FILE, environ: dict[str, str] | None = None,
                forward: tuple[str, ...] = FORWARDED) -> dict:
    environ = os.environ if environ is None else environ
    secret = [k for k in forward if _is_secret(k)]
    if secret:
        raise SecretInRuntimeEnv(
            f"refusing to put {', '.join(secret)} in the job's runtime env (Ray logs it): give the "
            "nodes the credentials (IRSA / instance profile, or a Kubernetes Secret in the pod "
            "environment); see docs/operating.md")
    env = yaml.safe_load(Path(path).read_text()) or {}
    env_vars = dict(env.get("env_vars") or {})
    leaked = [k for k in env_vars if _is_secret(k)]
    if leaked:
        raise SecretInRuntimeEnv(f"{path} sets {', '.join(leaked)}: no credential belongs in a "
                                 "runtime env")
    env_vars.update({k: environ[k] for k in forward if environ.get(k)})
    env["env_vars"] = env_vars
    return env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--file", default=str(DEFAULT_FILE), help="runtime_env YAML to start from")
    parser.add_argument("--forward", action="append", default=[], metavar="NAME",
                        help="also pass this (non-secret) environment variable (repeatable)")
    args = parser.parse_args(argv)
    try:
        env = runtime_env(args.file, forward=FORWARDED + tuple(args.forward))
    except SecretInRuntimeEnv as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if any(os.environ.get(k) for k in SECRETS):
        print("note: credentials in this shell are not passed to the job; the nodes must have "
              "their own (docs/operating.md, S3 credentials)", file=sys.stderr)
    sys.stdout.write(json.dumps(env))


if __name__ == "__main__":
    main()
