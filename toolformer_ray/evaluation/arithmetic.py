"""Synthetic arithmetic text to annotate, and evaluation sets that say how far what was learned
carries.

Training text (`training_documents`): short prose in which a number is the result of an operation on
numbers written before it: narratives, shop receipts, worked explanations ("subtract: 250 - 75
leaves 175"), with one-step operations (+ - * /) and two compound shapes (a * b + c, (a + b) * c).
It never uses a "Question: ... Answer:" pair, the format of the evaluation prompts, nor the words of
the evaluation templates.

Evaluation sets (GSM8K's jsonl format, {"question", "answer": "... #### N"}), each with its distance
from the training text (`EVAL_SETS`):
- `near`: the training text's operations, number ranges, names and items, asked as a question (a
  form the training text never has): NEAR distribution.
- `one_step`: one operation, other templates, other names and units, other number ranges (4-digit
  sums and differences, 2-digit x 2-digit products, 3-digit quotients): OUT of distribution.
- `multi_digit`: products of a 3-digit and a 2- or 3-digit number, decimal prices: OUT of
  distribution.
- `compound`: means of 3-4 numbers, percentages, discounts, rates, change after a purchase:
  expressions of shapes the training text never has; one call must hold the whole expression: OUT of
  distribution.
MAWPS and GSM8K (../shared/data/eval) are public sets written by other people: OUT of distribution.
"""
from __future__ import annotations

import json
import random

TRAIN_NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack",
               "Kate", "Leo"]
TRAIN_ITEMS = ["apples", "books", "coins", "marbles", "stickers", "pencils", "cookies", "stamps",
               "shells"]
EVAL_NAMES = ["Maria", "Noah", "Olivia", "Peter", "Quinn", "Rosa", "Sam", "Tina", "Umar", "Vera"]
EVAL_ITEMS = ["oranges", "cards", "toys", "balloons", "candies", "flowers"]


# ------------------------------------------------------------------------------------ training text
def _one_step(rng: random.Random) -> tuple[int, str, int, int]:
    """(a, op, b, result) in the training ranges, with an exact result."""
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
    a, op, b, r = _one_step(rng)
    n, it = rng.choice(names), rng.choice(items)
    forms = {
        "+": [f"{n} had {a} {it} and got {b} more, so {n} had {r} {it} in total.",
              f"There were {a} {it} in one box and {b} in another, a total of {r} {it}.",
              f"{n} collected {a} {it} on Monday and {b} on Tuesday, {r} {it} altogether.",
              f"Adding {b} {it} to the {a} already on the shelf gives {r} {it}."],
        "-": [f"{n} had {a} {it} and gave away {b}, so {n} had {r} {it} left.",
              f"Of the {a} {it}, {b} were sold and {r} remained.",
              f"{n} started with {a} {it} and lost {b}, leaving {r} {it}.",
              f"To find how many {it} are left, subtract: {a} - {b} leaves {r}."],
        "*": [f"Each of the {a} bags holds {b} {it}, so the bags hold {r} {it}.",
              f"{n} bought {a} packs of {b} {it}, which is {r} {it}.",
              f"There are {a} rows with {b} {it} each, {r} {it} in all.",
              f"Receipt: {a} {it} at {b} dollars each, {r} dollars."],
        "/": [f"{n} shared {a} {it} equally among {b} friends, so each friend got {r} {it}.",
              f"The {a} {it} were packed into {b} boxes, {r} {it} per box.",
              f"Split evenly between {b} classes, {a} {it} make {r} {it} per class.",
              f"{a} {it} in groups of {b} make {r} groups."],
    }[op]
    return rng.choice(forms)


def _two_step(rng: random.Random, names, items) -> str:
    n, it = rng.choice(names), rng.choice(items)
    a, b, c = rng.randint(2, 12), rng.randint(2, 12), rng.randint(2, 40)
    if rng.random() < 0.5:
        r = a * b + c
        return rng.choice([f"{n} had {a} bags of {b} {it} and {c} loose ones, {r} {it} in all.",
                           f"{a} boxes of {b} {it} plus {c} more make {r} {it}."])
    r = (a + b) * c
    return rng.choice([f"{n} packed {a} crates on Monday and {b} on Tuesday, "
                       f"{c} {it} in each crate, "
                       f"so {r} {it} were packed.",
                       f"With {a} red and {b} blue jars of {c} {it} each there are {r} {it}."])


