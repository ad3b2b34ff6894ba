"""The run report: Markdown + PNG next to the data (`<version>/report/`).

    report.md            the funnel per tool (the paper's Table 2 and the steps before it), kept
                         counts at several tau_f recomputed from the candidates, examples of kept
                         calls, timings per stage
    p_api.png            histogram of p_api per tool at the sampled positions, tau_s marked
    p_api_positions.png  p_api at every usable position (log scale), from the shards' commit records
    utility.png          histogram of L- - L+ per tool, the tool's tau_f marked (and the report's
                         tau_f dashed)

Kept at tau: (min(loss_no_call, loss_call_no_result) - loss_plus) >= tau, as in the filter. Figures
are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend), so this is
safe in a worker process and in threads.
"""
from __future__ import annotations

import io
import math
import re
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from toolformer_ray.datajob.records import FUNNEL_KEYS
from toolformer_ray.storage import OutputStore, put_bytes, sum_funnels, sum_timings

FUNNEL_LABELS = {
    "docs_seen": "documents seen",
    "docs_prefiltered": "passed the pre-filter",
    "positions_above_tau_s": "positions with p_api > tau_s",
    "positions_sampled": "positions sampled (top k)",
    "calls_sampled": "calls sampled",
    "calls_well_formed": "well-formed calls",
    "calls_distinct": "distinct calls executed",
    "calls_with_result": "executed with a result",
    "calls_scored": "calls scored",
    "kept_tau_f": "kept at the tool's tau_f",
    "kept_after_cap": "kept after the per-tool cap",
}
CONTEXT_BEFORE = 200
CONTEXT_AFTER = 100


def utilities(candidates: pa.Table) -> np.ndarray:
    """L- - L+ = min(L(no call), L(call, no result)) - L(call, result) per row; NaN where a loss is
    missing."""
    def col(name: str) -> np.ndarray:
        return candidates.column(name).to_numpy(zero_copy_only=False).astype(float)
    if candidates.num_rows == 0:
        return np.zeros(0)
    return np.fmin(col("loss_no_call"), col("loss_call_no_result")) - col("loss_plus")


def kept_at(candidates: pa.Table, taus: list[float]) -> dict[str, dict[float, int]]:
    """{tool: {tau: number of candidates with L- - L+ >= tau}}."""
    u = utilities(candidates)
    tools = np.asarray(candidates.column("tool").to_pylist(),
                       dtype=object) if candidates.num_rows else np.zeros(0)
    out: dict[str, dict[float, int]] = {}
    for tool in sorted(set(tools.tolist())):
        mask = tools == tool
        # NaN compares False: not kept
        out[tool] = {tau: int(np.sum(u[mask] >= tau)) for tau in taus}
    return out


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def funnel_markdown(funnel: dict[str, dict[str, int]], candidates: pa.Table,
                    report_tau_f: list[float],
                    tau_f_by_tool: dict[str, float]) -> str:
    """Steps as rows, tools as columns (and a total), so the funnel reads top-down."""
    kept = kept_at(candidates, report_tau_f)
    tools = list(dict.fromkeys([*funnel, *kept]))
    keys = list(dict.fromkeys([*FUNNEL_KEYS, *(k for counts in funnel.values() for k in counts)]))
    rows = []
    for key in keys:
        if key == "kept_tau_f":  # recomputed columns go right before the filter's own count
            for tau in report_tau_f:
                values = [kept.get(t, {}).get(tau, 0) for t in tools]
                rows.append([f"L- - L+ >= {tau:g} (recomputed)", *values, sum(values)])
        values = [funnel.get(t, {}).get(key) for t in tools]
        known = [v for v in values if v is not None]
        rows.append([FUNNEL_LABELS.get(key, key), *values, sum(known) if known else None])
    rows.append(["tool's tau_f", *[tau_f_by_tool.get(t) for t in tools], None])
    return _table(["step", *tools, "total"], rows)


