"""The nightly refresh's state, kept on the output storage (local or s3://) so that a retried night (on a
fresh KubeRay cluster, say) sees everything an earlier attempt did.

    <nightly.state>/                         default <run.output>/nightly
        lease.json                           who runs tonight; renewed while alive, expires when not
        rounds/r0001-<digest>/plan.json      a fine-tuning round: its shard units, base model, data, output
                              data/documents.parquet    the round's training data (snapshot, written first)
                              finetune/      run_finetune's output (checkpoints, model/)
                              finetuned.json written after the fine-tune finished: the new model
                              eval/          run_eval's report;  evaluated.json  written after it
        nights/<time>-<owner>.json           what each night did (or why it failed)
        state.json                           summary for people: current model, rounds, pending calls

plan.json is the commit point of a round: the units it lists are never planned again, so no data is
fine-tuned on twice; a round without finetuned.json is finished before any new one is planned.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Any

import fsspec

from toolformer_ray.fsutil import is_local
from toolformer_ray.storage import put_bytes


class NightlyState:
    def __init__(self, root: str):
        self.root_uri = root.rstrip("/")
        self.fs, path = fsspec.core.url_to_fs(self.root_uri)
        self.root = path.rstrip("/")

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def uri(self, *parts: str) -> str:
        """What users and other libraries get: a local path or s3://..."""
        p = self.path(*parts)
        return p if is_local(self.fs) else self.fs.unstrip_protocol(p)

    def read_json(self, *parts: str) -> Any | None:
        path = self.path(*parts)
        self.fs.invalidate_cache(path.rsplit("/", 1)[0])  # s3fs caches listings; another process may have written
        try:
            return json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None

    def write_json(self, data: Any, *parts: str) -> str:
        put_bytes(self.fs, self.path(*parts), json.dumps(data, indent=1, default=str).encode())  # atomic
        return self.uri(*parts)

    def delete(self, *parts: str) -> None:
        try:
            self.fs.rm_file(self.path(*parts))
        except FileNotFoundError:
            pass

    def rounds(self) -> list[dict]:
        """Every planned round, oldest first, each plan with `finetuned` / `evaluated` (None until done)."""
        directory = self.path("rounds")
        self.fs.invalidate_cache(directory)
        try:
            names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(directory, detail=False))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            plan = self.read_json("rounds", name, "plan.json")
            if plan is None:  # a data snapshot whose plan was never committed: not a round
                continue
            plan["finetuned"] = self.read_json("rounds", name, "finetuned.json")
            plan["evaluated"] = self.read_json("rounds", name, "evaluated.json")
            out.append(plan)
        return sorted(out, key=lambda r: r["seq"])


class LeaseLost(RuntimeError):
    """Another night took the lease over (this one stopped renewing for longer than the TTL)."""


class Lease:
    """At most one night at a time, on storage without locks: a JSON record renewed every ttl/5 seconds.

    A night that finds a live lease waits up to 1.2 x TTL: a killed night's lease expires in that time (so a
    retry proceeds), a running night keeps renewing it (so the newcomer gives up). After writing its own
    record a night waits a moment and reads it back, so two nights starting together do not both proceed
    (S3 has read-after-write consistency; this is a guard for rare overlaps, the schedulers' concurrency
    policy and the deadline are the first line)."""

    def __init__(self, state: NightlyState, owner: str, ttl: float, name: str = "lease.json",
                 settle: float | None = None):
        self.state, self.owner, self.ttl, self.name = state, owner, ttl, name
        self.settle = min(2.0, ttl / 10) if settle is None else settle  # write -> read-back pause
        self.lost = False
        self.holder: dict | None = None  # the other night's record when acquire() gave up
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        now = time.time()
        self.state.write_json({"owner": self.owner, "renewed_at": now, "expires_at": now + self.ttl}, self.name)

    def acquire(self) -> bool:
        deadline = time.time() + 1.2 * self.ttl
        while True:
            cur = self.state.read_json(self.name)
            if cur is None or cur.get("owner") == self.owner or cur.get("expires_at", 0) < time.time():
                self._write()
                time.sleep(self.settle)
                cur = self.state.read_json(self.name)
                if cur is not None and cur.get("owner") == self.owner:
                    self._thread = threading.Thread(target=self._renew, name="nightly-lease", daemon=True)
                    self._thread.start()
                    return True
            self.holder = cur
            if time.time() >= deadline:
                return False
            time.sleep(min(10.0, self.ttl / 10))

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 5):
            try:
                cur = self.state.read_json(self.name)
                if cur is not None and cur.get("owner") != self.owner:
                    self.lost = True
                    return
                self._write()
            except Exception:  # noqa: BLE001 - a storage hiccup: try again at the next beat
                continue

    def check(self) -> None:
        if self.lost:
            raise LeaseLost(f"the nightly lease {self.state.uri(self.name)} was taken over by another night")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        cur = self.state.read_json(self.name)
        if cur is not None and cur.get("owner") == self.owner:
            self.state.delete(self.name)
