"""Moves batches of documents through the stages and commits shards in input order.

    read_ahead    read shards only while the LM side has little queued (bounded memory)
    feed_lm       keep the LM stages busy: score started batches first, then sample new ones
    collect       take what finished: a read shard becomes batches, a sampled batch goes to the
                  tools, a scored batch is done
    finish_tools  a batch whose tool calls are all back goes to scoring (or is done: nothing to
                  score)
    commit_ready  commit finished shards in input order (the per-tool cap fills deterministically)

LM stages get at most `ray.max_batches_per_actor` batches at a time each (back-pressure); tools run
while the LM stages sample or score other batches. A killed run, restarted, redoes exactly the
uncommitted shards. Results are what the stages return (stages.py); nothing is assigned into a
Candidate here.
"""
from __future__ import annotations

import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable

from toolformer_ray.config import Config
from toolformer_ray.core.filtering import ScoredCall
from toolformer_ray.core.sampling import Candidate
from toolformer_ray.core.types import Document
from toolformer_ray.datajob.stages import Read, Sampled, Scored, TaskKind, ToolCalls, ToolStage
from toolformer_ray.report import p_api_counts


@dataclass
class Batch:
    shard: int  # index in the run's shard list
    docs: list[Document]
    candidates: list[Candidate] = field(default_factory=list)  # the sample stage's output
    # the execute stage's output, one per candidate
    results: list[str | None] = field(default_factory=list)
    tools: ToolCalls | None = None  # its calls while they are in flight


@dataclass
class ShardWork:
    plan: Any  # corpus.ShardPlan
    docs: list[Document] | None = None
    quarantine: list[dict] = field(default_factory=list)
    batches_left: int = -1
    scored: list[ScoredCall] = field(default_factory=list)
    funnel: dict[str, Counter] = field(default_factory=dict)
    timings: Counter = field(default_factory=Counter)
    p_api_hist: dict = field(default_factory=dict)  # tool -> counts of p_api at every position
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.error is not None or self.batches_left == 0