def timings_markdown(timings: dict[str, Any]) -> str:
    numeric = {k: float(v) for k, v in timings.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not numeric:
        return "_no timings recorded_"
    stages = {k: v for k, v in numeric.items() if k not in ("wall", "total")}
    total = sum(stages.values()) or 1.0
    rows = [[stage, round(sec, 2), f"{100 * sec / total:.1f}%"] for stage, sec in stages.items()]
    rows += [[k, round(numeric[k], 2), ""] for k in ("wall", "total") if k in numeric]
    return _table(["stage", "seconds", "share of stages"], rows)


# ------------------------------------------------------------------------------------------ figures

def _grid(n: int) -> tuple[int, int]:
    cols = min(3, max(1, n))
    return math.ceil(max(1, n) / cols), cols


def _panels_png(tools: list[str], draw) -> bytes:
    """A figure with one panel per tool, drawn by draw(ax, tool); returned as PNG bytes."""
    tools = tools or ["(none)"]
    nrows, ncols = _grid(len(tools))
    fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    for i, tool in enumerate(tools):
        draw(fig.add_subplot(nrows, ncols, i + 1), tool)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _mark(ax, marks: list[tuple[float, str, str | None]]) -> None:
    for x, style, label in marks:
        ax.axvline(x, color="#c03030", linestyle=style, linewidth=1.2, label=label)
    if marks:
        ax.legend(fontsize=8, frameon=False)


def histogram_png(values_by_tool: dict[str, np.ndarray], xlabel: str,
                  marks: dict[str, list[tuple[float, str, str]]],
                  bins: int | np.ndarray = 40, log_y: bool = True) -> bytes:
    """One panel per tool; `marks[tool]` are (x, linestyle, label) vertical lines (thresholds)."""
    def draw(ax, tool):
        values = values_by_tool.get(tool, np.zeros(0))
        values = values[np.isfinite(values)]
        if values.size:
            counts, _, _ = ax.hist(values, bins=bins, color="#4878a8")
            # skewed (p_api piles up near 0): a log axis shows the tail
            if log_y and counts.max() >= 100:
                ax.set_yscale("log")
                ax.set_ylim(bottom=0.8)
        else:
            ax.text(0.5, 0.5, "no candidates", ha="center", va="center", transform=ax.transAxes)
        _mark(ax, marks.get(tool, []))
        ax.set_title(f"{tool} (n={values.size})", fontsize=10)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel("candidates", fontsize=9)

    return _panels_png(list(values_by_tool), draw)


# p_api over every usable position (not only the sampled ones), as fixed log-spaced counts per shard
P_API_EDGES = np.concatenate([[0.0], np.logspace(-8, 0, 33)])


def p_api_counts(values: list[float]) -> list[int]:
    """Counts of p_api values in P_API_EDGES bins (what a shard's commit record keeps)."""
    return np.histogram(np.clip(np.asarray(values, dtype=float), 0.0, 1.0),
                        bins=P_API_EDGES)[0].tolist()


def positions_png(counts_by_tool: dict[str, list[int]], tau_s_by_tool: dict[str, float]) -> bytes:
    """p_api at every usable position, log-x (values below 1e-8 are left out of the plot)."""
    def draw(ax, tool):
        counts = np.asarray(counts_by_tool.get(tool, []), dtype=float)
        if counts.sum():
            ax.stairs(counts[1:], P_API_EDGES[1:], fill=True, color="#4878a8")
            ax.set_xscale("log")
        tau = tau_s_by_tool.get(tool)
        _mark(ax, [(tau, "-", f"tau_s = {tau:g}")] if tau else [])
        ax.set_title(f"{tool} (n={int(counts.sum())} positions)", fontsize=10)
        ax.set_xlabel("p_api (log scale)", fontsize=9)
        ax.set_ylabel("positions", fontsize=9)

    return _panels_png(list(counts_by_tool), draw)


# ----------------------------------------------------------------------------------------- examples

def pick_examples(candidates: pa.Table, tau_f_by_tool: dict[str, float],
                  per_tool: int) -> dict[str, list[dict]]:
    """Kept calls per tool spread over the range of L- - L+ (the best, the middle, near the
    threshold), so the examples show what the filter accepts, not only its easiest cases.
    Deterministic; only the chosen rows are converted to Python."""
    if candidates.num_rows == 0 or per_tool <= 0:
        return {}
    u = utilities(candidates)
    tools = np.asarray(candidates.column("tool").to_pylist(), dtype=object)
    kept = (candidates.column("kept") if "kept" in candidates.column_names
            else pa.chunked_array([pa.nulls(candidates.num_rows, pa.bool_())]))
    unknown = kept.is_null().to_numpy(zero_copy_only=False)
    kept = kept.fill_null(False).to_numpy(zero_copy_only=False)
    out = {}
    for tool in sorted(set(tools.tolist())):
        tau = tau_f_by_tool.get(tool)
        # Rows without a `kept` flag count as kept when they pass the tool's tau_f.
        passes = u >= tau if tau is not None else np.zeros(len(u), dtype=bool)
        flag = np.where(unknown, passes, kept)
        idx = np.flatnonzero((tools == tool) & flag & np.isfinite(u))
        if idx.size == 0:
            continue
        idx = idx[np.argsort(-u[idx], kind="stable")]
        chosen = idx[sorted(set(np.linspace(0, idx.size - 1,
                                            min(per_tool, idx.size)).round().astype(int)))]
        rows = candidates.take(pa.array(chosen)).to_pylist()
        out[tool] = [{**row, "utility": float(u[i])} for row, i in zip(rows, chosen)]
    return out


def _fenced(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"~+", text)), default=0)
    fence = "~" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def examples_markdown(examples: dict[str, list[dict]], doc_text: dict[str, str]) -> str:
    if not examples:
        return "_no kept calls_"
    parts = []
    for tool, rows in examples.items():
        parts.append(f"### {tool}")
        for row in rows:
            inserted = row.get("inserted_text") or ""
            text = doc_text.get(row["doc_id"])
            if text is not None and 0 <= (row.get("char_pos") or 0) <= len(text):
                pos = row["char_pos"]
                start = max(0, pos - CONTEXT_BEFORE)
                end = min(len(text), pos + CONTEXT_AFTER)
                snippet = (("…" if start else "") + text[start:pos] + inserted + text[pos:end]
                           + ("…" if end < len(text) else ""))
            else:
                snippet = inserted
            call = f"{tool}({_cell(row.get('call') or '')})"
            parts.append(
                f"- doc `{row['doc_id']}` at char {row.get('char_pos')}: call `{call}` → "
                f"result `{_cell(row.get('result'))}`; L- - L+ = {row['utility']:.3f} (L+ "
                f"{row['loss_plus']:.3f}, L(no call) {row['loss_no_call']:.3f}, L(no result) "
                f"{row['loss_call_no_result']:.3f}), p_api {row['p_api']:.3f}\n\n"
                + _indent(_fenced(snippet)))
    return "\n\n".join(parts)


