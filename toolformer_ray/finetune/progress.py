"""What a run shows while and after it trains: a console line per report, metrics.jsonl, TensorBoard
events (all written by the Ray Train controller, on the driver's node), and the loss curve PNG."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from matplotlib.figure import (
    Figure,  # the OO API: no pyplot, so no process-wide backend switch
)
from matplotlib.ticker import MaxNLocator
from ray.train.v2.api.callback import UserCallback  # V2 by path: V1 has none
from torch.utils.tensorboard import SummaryWriter

TRAIN_SCALARS = ("loss", "lr", "tokens_per_s", "grad_norm", "epoch")
DEV_SCALARS = ("dev_ppl", "dev_ppl_plain", "dev_loss")


class ProgressLogger(UserCallback):
    """Runs in the Ray Train controller: console lines, metrics.jsonl, TensorBoard."""

    def __init__(self, log_dir: str, max_steps: int):
        self.log_dir = log_dir
        self.max_steps = max_steps
        self._writer = None

    def after_report(self, run_context, metrics, checkpoint):
        m = dict(metrics[0]) if metrics else {}
        if "step" not in m:
            return
        if checkpoint is not None:
            m["checkpoint"] = checkpoint.path
        m["time"] = time.time()
        os.makedirs(self.log_dir, exist_ok=True)
        with open(os.path.join(self.log_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(m) + "\n")
        self._tensorboard(m)
        print(self._line(m, checkpoint is not None), flush=True)

    def _tensorboard(self, m: dict) -> None:
        if self._writer is None:
            self._writer = SummaryWriter(os.path.join(self.log_dir, "tensorboard"))
        step = int(m["step"])
        for key in TRAIN_SCALARS:
            if key in m:
                self._writer.add_scalar(f"train/{key}", m[key], step)
        for key in DEV_SCALARS:
            if key in m:
                self._writer.add_scalar(f"dev/{key}", m[key], step)
        self._writer.flush()

    def _line(self, m: dict, checkpointed: bool) -> str:
        if "loss" in m:
            line = (f"[finetune] step {int(m['step'])}/{self.max_steps}  loss {m['loss']:.4f}  "
                    f"lr {m['lr']:.2e}  {m['tokens_per_s']:,.0f} tok/s")
        else:
            line = "[finetune] before training:"
        if "dev_ppl" in m:
            line += f"  dev ppl {m['dev_ppl']:.4g} (calls disabled)"
        if checkpointed:
            line += "  [checkpoint]"
        return line


def load_metrics(path: str | Path) -> list[dict]:
    """metrics.jsonl -> one record per step (the latest line wins: a resumed run redoes steps after
    its checkpoint)."""
    by_step: dict[int, dict] = {}
    p = Path(path)
    if p.is_file():
        for line in p.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


def plot_loss_curve(records: list[dict], png: str | Path, title: str = "fine-tuning") -> None:
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    steps = [r["step"] for r in records if "loss" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    ax.plot(steps, losses, label="train loss", color="tab:blue")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    dev = [(r["step"], r["dev_loss"]) for r in records if "dev_loss" in r]
    if dev:
        ax.plot(*zip(*dev), "o-", label="dev loss, calls disabled", color="tab:orange")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