def training_documents(n: int, seed: int = 0, sentences: tuple[int, int] = (1, 3)) -> list[dict]:
    """Arithmetic prose to annotate: sentences[0] to sentences[1] sentences per document (train
    names and items)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        parts = [(_two_step if rng.random() < 0.25 else _narrative)(rng, TRAIN_NAMES, TRAIN_ITEMS)
                 for _ in range(rng.randint(*sentences))]
        docs.append({"id": f"arith-{seed}-{i}", "text": " ".join(parts),
                     "source": "generated-arithmetic"})
    return docs


# ---------------------------------------------------------------------------------- evaluation sets
def _near(rng: random.Random) -> tuple[str, float]:
    a, op, b, r = _one_step(rng)
    n, it = rng.choice(TRAIN_NAMES), rng.choice(TRAIN_ITEMS)
    q = {"+": f"{n} has {a} {it} and buys {b} more. How many {it} does {n} have now?",
         "-": f"{n} has {a} {it} and gives {b} of them away. How many {it} does {n} have left?",
         "*": f"{n} buys {a} packs with {b} {it} in each pack. How many {it} does {n} buy?",
         "/": f"{n} shares {a} {it} equally among {b} friends. "
              f"How many {it} does each friend get?"}[op]
    return q, r


def _one_step_ood(rng: random.Random) -> tuple[str, float]:
    n = rng.choice(EVAL_NAMES)
    op = rng.choice("+-*/")
    if op == "+":
        a, b = rng.randint(1000, 9999), rng.randint(1000, 9999)
        q = rng.choice([f"A library owned {a} volumes and received a donation of {b}. How large is "
                        f"the collection now?",
                        f"{n} drove {a} km in spring and {b} km in summer. What distance is that?"])
        return q, a + b
    if op == "-":
        a = rng.randint(2000, 9999)
        b = rng.randint(1000, a - 1)
        q = rng.choice([f"A stadium seats {a} people and {b} tickets are sold. How many seats are "
                        f"still free?",
                        f"{n}'s savings account held {a} euros before a withdrawal of {b} euros. "
                        f"What "
                        f"is the balance?"])
        return q, a - b
    if op == "*":
        a, b = rng.randint(11, 99), rng.randint(11, 99)
        q = rng.choice([f"A theatre has {a} rows of {b} seats. What is its capacity?",
                        f"{n} reads {b} pages every day for {a} days. How many pages is that?"])
        return q, a * b
    b, r = rng.randint(3, 40), rng.randint(101, 999)
    q = rng.choice([f"A printer produced {b * r} leaflets in {b} hours at a steady pace. What was "
                    f"its hourly output?",
                    f"{n} splits a {b * r} meter roll of cable into {b} equal pieces. How long is "
                    f"each piece in meters?"])
    return q, r


def _multi_digit(rng: random.Random) -> tuple[str, float]:
    n = rng.choice(EVAL_NAMES)
    a, b = rng.randint(101, 999), rng.randint(12, 999)
    if rng.random() < 0.3:
        cents = rng.randint(101, 9999)
        k = rng.randint(3, 60)
        return (f"One ticket costs {cents / 100:.2f} dollars. What do {k} tickets cost in dollars?",
                round(cents * k / 100, 2))
    q = rng.choice([f"A factory makes {a} bottles per shift. How many bottles does it make in {b} "
                    f"shifts?",
                    f"{n} plants {b} rows of {a} tulips. How many tulips are planted?"])
    return q, a * b


def _compound(rng: random.Random) -> tuple[str, float]:
    n = rng.choice(EVAL_NAMES)
    kind = rng.choice(["mean", "percent", "discount", "rate", "change"])
    if kind == "mean":
        k = rng.choice([3, 4])
        xs = [rng.randint(10, 99) for _ in range(k - 1)]
        last = rng.randint(10, 99)
        last += (-(sum(xs) + last)) % k  # a whole-number mean
        xs.append(last)
        return (f"{n} scored {', '.join(map(str, xs[:-1]))} and {xs[-1]} points in {k} games. What "
                f"was the average score per game?", sum(xs) / k)
    if kind == "percent":
        p, base = rng.choice([5, 10, 15, 20, 25, 30, 40, 75]), rng.randint(2, 60) * 20
        return f"A town of {base} residents voted and {p}% of them said yes. How many said yes?", \
            base * p / 100
    if kind == "discount":
        p, price = rng.choice([10, 20, 25, 50]), rng.randint(4, 90) * 4
        return (f"A jacket priced at {price} dollars is on sale at {p}% off. What is the sale "
                f"price in dollars?", price * (100 - p) / 100)
    if kind == "rate":
        hours, speed, later = rng.randint(2, 9), rng.randint(30, 95), rng.randint(2, 12)
        return (f"A train covers {hours * speed} km in {hours} hours. At the same speed, how far "
                f"does it go in {later} hours?", speed * later)
    k, price = rng.randint(2, 9), rng.randint(3, 19)
    paid = (k * price // 10 + 1 + rng.randint(0, 3)) * 10
    return (f"{n} picks {k} notebooks costing {price} dollars apiece and hands over "
            f"{paid} dollars. "
            f"How much change comes back?", paid - k * price)


EVAL_SETS = {  # name -> (builder, distribution relative to the training text)
    "near": (_near, "near: training ops, ranges, names, items; question form unseen"),
    "one_step": (_one_step_ood, "out: other templates, units, names, 4-digit / 2x2-digit ranges"),
    "multi_digit": (_multi_digit, "out: 3-digit products, decimal prices"),
    "compound": (_compound, "out: means, percentages, discounts, rates, change (unseen shapes)"),
}


def eval_set(n: int, seed: int = 1, kind: str = "near") -> list[dict]:
    """`n` word problems of one evaluation set (see EVAL_SETS), in GSM8K's jsonl format."""
    build = EVAL_SETS[kind][0]
    rng = random.Random(f"{kind}-{seed}")
    out = []
    for _ in range(n):
        q, r = build(rng)
        answer = int(r) if float(r).is_integer() else r
        out.append({"question": q, "answer": f"#### {answer}"})
    return out


def write_jsonl(path, records: list[dict]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
