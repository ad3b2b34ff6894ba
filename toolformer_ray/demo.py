"""`make demo`: does the pipeline's own output teach the model to call the calculator on problems of
a form it never saw?

input -> generate (Ray) -> finetune (DeepSpeed under Ray Train) -> eval (base vs fine-tuned, tools
on and off, on held-out word problems whose templates, names, units and number ranges never occur in
the training text) -> a before/after table and transcripts with the call and its result inline.
Sizes come from the config (configs/demo.yaml) so that it fits a 2-core laptop.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from toolformer_ray.config import load_config
from toolformer_ray.datajob.run import run_generate
from toolformer_ray.evaluation import run_eval
from toolformer_ray.evaluation.arithmetic import (
    EVAL_SETS,
    eval_set,
    training_documents,
    write_jsonl,
)
from toolformer_ray.evaluation.outcome import outcome_markdown, outcome_rows, transcripts
from toolformer_ray.finetune import run_finetune
from toolformer_ray.ray_session import ensure_ray
from toolformer_ray.tools.calculator import calculator_prefilter

ROOT = Path(__file__).resolve().parents[1]


def banner(step: str) -> None:
    print(f"\n=== {step} " + "=" * max(0, 70 - len(step)), flush=True)


def write_input(cfg, corpus: Path, n_corpus: int, n_generated: int) -> str:
    """The documents to annotate: bundled corpus records that pass the calculator's pre-filter, and
    generated arithmetic prose (narratives, receipts; never the evaluation's question form)."""
    out = Path(cfg.corpus.input)
    out.mkdir(parents=True, exist_ok=True)
    records = [json.loads(line) for line in corpus.open()]
    kept = [r for r in records if calculator_prefilter(r["text"], r["id"])][:n_corpus]
    write_jsonl(out / "corpus.jsonl", kept)
    write_jsonl(out / "generated_arithmetic.jsonl",
                training_documents(n_generated, seed=0, sentences=(1, 2)))
    return f"{len(kept)} bundled documents (calculator pre-filter), {n_generated} generated ones"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="key.path=value")
    ap.add_argument("--corpus", default=str(ROOT / "data/demo_corpus.jsonl"))
    ap.add_argument("--corpus-docs", type=int, default=8, help="pre-filtered corpus documents")
    ap.add_argument("--generated", type=int, default=400, help="generated arithmetic documents")
    ap.add_argument("--eval-n", type=int, default=40, help="held-out problems per evaluation set")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    t0 = time.time()
    times: dict[str, float] = {}

    banner("1/4 input: documents to annotate")
    print(write_input(cfg, Path(args.corpus), args.corpus_docs, args.generated))

    # One local Ray for both stages (each would otherwise start and stop its own); the dashboard is
    # on because Ray Train's placement-group cleaner polls the state API.
    ensure_ray(cfg.ray.address, cfg.ray.num_cpus, dashboard=True)

    banner("2/4 generate: sample, execute and filter calculator calls (Ray, local)")
    t = time.time()
    gen = run_generate(cfg, use_ray=True)
    times["generate"] = time.time() - t
    print(gen.describe())

    banner("3/4 finetune: DeepSpeed ZeRO under Ray Train on the augmented documents")
    t = time.time()
    ft = run_finetune(cfg)
    times["finetune"] = time.time() - t
    print(ft.describe())

    banner("4/4 eval: held-out word problems, base vs fine-tuned, tools off and on")
    data = Path(cfg.eval.output) / "data"
    data.mkdir(parents=True, exist_ok=True)
    kinds = ("one_step", "compound")
    for kind in kinds:
        write_jsonl(data / f"{kind}.jsonl", eval_set(args.eval_n, kind=kind))
    t = time.time()
    report = run_eval(cfg, tasks=[("math", str(data / f"{k}.jsonl")) for k in kinds],
                      models=[cfg.model.path, ft.model_dir], modes=["disabled", "tools"])
    times["eval"] = time.time() - t
    tuned = Path(ft.model_dir).name
    dist = {k: EVAL_SETS[k][1] for k in kinds}
    table = outcome_rows(report.rows, dist, cfg.model.path, tuned)
    print(outcome_markdown(table))
    print("\nThe fine-tuned model on held-out problems (tools on; the call and its result inline):")
    shown = (transcripts(cfg.eval.output, tuned, "one_step", k=2)
             + transcripts(cfg.eval.output, tuned, "compound", k=1))
    for text in shown:
        print("\n" + text)

    times["total"] = time.time() - t0
    summary = {"timings_s": {k: round(v, 1) for k, v in times.items()}, "kept": gen.calls_kept,
               "table": table, "transcripts": shown, "config": args.config,
               "overrides": args.overrides}
    (Path(cfg.eval.output) / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    banner(f"done in {time.time() - t0:.0f} s")
    print("\n".join([
        "timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items() if k != "total"),
        f"augmented corpus + calls: {gen.output}",
        f"run report:               {gen.report}",
        f"fine-tuned model:         {ft.model_dir}",
        f"evaluation:               {cfg.eval.output}/results.md (demo_summary.json)",
        f"next: toolformer-ray infer --model {ft.model_dir} \"What is 27 times 14?\" "
        "--tool Calculator",
    ]))


if __name__ == "__main__":
    main()
