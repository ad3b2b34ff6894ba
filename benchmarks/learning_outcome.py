"""Does the pipeline's own output teach the default model to use the calculator?

    .venv/bin/python benchmarks/learning_outcome.py [--work runs/learning_outcome] [--generated 900] [--corpus-docs N]

1. input: the documents of ../shared/data/corpus/annotation_corpus.jsonl that pass the calculator's
   pre-filter (appendix A.1), plus generated arithmetic documents (toolformer_ray/evaluation/arithmetic.py),
   because the corpus alone yields few calculator calls;
2. generate: sample, execute and filter calculator calls with SmolLM2-135M (configs/learning_outcome.yaml);
3. finetune: DeepSpeed under Ray Train on the augmented documents;
4. eval: base vs fine-tuned, tools on and off, on a held-out arithmetic word-problem set, MAWPS and GSM8K.
Every step resumes where it stopped (generate skips committed shards, finetune resumes from its checkpoints).
The figures go to <work>/summary.json and <work>/summary.md.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from toolformer_ray.evaluation.arithmetic import eval_set, training_documents, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/learning_outcome")
    ap.add_argument("--config", default=str(ROOT / "configs/learning_outcome.yaml"))
    ap.add_argument("--shared", default=str(ROOT.parent / "shared/data"))
    ap.add_argument("--generated", type=int, default=900, help="generated arithmetic documents")
    ap.add_argument("--corpus-docs", type=int, default=None,
                    help="use only the first N pre-filtered corpus documents (default: all)")
    ap.add_argument("--eval-n", type=int, default=150, help="examples per evaluation set")
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: the config's)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["generate", "finetune", "eval"])
    args = ap.parse_args()

    from toolformer_ray.config import load_config
    from toolformer_ray.tools.calculator import calculator_prefilter

    work = Path(args.work)
    overrides = [f"run.output={work / 'data'}", f"corpus.input={work / 'input'}",
                 f"finetune.output={work / 'finetune'}", f"eval.output={work / 'eval'}", f"eval.limit={args.eval_n}"]
    if args.steps:
        overrides.append(f"finetune.max_steps={args.steps}")
    cfg = load_config(args.config, overrides)
    timings: dict[str, float] = {}

    # 1. inputs (deterministic, so a rerun writes the same shards and generate skips them)
    (work / "input").mkdir(parents=True, exist_ok=True)
    corpus = [json.loads(line) for line in open(Path(args.shared) / "corpus/annotation_corpus.jsonl")]
    kept = [r for r in corpus if calculator_prefilter(r["text"], r["id"])][:args.corpus_docs]
    write_jsonl(work / "input/corpus_prefiltered.jsonl", kept)
    write_jsonl(work / "input/generated_arithmetic.jsonl", training_documents(args.generated, seed=0))
    (work / "eval_data").mkdir(exist_ok=True)
    write_jsonl(work / "eval_data/arithmetic.jsonl", eval_set(args.eval_n))
    print(f"input: {len(kept)} of {len(corpus)} corpus documents (pre-filtered, capped at --corpus-docs); "
          f"{args.generated} generated arithmetic documents", flush=True)

    # 2. generate
    if "generate" not in args.skip:
        from toolformer_ray.datajob.run import run_generate

        t = time.time()
        summary = run_generate(cfg, use_ray=True)
        timings["generate_s"] = time.time() - t
        print(summary.describe(), flush=True)

    # 3. finetune
    if "finetune" not in args.skip:
        from toolformer_ray.finetune import run_finetune

        t = time.time()
        result = run_finetune(cfg)
        timings["finetune_s"] = time.time() - t
        print(result.describe(), flush=True)
    model_dir = str(work / "finetune/model")

    # 4. eval: base vs fine-tuned, tools on / off
    report = None
    if "eval" not in args.skip:
        from toolformer_ray.evaluation import run_eval

        tasks = [("math", str(work / "eval_data/arithmetic.jsonl")),
                 ("math", str(Path(args.shared) / "eval/math/mawps/mawps_single.json")),
                 ("math", str(Path(args.shared) / "eval/math/gsm8k/test.jsonl"))]
        t = time.time()
        report = run_eval(cfg, tasks=tasks, models=["default", model_dir], modes=["disabled", "tools"])
        timings["eval_s"] = time.time() - t
        print(report.describe(), flush=True)

    manifest = _latest_manifest(work / "data")
    summary = {"config": args.config, "work": str(work), "timings": timings,
               "funnel": manifest.get("funnel") if manifest else None,
               "eval": json.loads((work / "eval/results.json").read_text()) if (work / "eval/results.json").exists()
               else None}
    (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if report is not None:
        (work / "summary.md").write_text(report.describe())
    print(f"wrote {work / 'summary.json'}")


def _latest_manifest(data_dir: Path) -> dict | None:
    manifests = sorted(data_dir.glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(manifests[-1].read_text()) if manifests else None


if __name__ == "__main__":
    main()
