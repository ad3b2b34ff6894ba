"""Check a data-job output from the output alone: `toolformer-ray verify <output>/<config_hash>`.

Every kept row holds the document id, the position i, the two prefixes the model was conditioned on (the
call with its result, and the call without one) and the three losses. Here each loss is recomputed with the
row's model by one plain forward over the whole prefix + document (no KV cache, no packing, no i + 5 cut):

    L+          = L_i(e(c, r))        L-(no call) = L_i(empty)        L-(no result) = L_i(e(c, empty))

and the filter is re-checked: min(L-(no call), L-(no result)) - L+ >= tau_f. It also checks that the
augmented text is the original text plus the kept calls. Nothing here shares code with core/scoring.py
except the loss weights' formula, so it is an independent check of the fast path's arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from toolformer_ray.core.scoring import loss_weights


@dataclass
class VerifyReport:
    version: str
    checked: int = 0
    max_abs_diff: float = 0.0
    diffs: list[float] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)  # rows whose losses differ by more than tolerance
    filter_violations: list[str] = field(default_factory=list)  # kept rows that do not pass tau_f
    text_mismatches: list[str] = field(default_factory=list)  # docs whose augmented text != text + calls

    @property
    def ok(self) -> bool:
        return not (self.mismatches or self.filter_violations or self.text_mismatches)

    def describe(self, tolerance: float) -> str:
        median = sorted(self.diffs)[len(self.diffs) // 2] if self.diffs else 0.0
        lines = [f"verified {self.checked} kept call(s) of {self.version}: |recomputed - stored| loss "
                 f"median {median:.2e}, max {self.max_abs_diff:.2e} (tolerance {tolerance:g})"]
        for title, items in (("losses differ", self.mismatches), ("kept but below tau_f", self.filter_violations),
                             ("augmented text is not text + calls", self.text_mismatches)):
            if items:
                lines.append(f"{title}: {len(items)}")
                lines += [f"  {item}" for item in items[:10]]
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


@torch.no_grad()
def plain_loss(model, prefix_ids: list[int], doc_ids: list[int], i: int) -> float:
    """L_i(z) = sum_t w_t * -log p(x_{i+t} | z, x_<i+t), from one full forward over z + x (fp32 softmax)."""
    seq = torch.tensor([prefix_ids + doc_ids], device=model.device)
    logp = torch.log_softmax(model(seq).logits[0].float(), -1)
    total = 0.0
    for t, w in enumerate(loss_weights()):
        j = i + t
        if j >= len(doc_ids):
            break
        pos = len(prefix_ids) + j  # the token being predicted; its logits sit at pos - 1
        if pos == 0:
            continue  # the very first token has no context: the fast path leaves it out too
        total += w * float(-logp[pos - 1, doc_ids[j]])
    return total


def verify_output(version_uri: str, limit: int | None = None, dtype: str | None = None,
                  tolerance: float | None = None, model_path: str | None = None,
                  device: str = "auto") -> tuple[VerifyReport, float]:
    """Recompute up to `limit` kept calls of one output version. dtype defaults to the run's. A float32 run
    must agree to 1e-4; in bf16 each logit carries ~2^-8 relative rounding, which moves a token's NLL by up
    to ~0.1 between two computations (measured on SmolLM2: max 0.08 over 117 calls), hence 0.15 there."""
    from toolformer_ray.api_text import Markers, strip_calls
    from toolformer_ray.errors import UserError
    from toolformer_ray.models import load_model, pick_device
    from toolformer_ray.storage import OutputStore

    parent, _, config_hash = version_uri.rstrip("/").rpartition("/")
    store = OutputStore(parent or ".", config_hash)
    manifest = store.read_manifest()
    if manifest is None:
        raise UserError(f"{version_uri} holds no manifest.json: give <run.output>/<config_hash>")
    calls = store.read_table("calls").to_pylist()
    docs = {d["doc_id"]: d for d in store.read_table("documents").to_pylist()}
    report = VerifyReport(version=version_uri)

    marker_cfg = (manifest.get("config") or {}).get("markers") or {}
    markers = Markers(**{k: marker_cfg[k] for k in ("start", "result", "end") if k in marker_cfg})
    calls_per_doc: dict[str, int] = {}
    for row in calls:
        calls_per_doc[row["doc_id"]] = calls_per_doc.get(row["doc_id"], 0) + 1
    for d in docs.values():
        if d.get("augmented_text") is not None and strip_calls(d["augmented_text"], markers) != d["text"]:
            report.text_mismatches.append(f"{d['doc_id']}: stripping the calls does not give the text back")
        if d.get("n_calls", 0) != calls_per_doc.get(d["doc_id"], 0):
            report.text_mismatches.append(f"{d['doc_id']}: n_calls {d.get('n_calls')} but "
                                          f"{calls_per_doc.get(d['doc_id'], 0)} call row(s)")
    if not calls:
        return report, tolerance or 0.0

    dtype = dtype or calls[0]["dtype"]
    if tolerance is None:
        tolerance = 1e-4 if dtype == "float32" else 0.15
    lm = load_model(model_path or calls[0]["model"], dtype=dtype, device=pick_device(device))
    if lm.revision != calls[0]["model_revision"]:
        raise UserError(f"the model at {lm.path} has revision {lm.revision}, the rows were made with "
                        f"{calls[0]['model_revision']}: pass --model with the run's weights")
    tok = lm.tokenizer

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    for row in calls[:limit]:
        doc_ids = ids(docs[row["doc_id"]]["text"])
        i = row["token_pos"]
        recomputed = {"loss_plus": plain_loss(lm.model, ids(row["prefix_plus"]), doc_ids, i),
                      "loss_no_call": plain_loss(lm.model, [], doc_ids, i),
                      "loss_call_no_result": plain_loss(lm.model, ids(row["prefix_no_result"]), doc_ids, i)}
        where = f"{row['doc_id']} @ token {i} {row['call']!r}"
        for name, value in recomputed.items():
            diff = abs(value - row[name])
            report.max_abs_diff = max(report.max_abs_diff, diff)
            report.diffs.append(diff)
            if diff > tolerance:
                report.mismatches.append(f"{where}: {name} stored {row[name]:.5f}, recomputed {value:.5f}")
        gain = min(recomputed["loss_no_call"], recomputed["loss_call_no_result"]) - recomputed["loss_plus"]
        if gain < row["tau_f"] - tolerance:
            report.filter_violations.append(f"{where}: L- - L+ = {gain:.4f} < tau_f {row['tau_f']}")
        report.checked += 1
    return report, tolerance
