"""Check a data-job output from the output alone: `toolformer-ray verify <output>/<config_hash>`.

Every kept row holds the document id, the position i, the call, its result and the three losses.
Here the two prefixes are re-rendered from the call and the result (the stored prefix strings must
equal them), and each loss is recomputed with the row's model by one plain forward over the whole
scoring sequence [BOS if the tokenizer adds one] + prefix + document (no KV cache, no packing, no
i + 5 cut):

    L+ = L_i(e(c, r))      L-(no call) = L_i(empty)      L-(no result) = L_i(e(c, empty))

and the filter is re-checked: min(L-(no call), L-(no result)) - L+ >= tau_f. It also checks that
char_pos is token i's place in the text (the document's first i tokens decode to the text up to
char_pos), that the augmented text is the original with the kept calls inserted at their char_pos,
and re-scores a seeded sample of the rejected candidates, so that a bug that under-keeps shows too.
The losses come from core/reference.py (the brute-force reference the tests hold the fast path to),
which shares no code with core/scoring.py, so this is an independent check of the fast path.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from toolformer_ray.api_text import Markers, strip_calls
from toolformer_ray.core.lm import bos_ids
from toolformer_ray.core.reference import loss_ref
from toolformer_ray.errors import UserError
from toolformer_ray.models import load_model, pick_device
from toolformer_ray.storage import OutputStore


@dataclass
class VerifyReport:
    version: str
    checked: int = 0
    max_abs_diff: float = 0.0
    diffs: list[float] = field(default_factory=list)
    rejected_checked: int = 0
    # rows whose losses differ by more than tolerance
    mismatches: list[str] = field(default_factory=list)
    filter_violations: list[str] = field(default_factory=list)  # kept rows that do not pass tau_f
    # docs whose augmented text != text + calls
    text_mismatches: list[str] = field(default_factory=list)
    # prefixes / positions that do not match the call
    row_mismatches: list[str] = field(default_factory=list)
    # rejected rows that pass tau_f with nothing kept there
    under_kept: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.mismatches or self.filter_violations or self.text_mismatches
                    or self.row_mismatches or self.under_kept)

    def describe(self, tolerance: float) -> str:
        median = sorted(self.diffs)[len(self.diffs) // 2] if self.diffs else 0.0
        lines = [f"verified {self.checked} kept and {self.rejected_checked} rejected call(s) of "
                 f"{self.version}: |recomputed - stored| loss median {median:.2e}, max "
                 f"{self.max_abs_diff:.2e} (tolerance {tolerance:g})"]
        for title, items in (("losses differ", self.mismatches),
                             ("kept but below tau_f", self.filter_violations),
                             ("augmented text is not text + calls", self.text_mismatches),
                             ("row does not match its call or position", self.row_mismatches),
                             ("rejected but passes tau_f, nothing kept there", self.under_kept)):
            if items:
                lines.append(f"{title}: {len(items)}")
                lines += [f"  {item}" for item in items[:10]]
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


def rendered_call(markers, tool: str, arg: str, result: str | None, with_result: bool) -> str:
    """e(c, r) or e(c, empty), written out here from the markers (not by api_text.render)."""
    tail = f"{markers.result} {result}" if with_result else markers.result
    return f"{markers.start}{tool}({arg}){tail}{markers.end}"


def _sample_rejected(rows: list[dict], n: int, seed: int) -> list[dict]:
    rejected = [r for r in rows if not r["kept"]]
    rejected.sort(key=lambda r: (r["doc_id"], r["tool"], r["token_pos"], r["call"]))
    return random.Random(seed).sample(rejected, min(n, len(rejected)))


def verify_output(version_uri: str, limit: int | None = None, dtype: str | None = None,
                  tolerance: float | None = None, model_path: str | None = None,
                  device: str = "auto", rejected: int = 20,
                  seed: int = 0) -> tuple[VerifyReport, float]:
    """Recompute up to `limit` kept calls of one output version, and `rejected` rejected candidates
    drawn with `seed`. dtype defaults to the run's. A float32 run must agree to 1e-4; in bf16 each
    logit carries ~2^-8 relative rounding, which moves a token's NLL by up to ~0.1 between two
    computations (measured on SmolLM2: max 0.08 over 117 calls), hence 0.15 there."""
    parent, _, config_hash = version_uri.rstrip("/").rpartition("/")
    store = OutputStore(parent or ".", config_hash)
    manifest = store.read_manifest()
    if manifest is None:
        raise UserError(f"{version_uri} holds no manifest.json: give <run.output>/<config_hash>")
    calls = store.read_table("calls").to_pylist()
    candidates = store.read_table("candidates").to_pylist()
    docs = {d["doc_id"]: d for d in store.read_table("documents").to_pylist()}
    report = VerifyReport(version=version_uri)

    config = manifest.get("config") or {}
    marker_cfg = config.get("markers") or {}
    markers = Markers(**{k: marker_cfg[k] for k in ("start", "result", "end") if k in marker_cfg})
    separator = (config.get("filtering") or {}).get("prefix_separator", "\n")
    calls_per_doc: dict[str, list[dict]] = {}
    for row in calls:
        calls_per_doc.setdefault(row["doc_id"], []).append(row)
    for d in docs.values():
        kept = calls_per_doc.get(d["doc_id"], [])
        if d.get("augmented_text") is not None:
            if strip_calls(d["augmented_text"], markers) != d["text"]:
                report.text_mismatches.append(f"{d['doc_id']}: stripping the calls does not give "
                                              "the text back")
            rebuilt = []  # the text with each kept call, re-rendered, at its char_pos
            pos = 0
            for row in sorted(kept, key=lambda r: r["char_pos"]):
                call = rendered_call(markers, row["tool"], row["call"], row["result"], True)
                rebuilt += [d["text"][pos:row["char_pos"]],
                            call.lstrip() if row["char_pos"] == 0 else call]
                pos = row["char_pos"]
            if "".join(rebuilt) + d["text"][pos:] != d["augmented_text"]:
                report.text_mismatches.append(f"{d['doc_id']}: the augmented text is not the text "
                                              "with the kept calls at their char_pos")
        if d.get("n_calls", 0) != len(kept):
            report.text_mismatches.append(f"{d['doc_id']}: n_calls {d.get('n_calls')} but "
                                          f"{len(kept)} call row(s)")
    sample = _sample_rejected(candidates, rejected, seed)
    if not calls and not sample:
        return report, tolerance or 0.0

    first = (calls or sample)[0]
    dtype = dtype or first["dtype"]
    if tolerance is None:
        tolerance = 1e-4 if dtype == "float32" else 0.15
    lm = load_model(model_path or first["model"], dtype=dtype, device=pick_device(device))
    if lm.revision != first["model_revision"]:
        raise UserError(f"the model at {lm.path} has revision {lm.revision}, the rows were made "
                        f"with {first['model_revision']}: pass --model with the run's weights")
    tok = lm.tokenizer
    bos = bos_ids(tok)

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    kept_at = {(r["doc_id"], r["token_pos"]) for r in calls}
    kept_per_tool: dict[str, int] = {}
    for r in calls:
        kept_per_tool[r["tool"]] = kept_per_tool.get(r["tool"], 0) + 1
    tools_cfg = config.get("tools") or {}
    for row in calls[:limit] + sample:
        text = docs[row["doc_id"]]["text"]
        doc_ids = ids(text)
        i = row["token_pos"]
        where = f"{row['doc_id']} @ token {i} {row['call']!r}"
        plus = rendered_call(markers, row["tool"], row["call"], row["result"],
                             True).lstrip() + separator
        no_result = rendered_call(markers, row["tool"], row["call"], None,
                                  False).lstrip() + separator
        if (row["prefix_plus"], row["prefix_no_result"]) != (plus, no_result):
            report.row_mismatches.append(f"{where}: stored prefixes {row['prefix_plus']!r}, "
                                         f"{row['prefix_no_result']!r} are not the call's "
                                         f"{plus!r}, {no_result!r}")
        if not 0 <= i < len(doc_ids) or tok.decode(doc_ids[:i]) != text[:row["char_pos"]]:
            report.row_mismatches.append(f"{where}: char_pos {row['char_pos']} is not token {i}'s "
                                         "place")
            continue
        recomputed = {"loss_plus": loss_ref(lm.model, bos, ids(plus), doc_ids, i),
                      "loss_no_call": loss_ref(lm.model, bos, [], doc_ids, i),
                      "loss_call_no_result": loss_ref(lm.model, bos, ids(no_result), doc_ids, i)}
        for name, value in recomputed.items():
            diff = abs(value - row[name])
            report.max_abs_diff = max(report.max_abs_diff, diff)
            report.diffs.append(diff)
            if diff > tolerance:
                report.mismatches.append(f"{where}: {name} stored {row[name]:.5f}, recomputed "
                                         f"{value:.5f}")
        gain = min(recomputed["loss_no_call"],
                   recomputed["loss_call_no_result"]) - recomputed["loss_plus"]
        if "kept" not in row:
            if gain < row["tau_f"] - tolerance:
                report.filter_violations.append(f"{where}: L- - L+ = {gain:.4f} < tau_f "
                                                f"{row['tau_f']}")
            report.checked += 1
            continue
        # A rejected call that passes tau_f must have lost its position to another call, or its
        # tool's cap.
        cap = (tools_cfg.get(row["tool"]) or {}).get("max_kept")
        capped = cap is not None and kept_per_tool.get(row["tool"], 0) >= cap
        if gain >= row["tau_f"] + tolerance and (row["doc_id"], i) not in kept_at and not capped:
            report.under_kept.append(f"{where}: L- - L+ = {gain:.4f} >= tau_f {row['tau_f']}, "
                                     "nothing kept")
        report.rejected_checked += 1
    return report, tolerance