def _indent(text: str) -> str:
    return "\n".join("  " + line if line else line for line in text.split("\n"))


# ------------------------------------------------------------------------------------------- report

def _values_by_tool(candidates: pa.Table, values: np.ndarray,
                    tools: list[str]) -> dict[str, np.ndarray]:
    names = np.asarray(candidates.column("tool").to_pylist(),
                       dtype=object) if candidates.num_rows else np.zeros(0)
    return {t: values[names == t] if values.size else np.zeros(0) for t in tools}


def write_report(store_or_dir: OutputStore | str, candidates: pa.Table,
                 funnel: dict[str, dict[str, int]],
                 timings: dict[str, Any], tau_f_by_tool: dict[str, float],
                 report_tau_f: list[float],
                 *, documents: pa.Table | None = None,
                 tau_s_by_tool: dict[str, float] | None = None,
                 examples_per_tool: int = 3, title: str = "Toolformer data generation report",
                 storage_options: dict | None = None,
                 p_api_positions: dict[str, list[int]] | None = None) -> str:
    """Write report.md, p_api.png and utility.png to `<version>/report/` and return report.md's URI.

    store_or_dir  an OutputStore, or an output-version directory (local or s3://)
    candidates    rows of schema.CANDIDATES_SCHEMA (or CALLS_SCHEMA: then every row counts as kept)
    funnel        {tool: {FUNNEL_KEYS: n}} summed over the shards
    documents     doc_id + text, for the context of the examples; read from the store when omitted
    """
    if isinstance(store_or_dir, OutputStore):
        fs = store_or_dir.fs
        report_dir = store_or_dir.path("report")
        uri_of = lambda name: store_or_dir.uri("report", name)  # noqa: E731
    else:
        fs, root = fsspec.core.url_to_fs(str(store_or_dir), **(storage_options or {}))
        report_dir = root.rstrip("/") + "/report"
        uri_of = lambda name: (f"{report_dir}/{name}" if "://" not in str(store_or_dir)  # noqa: E731
                               else fs.unstrip_protocol(f"{report_dir}/{name}"))
    tau_s_by_tool = tau_s_by_tool or {}
    tools = list(dict.fromkeys([*funnel, *sorted(set(candidates.column("tool").to_pylist()))]))

    u = utilities(candidates)
    if candidates.num_rows:
        p_api = candidates.column("p_api").to_numpy(zero_copy_only=False).astype(float)
    else:
        p_api = np.zeros(0)
    p_png = histogram_png(_values_by_tool(candidates, p_api, tools), "p_api",
                          {t: [(tau_s_by_tool[t], "-", f"tau_s = {tau_s_by_tool[t]:g}")]
                           for t in tools if t in tau_s_by_tool},
                          bins=np.linspace(0, 1, 41))
    u_png = histogram_png(_values_by_tool(candidates, u, tools), "L- - L+",
                          {t: [(tau_f_by_tool[t], "-", f"tau_f = {tau_f_by_tool[t]:g}")]
                           + [(x, ":", None) for x in report_tau_f if x != tau_f_by_tool[t]]
                           for t in tools if t in tau_f_by_tool})
    put_bytes(fs, f"{report_dir}/p_api.png", p_png)
    if p_api_positions:
        put_bytes(fs, f"{report_dir}/p_api_positions.png",
                  positions_png(p_api_positions, tau_s_by_tool))
    put_bytes(fs, f"{report_dir}/utility.png", u_png)

    if "kept" not in candidates.column_names:
        candidates = candidates.append_column("kept",
                                              pa.array([True] * candidates.num_rows, pa.bool_()))
    examples = pick_examples(candidates, tau_f_by_tool, examples_per_tool)
    wanted = sorted({row["doc_id"] for rows in examples.values() for row in rows})
    doc_text: dict[str, str] = {}
    if wanted:
        if documents is None and isinstance(store_or_dir, OutputStore):
            documents = store_or_dir.read_table("documents", columns=["doc_id", "text"],
                                                filter=pc.field("doc_id").isin(wanted))
        if documents is not None:
            documents = documents.filter(pc.is_in(documents.column("doc_id"), pa.array(wanted)))
            doc_text = dict(zip(documents.column("doc_id").to_pylist(),
                                documents.column("text").to_pylist()))

    n_kept = int(pc.sum(candidates.column("kept")).as_py() or 0) if candidates.num_rows else 0
    md = [
        f"# {title}", "",
        f"{candidates.num_rows:,} scored calls, {n_kept:,} kept, tools: "
        f"{', '.join(tools) or 'none'}.", "",
        "## Funnel", "",
        "Counts summed over the shards; the `recomputed` rows count the scored calls with "
        "min(L(no call), L(call, no result)) - L(call, result) >= tau (the paper's Table 2).", "",
        funnel_markdown(funnel, candidates, report_tau_f, tau_f_by_tool), "",
        "## Distributions", "",
        "p_api = p(API start | prompt, x_<i) at each sampled position (the tool's tau_s as a red "
        "line):", "",
        "![p_api per tool](p_api.png)", "",
        *(["p_api at every usable position of the documents that passed the pre-filter (log scale; "
           "positions "
           "right of tau_s are candidates, the top k of a document are sampled):", "",
           "![p_api at all positions](p_api_positions.png)", ""] if p_api_positions else []),
        "L- - L+ of every scored call (the tool's tau_f solid, the report's other tau_f dotted):",
          "",
        "![L- - L+ per tool](utility.png)", "",
        "## Examples of kept calls", "",
        examples_markdown(examples, doc_text), "",
        "## Timings", "",
        timings_markdown(timings), "",
    ]
    put_bytes(fs, f"{report_dir}/report.md", "\n".join(md).encode("utf-8"))
    return uri_of("report.md")


def report_from_store(store: OutputStore, tau_f_by_tool: dict[str, float],
                      report_tau_f: list[float],
                      tau_s_by_tool: dict[str, float] | None = None,
                      timings: dict[str, Any] | None = None,
                      **kwargs) -> str:
    """The report of a whole output version: candidates over its committed shards, funnel and
    timings from the manifest (or summed from the commit records if there is no manifest yet)."""
    positions: dict[str, np.ndarray] = {}
    for record in store.readable_units().values():
        for tool, counts in (record.get("p_api_hist") or {}).items():
            positions[tool] = positions.get(tool, 0) + np.asarray(counts)
    kwargs.setdefault("p_api_positions", {t: c.tolist() for t, c in positions.items()})
    manifest = store.read_manifest()
    if manifest is not None:
        funnel = manifest.get("funnel", {})
        stage_timings = manifest.get("timings", {})
    else:
        records = list(store.readable_units().values())
        funnel = sum_funnels(records)
        stage_timings = sum_timings(records)
    return write_report(store, store.read_table("candidates"), funnel,
                        {**stage_timings, **(timings or {})},
                        tau_f_by_tool, report_tau_f, tau_s_by_tool=tau_s_by_tool, **kwargs)
