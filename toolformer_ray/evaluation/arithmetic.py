"""Synthetic arithmetic text: documents for the calculator to annotate, and a held-out word-problem set.

The Wikipedia-derived corpus has few sentences where a number is the result of an operation on two
others, so the learning-outcome run adds generated documents (narratives and question/answer pairs with
the result written out). The evaluation set is IN-DISTRIBUTION: its questions come from the same four
question templates (`_question`) and the same number ranges (`_problem`) as the training documents' question/
answer pairs; only the names and items differ (EVAL_NAMES, EVAL_ITEMS), and some evaluation problems repeat
a training problem's numbers. A score on it says the model learned to call the calculator on this kind of
question, not that it generalises to other wordings: MAWPS and GSM8K are the out-of-distribution sets.
"""
from __future__ import annotations

import json
import random

TRAIN_NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack", "Kate", "Leo"]
EVAL_NAMES = ["Maria", "Noah", "Olivia", "Peter", "Quinn", "Rosa", "Sam", "Tina"]
TRAIN_ITEMS = ["apples", "books", "coins", "marbles", "stickers", "pencils", "cookies", "stamps", "shells"]
EVAL_ITEMS = ["oranges", "cards", "toys", "balloons", "candies", "flowers"]


def _problem(rng: random.Random):
    """(a, op, b, result) with small integers and an exact result."""
    op = rng.choice("+-*/")
    if op == "+":
        a, b = rng.randint(2, 400), rng.randint(2, 400)
        return a, op, b, a + b
    if op == "-":
        a = rng.randint(20, 500)
        b = rng.randint(2, a - 1)
        return a, op, b, a - b
    if op == "*":
        a, b = rng.randint(2, 30), rng.randint(2, 25)
        return a, op, b, a * b
    b, r = rng.randint(2, 20), rng.randint(2, 30)
    return b * r, op, b, r


def _narrative(rng: random.Random, names, items) -> str:
    a, op, b, r = _problem(rng)
    n, it = rng.choice(names), rng.choice(items)
    if op == "+":
        s = rng.choice([f"{n} had {a} {it} and got {b} more, so {n} had {r} {it} in total.",
                        f"There were {a} {it} in one box and {b} in another, a total of {r} {it}.",
                        f"{n} collected {a} {it} on Monday and {b} on Tuesday, {r} {it} altogether."])
    elif op == "-":
        s = rng.choice([f"{n} had {a} {it} and gave away {b}, so {n} had {r} {it} left.",
                        f"Of the {a} {it}, {b} were sold and {r} remained.",
                        f"{n} started with {a} {it} and lost {b}, leaving {r} {it}."])
    elif op == "*":
        s = rng.choice([f"Each of the {a} bags holds {b} {it}, so the bags hold {r} {it}.",
                        f"{n} bought {a} packs of {b} {it}, which is {r} {it}.",
                        f"There are {a} rows with {b} {it} each, {r} {it} in all."])
    else:
        s = rng.choice([f"{n} shared {a} {it} equally among {b} friends, so each friend got {r} {it}.",
                        f"The {a} {it} were packed into {b} boxes, {r} {it} per box.",
                        f"Split evenly between {b} classes, {a} {it} make {r} {it} per class."])
    return s


def _question(rng: random.Random, names, items) -> tuple[str, int]:
    a, op, b, r = _problem(rng)
    n, it = rng.choice(names), rng.choice(items)
    q = {"+": f"{n} has {a} {it} and buys {b} more. How many {it} does {n} have now?",
         "-": f"{n} has {a} {it} and gives {b} of them away. How many {it} does {n} have left?",
         "*": f"{n} buys {a} packs with {b} {it} in each pack. How many {it} does {n} buy?",
         "/": f"{n} shares {a} {it} equally among {b} friends. How many {it} does each friend get?"}[op]
    return q, r


def training_documents(n: int, seed: int = 0) -> list[dict]:
    """Arithmetic documents to annotate: narratives and question/answer pairs (train names and items)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        if rng.random() < 0.5:
            text = " ".join(_narrative(rng, TRAIN_NAMES, TRAIN_ITEMS) for _ in range(rng.randint(1, 3)))
        else:
            q, r = _question(rng, TRAIN_NAMES, TRAIN_ITEMS)
            text = f"Question: {q}\nAnswer: {r}"
        docs.append({"id": f"arith-{seed}-{i}", "text": text, "source": "generated-arithmetic"})
    return docs


def eval_set(n: int, seed: int = 1) -> list[dict]:
    """Word problems in GSM8K's jsonl format ({"question", "answer": "... #### N"}): held-out names and items,
    the training documents' templates and number ranges (in-distribution, see the module's docstring)."""
    rng = random.Random(10_000 + seed)
    out = []
    for _ in range(n):
        q, r = _question(rng, EVAL_NAMES, EVAL_ITEMS)
        out.append({"question": q, "answer": f"#### {r}"})
    return out


def write_jsonl(path, records: list[dict]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
