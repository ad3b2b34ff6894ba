"""A tiny model taught to write calculator calls, so end-to-end tests have calls to keep.

The random tiny model never closes a call; a few seconds of training on synthetic arithmetic text with
calls inline makes it write `Calculator(a + b)]` after " [" often enough. Built once (seeded, deterministic)
into the model cache, like the tiny model itself.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from toolformer_ray.fsutil import publish_dir
from toolformer_ray.models import _tmp_dir, _write_revision, cache_root, load_model, tiny_model_dir

NAMES = ["Alice", "Bob", "Carol", "Dan", "Eve", "Frank", "Grace", "Heidi"]
ITEMS = ["apples", "books", "coins", "stamps", "shells", "cards"]


def arithmetic_sentence(rng: random.Random, with_call: bool) -> str:
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if rng.random() < 0.5:
        op, res, verb = "+", a + b, f"got {b} more"
    else:
        a = a + b
        op, res, verb = "-", a - b, f"gave away {b}"
    call = f" [Calculator({a} {op} {b})]" if with_call else ""
    return f"{name} had {a} {item} and {verb}, so {name} had{call} {res} {item} in total."


def corpus_records(n: int, seed: int = 0, prefix: str = "doc") -> list[dict]:
    rng = random.Random(seed)
    return [{"id": f"{prefix}-{i}", "text": arithmetic_sentence(rng, with_call=False), "date": "2023-01-30"}
            for i in range(n)]


def caller_model_dir(cache_dir=None, steps: int = 50) -> Path:
    base = tiny_model_dir(cache_dir)
    target = cache_root(cache_dir) / f"tiny-caller-v1-{steps}-{base.name}"
    if (target / "revision.json").is_file():
        return target
    torch.manual_seed(0)
    lm = load_model(str(base), dtype="float32")
    model, tok = lm.model, lm.tokenizer
    model.train()
    rng = random.Random(0)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(steps):
        texts = [arithmetic_sentence(rng, with_call=True) for _ in range(8)]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    tmp = _tmp_dir(target)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps({"steps": steps, "final_loss": float(loss.detach())}))
    _write_revision(tmp, {"source": "tiny-caller", "steps": steps})
    publish_dir(tmp, target)
    return target
