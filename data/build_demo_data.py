"""Build the bundled demo data from ../shared/data (run once; the outputs are committed).

    python data/build_demo_data.py --shared ../shared/data

demo_corpus.jsonl: 2,000 records of annotation_corpus.jsonl, favouring text with numbers (so the calculator
has work) and with years or month names (dates in the text), plus plain text. Each record gets a `date`
field: the source has none, so it is synthetic (derived from a hash of the id), standing in for the crawl
date CCNet would give; the Calendar tool needs a document date.
passages.jsonl: 6,000 passages of wiki_passages.jsonl for the bundled WikiSearch/QA index.
"""
import argparse
import datetime
import hashlib
import json
import random
import re
from pathlib import Path

NUM = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?")
YEAR_OR_MONTH = re.compile(r"\b(1[5-9]\d\d|20[0-2]\d)\b|\b(January|February|March|April|May|June|July|August|"
                           r"September|October|November|December)\b")
KEYWORDS = re.compile(r"=|\bequals?\b|\bequal to\b|\btotal of\b|\baverage of\b|\bpercent\b|%")


def synthetic_date(record_id: str) -> str:
    h = int(hashlib.sha256(record_id.encode()).hexdigest()[:8], 16)
    return (datetime.date(2019, 1, 1) + datetime.timedelta(days=h % (5 * 365))).isoformat()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default="../shared/data")
    ap.add_argument("--out", default=str(Path(__file__).parent))
    args = ap.parse_args()
    shared, out = Path(args.shared), Path(args.out)
    rng = random.Random(0)

    records = [json.loads(line) for line in open(shared / "corpus" / "annotation_corpus.jsonl")]
    numeric = [r for r in records if len(NUM.findall(r["text"])) >= 3 or KEYWORDS.search(r["text"])]
    dated = [r for r in records if r not in numeric and YEAR_OR_MONTH.search(r["text"])]
    rest = [r for r in records if r not in numeric and r not in dated]
    for group in (numeric, dated, rest):
        rng.shuffle(group)
    chosen = numeric[:1000] + dated[:600] + rest[:400]
    chosen.sort(key=lambda r: r["id"])
    with open(out / "demo_corpus.jsonl", "w") as f:
        for r in chosen:
            f.write(json.dumps({"id": r["id"], "text": r["text"], "source": r["source"],
                                "date": synthetic_date(r["id"])}) + "\n")

    passages = [json.loads(line) for line in open(shared / "corpus" / "wiki_passages.jsonl")]
    rng.shuffle(passages)
    with open(out / "passages.jsonl", "w") as f:
        for p in sorted(passages[:6000], key=lambda p: p["id"]):
            f.write(json.dumps({"id": p["id"], "title": p["title"], "text": p["text"], "source": p["source"]})
                    + "\n")
    print(f"demo_corpus.jsonl: {len(chosen)} records ({len(numeric)} numeric, {len(dated)} dated available); "
          f"passages.jsonl: 6000 of {len(passages)}")


if __name__ == "__main__":
    main()