class Scheduler:
    """One run's queues. `lm` is a stages.LocalBackend or RayBackend, `commit(work) -> calls kept`
    publishes a finished shard, `progress` gets the counts (run.Progress)."""

    def __init__(self, cfg: Config, works: list[ShardWork], lm, tools: ToolStage, tokenizer,
                 commit: Callable[[ShardWork], int], progress):
        self.cfg = cfg
        self.works = works
        self.lm = lm
        self.tools = tools
        self.tokenizer = tokenizer
        self.commit = commit
        self.progress = progress
        self.to_read = deque(range(len(works)))
        self.reads: dict = {}  # handle -> shard index
        self.to_sample: deque[Batch] = deque()
        self.to_score: deque[Batch] = deque()
        self.lm_tasks: dict = {}  # handle -> (TaskKind, Batch)
        self.executing: list[Batch] = []
        self.next_commit = 0
        self.read_limit = max(2, cfg.ray.lm_actors)

    def run(self) -> float:
        """Every shard through to its commit (or failure). Returns the seconds it took: the pipeline
        proper, from stages up to the last commit (what benchmarks/scaling.py times)."""
        t = time.perf_counter()
        while self.next_commit < len(self.works):
            self.read_ahead()
            self.feed_lm()
            self.collect()
            self.finish_tools()
            self.commit_ready()
            if self.executing and not self.lm_tasks and not self.reads:
                time.sleep(0.01)  # only tools are running: poll their results
        return time.perf_counter() - t

    # ------------------------------------------------------------------------------------- steps
    def read_ahead(self) -> None:
        while (self.to_read and len(self.reads) < self.read_limit
               and len(self.to_sample) < self.lm.capacity * 2):
            si = self.to_read.popleft()
            self.reads[self.lm.read(self.works[si].plan, self.cfg, self.tokenizer)] = si

    def feed_lm(self) -> None:
        while len(self.lm_tasks) < self.lm.capacity and (self.to_score or self.to_sample):
            if self.to_score:
                kind = TaskKind.SCORE
                b = self.to_score.popleft()
            else:
                kind = TaskKind.SAMPLE
                b = self.to_sample.popleft()
            if self.works[b.shard].error:
                continue  # its shard has failed: no more work on it
            if kind is TaskKind.SCORE:
                args = (b.docs, b.candidates, b.results)
            else:
                args = (b.docs,)
            self.lm_tasks[self.lm.submit(kind, *args)] = (kind, b)

    def collect(self) -> None:
        """Whatever finished, blocking briefly when nothing else can move."""
        handles = list(self.reads) + list(self.lm_tasks)
        for h in self.lm.wait(handles, timeout=0.02 if self.executing else 0.5):
            if h in self.reads:
                si = self.reads.pop(h)
                kind, b = TaskKind.READ, None
            else:
                kind, b = self.lm_tasks.pop(h)
                si = b.shard
            try:
                out = self.lm.get(h)
            except Exception as e:  # a shard that cannot be read, or a model error, fails alone
                self._fail(si, e)
                continue
            if self.works[si].error:
                continue
            if kind is TaskKind.READ:
                self._on_read(si, out)
            elif kind is TaskKind.SAMPLE:
                self._on_sampled(b, out)
            else:
                self._on_scored(b, out)

    def finish_tools(self) -> None:
        for b in list(self.executing):
            w = self.works[b.shard]
            if w.error:
                self.executing.remove(b)
            elif b.tools.late():
                # The pools resolve every call in bounded time; this is the backstop if they do not.
                self.executing.remove(b)
                self._fail(b.shard, TimeoutError(f"tool calls of a batch did not finish within "
                                                 f"{b.tools.wait_s:.0f} s"))
            elif b.tools.done():
                self.executing.remove(b)
                executed = b.tools.results()
                b.results = executed.results
                b.tools = None
                w.timings["execute_wait"] += executed.seconds
                if any(r is not None for r in b.results):
                    self.to_score.append(b)
                else:  # nothing to score: the batch is done
                    self._batch_done(b)

    def commit_ready(self) -> None:
        while self.next_commit < len(self.works) and self.works[self.next_commit].finished:
            w = self.works[self.next_commit]
            if w.error is None:
                try:
                    kept = self.commit(w)
                    self.progress.update(kept=kept, shards=1)
                except Exception as e:
                    self._fail(self.next_commit, e)
            w.scored = []  # free memory; the rows are written
            self.next_commit += 1

    # ---------------------------------------------------------------------------- stage outputs
    def _on_read(self, si: int, out: Read) -> None:
        w = self.works[si]
        w.docs = out.docs
        w.quarantine = out.quarantine
        w.timings["read"] += out.seconds
        per_task = self.cfg.ray.docs_per_task
        batches = [Batch(si, out.docs[s:s + per_task]) for s in range(0, len(out.docs), per_task)]
        w.batches_left = len(batches)
        self.to_sample.extend(batches)
        self.progress.update(docs_read=len(out.docs))

    def _on_sampled(self, b: Batch, out: Sampled) -> None:
        w = self.works[b.shard]
        w.timings["sample"] += out.seconds
        for tool, counts in out.funnel.items():
            w.funnel.setdefault(tool, Counter()).update(counts)
        for tool, values in out.p_api.items():
            counts = p_api_counts(values)
            old = w.p_api_hist.get(tool, [0] * len(counts))
            w.p_api_hist[tool] = [x + y for x, y in zip(old, counts)]
        b.candidates = out.candidates
        t = time.perf_counter()
        b.tools = self.tools.submit(b.docs, b.candidates)  # in-process executors run them here
        w.timings["execute_submit"] += time.perf_counter() - t
        self.executing.append(b)
        self.progress.update(calls=len(b.candidates))

    def _on_scored(self, b: Batch, out: Scored) -> None:
        w = self.works[b.shard]
        w.timings["score"] += out.seconds
        w.scored += out.scored
        self._batch_done(b)

    def _batch_done(self, b: Batch) -> None:
        self.works[b.shard].batches_left -= 1
        self.progress.update(docs_done=len(b.docs))

    def _fail(self, si: int, err: BaseException) -> None:
        w = self.works[si]
        if w.error:
            return  # the first error is the one to report
        w.error = f"{type(err).__name__}: {err}"
        print(f"[generate] shard {w.plan.unit_id} failed: {w.error}", file=sys.stderr)
