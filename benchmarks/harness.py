"""What every benchmark script here shares: its command line (--config, -s key=value, --output), the
run header of its JSON, the printed tables and where the JSON goes (<output>/<which>-<config
hash>.json).

The scripts run as `python benchmarks/<name>.py`, so this folder is on sys.path and `import harness`
finds this file.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from toolformer_ray.config import Config, load_config


def parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", "-c", default=None, help="YAML config file")
    ap.add_argument("-s", "--set", dest="overrides", action="append", default=[],
                    help="key.path=value (repeatable)")
    ap.add_argument("--output", default="benchmarks/results", help="where the JSON goes")
    return ap


def config(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def header(cfg: Config, threads: int | None = None) -> dict:
    """The run's identity, the first keys of every JSON; pins torch's threads first if asked."""
    if threads:
        torch.set_num_threads(threads)
    return {"config_hash": cfg.config_hash(), "model": cfg.model.path, "dtype": cfg.model.dtype,
            "torch_threads": torch.get_num_threads(), "host": platform.node(),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def write_results(results: dict, which: list[str], cfg: Config, output: str) -> Path:
    """<output>/<the benchmarks run, sorted, joined by _>-<config hash>.json"""
    Path(output).mkdir(parents=True, exist_ok=True)
    name = "_".join(sorted(which)) or "bench"
    path = Path(output) / f"{name}-{cfg.config_hash()}.json"
    path.write_text(json.dumps(results, indent=2, default=float))
    print(f"\nwrote {path}")
    return path
