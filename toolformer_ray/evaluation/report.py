"""The evaluation report: rows of (task, data, model, mode) results as a Markdown table, JSON and a
bar chart."""
from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import fsspec
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


@dataclass
class EvalRow:
    task: str
    data: str  # label of the data set (file stem, or "dateset")
    model: str  # label of the model
    mode: str  # tools | disabled | forced
    n: int
    correct: int = 0
    with_call: int = 0  # inputs on which a tool ran
    seconds: float = 0.0
    perplexity: float | None = None  # the perplexity task only
    model_path: str = ""
    skipped: dict[str, int] = field(default_factory=dict)  # unusable records, by reason

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.n if self.n and self.perplexity is None else None

    @property
    def call_rate(self) -> float | None:
        return self.with_call / self.n if self.n and self.perplexity is None else None

    def to_dict(self) -> dict:
        return {**asdict(self), "accuracy": self.accuracy, "call_rate": self.call_rate}


@dataclass
class EvalReport:
    rows: list[EvalRow]
    output: str = ""
    files: dict[str, str] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # config, tools available / unavailable, versions

    def markdown(self) -> str:
        head = ("| task | data | model | mode | n | accuracy | with tool call | time (s) |\n"
                "|---|---|---|---|---:|---:|---:|---:|")
        lines = [head]
        for r in self.rows:
            if r.perplexity is not None:
                acc = f"ppl {r.perplexity:.2f}"
                calls = "-"
            else:
                acc = f"{100 * r.accuracy:.1f}%" if r.accuracy is not None else "-"
                calls = f"{100 * r.call_rate:.1f}%" if r.call_rate is not None else "-"
            lines.append(f"| {r.task} | {r.data} | {r.model} | {r.mode} | {r.n} | {acc} | {calls} "
                         f"| {r.seconds:.1f} |")
        return "\n".join(lines)

    def describe(self) -> str:
        out = [self.markdown()]
        skipped = {f"{r.task}/{r.data}": r.skipped for r in self.rows if r.skipped}
        for label, reasons in skipped.items():
            counts = ", ".join(f"{v} ({k})" for k, v in reasons.items())
            out.append(f"skipped in {label}: {counts}")
        unavailable = self.meta.get("tools_unavailable") or {}
        for name, why in unavailable.items():
            out.append(f"tool {name} unavailable: {why}")
        if self.files:
            out.append("wrote " + ", ".join(self.files.values()))
        return "\n".join(out)

    def to_json(self) -> dict:
        return {"rows": [r.to_dict() for r in self.rows], "meta": self.meta}

    def write(self, output: str) -> dict[str, str]:
        """Write results.json, results.md and results.png under `output` (local path or fsspec
        URI)."""
        self.output = output
        fs, root = fsspec.core.url_to_fs(output)
        fs.makedirs(root, exist_ok=True)
        files = {"json": f"{output.rstrip('/')}/results.json",
                 "markdown": f"{output.rstrip('/')}/results.md",
                 "chart": f"{output.rstrip('/')}/results.png"}
        with fsspec.open(files["json"], "wt") as f:
            json.dump(self.to_json(), f, indent=2)
        with fsspec.open(files["markdown"], "wt") as f:
            f.write(self.markdown() + "\n")
        with fsspec.open(files["chart"], "wb") as f:
            f.write(bar_chart_png(self.rows))
        self.files = files
        return files


def bar_chart_png(rows: list[EvalRow]) -> bytes:
    """Accuracy per task (one panel per task/data), one bar per model and mode; call share written
    on the bar."""
    acc_rows = [r for r in rows if r.accuracy is not None]
    panels = (list(dict.fromkeys((r.task, r.data) for r in acc_rows))
              or [("no accuracy results", "")])
    # matplotlib's object API on an Agg canvas: no pyplot, no global backend (as report.py does)
    fig = Figure(figsize=(max(4.0, 3.2 * len(panels)), 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (task, data) in zip(axes[0], panels):
        sub = [r for r in acc_rows if (r.task, r.data) == (task, data)]
        labels = [f"{r.model}\n{r.mode}" for r in sub]
        values = [100 * r.accuracy for r in sub]
        bars = ax.bar(range(len(sub)), values, color=[_mode_color(r.mode) for r in sub])
        for bar, r in zip(bars, sub):
            ax.annotate(f"{100 * r.call_rate:.0f}% calls",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(sub)), labels, fontsize=7)
        ax.set_ylim(0, max([100.0 / 1.15, *values]) * 1.15)
        ax.set_title(f"{task} ({data})" if data else task, fontsize=9)
        ax.set_ylabel("accuracy (%)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _mode_color(mode: str) -> str:
    colors = {"tools": "tab:blue", "disabled": "tab:gray", "forced": "tab:orange"}
    return colors.get(mode, "tab:green")


def model_label(path: str, taken: set[str]) -> str:
    label = path if path in ("default", "tiny") else (Path(path.rstrip("/")).name or path)
    base = label
    k = 2
    while label in taken:
        label = f"{base}-{k}"
        k = k + 1
    taken.add(label)
    return label
