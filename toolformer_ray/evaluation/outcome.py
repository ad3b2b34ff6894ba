"""The learning outcome as one table: base vs fine-tuned, tools off and on, per evaluation set, with
each set's distance from the training text, its n and 95 % intervals; plus a few transcripts to
read."""
from __future__ import annotations

import json
import math
from pathlib import Path

from toolformer_ray.evaluation.report import EvalRow


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k/n (sound at 0 and n, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _cell(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{100 * k / n:.0f}% [{100 * lo:.0f}-{100 * hi:.0f}]"


def outcome_rows(rows: list[EvalRow], distributions: dict[str, str], base: str,
                 tuned: str) -> list[dict]:
    """One record per data set: n, correct and calls for (model, mode), perplexity rows apart."""
    by = {(r.data, r.model, r.mode): r for r in rows}
    out = []
    for data in dict.fromkeys(r.data for r in rows):
        rec = {"set": data, "distribution": distributions.get(data, "?")}
        for who, label in (("base", base), ("tuned", tuned)):
            for mode in ("disabled", "tools"):
                r = by.get((data, label, mode))
                if r is None:
                    continue
                if r.perplexity is not None:
                    rec[f"{who}_ppl"] = r.perplexity
                    rec["n"] = r.n
                    continue
                rec["n"] = r.n
                rec[f"{who}_{mode}"] = {"correct": r.correct, "calls": r.with_call}
        out.append(rec)
    return out


def outcome_markdown(records: list[dict]) -> str:
    lines = ["| set | distribution | n | base, tools off | base, tools on | "
             "fine-tuned, tools off | "
             "fine-tuned, tools on | fine-tuned: with call |",
             "|---|---|---:|---|---|---|---|---:|"]
    for rec in records:
        n = rec.get("n", 0)
        if "base_ppl" in rec or "tuned_ppl" in rec:
            b, t = rec.get("base_ppl"), rec.get("tuned_ppl")
            ratio = f" ({100 * (t / b - 1):+.1f}%)" if b and t else ""
            lines.append(f"| {rec['set']} | {rec['distribution']} | {n} | ppl {b:.2f} | | "
                         f"ppl {t:.2f}{ratio} | | |")
            continue
        cells = []
        for key in ("base_disabled", "base_tools", "tuned_disabled", "tuned_tools"):
            cells.append(_cell(rec[key]["correct"], n) if key in rec and n else "-")
        calls = (f"{100 * rec['tuned_tools']['calls'] / n:.0f}%" if "tuned_tools" in rec and n
                 else "-")
        lines.append(f"| {rec['set']} | {rec['distribution']} | {n} | " + " | ".join(cells)
                     + f" | {calls} |")
    lines.append("Accuracy with its 95 % Wilson interval; tools on = the paper's decoding rule "
                 "(call when \" [\" is in the top 10, at most one call).")
    return "\n".join(lines)


def transcripts(eval_output: str, model_label: str, data_label: str, k: int = 3) -> list[str]:
    """Up to k fine-tuned, tools-on outputs that called a tool, right answers first."""
    path = Path(eval_output) / "predictions" / f"{model_label}__math-{data_label}__tools.jsonl"
    if not path.is_file():
        return []
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    called = sorted((r for r in recs if r["calls"]), key=lambda r: not r["correct"])
    out = []
    for r in called[:k]:
        question = r["prompt"].split("\n")[0].removeprefix("Question: ")
        mark = "right" if r["correct"] else "wrong"
        out.append(f"Q: {question}\nA:{r['output'].rstrip()}   ({mark}; gold {r['answers'][0]})")
    return out
