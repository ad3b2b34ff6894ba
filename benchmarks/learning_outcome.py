"""Does the pipeline's own output teach the default model to use the calculator on problems unlike
its training text?  `make learning-outcome` runs it; every step resumes where it stopped.

    .venv/bin/python benchmarks/learning_outcome.py [--work runs/learning_outcome] [--rounds 1]

1. input: generated arithmetic prose (toolformer_ray/evaluation/arithmetic.py: narratives, receipts,
   worked explanations; never the evaluation prompts' "Question: ... Answer:" form) plus the
   documents of ../shared/data/corpus/annotation_corpus.jsonl that pass the calculator's pre-filter;
2. generate: sample, execute and filter calculator calls with SmolLM2-135M
(configs/learning_outcome.yaml);
3. finetune: DeepSpeed under Ray Train on the augmented documents plus original text (the paper's
   mix), the exported checkpoint chosen by dev perplexity with calls disabled;
4. round 2 (--rounds 2, iterative bootstrapping): the round-1 model samples the calls
   (`sampling.model`), which are executed and kept by the same criterion with the BASE model's
   losses, on fresh documents; the base model is fine-tuned on both rounds' output;
5. eval: base vs fine-tuned, tools off and on, on evaluation sets at stated distances from the
   training text (arithmetic.EVAL_SETS, MAWPS, GSM8K) and perplexity on held-out plain corpus text.
The figures go to <work>/summary.json and summary.md; --publish copies the JSON to
benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import shutil
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
from toolformer_ray.tools.calculator import calculator_prefilter

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = {"mawps_single": "public MAWPS (single equation), other authors: out",
          "test": "public GSM8K test, multi-step, other authors: out",
          "heldout_text": "plain corpus text not annotated: out"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/learning_outcome")
    ap.add_argument("--config", default=str(ROOT / "configs/learning_outcome.yaml"))
    ap.add_argument("--shared", default=str(ROOT.parent / "shared/data"))
    ap.add_argument("--generated", type=int, default=240, help="generated documents per round")
    ap.add_argument("--corpus-docs", type=int, default=16,
                    help="pre-filtered corpus documents per round")
    ap.add_argument("--rounds", type=int, default=2, choices=[1, 2])
    ap.add_argument("--eval-n", type=int, default=100, help="examples per evaluation set")
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: config)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="key.path=value")
    ap.add_argument("--publish", default=None,
                    help="also write benchmarks/results/learning_outcome-<NAME>.json")
    args = ap.parse_args()

    work = Path(args.work).resolve()
    shared = Path(args.shared)
    timings: dict[str, float] = {}
    corpus = [json.loads(line) for line in open(shared / "corpus/annotation_corpus.jsonl")]
    calc_docs = [r for r in corpus if calculator_prefilter(r["text"], r["id"])]
    funnels = {}

    def stage(name: str, fn):
        t = time.time()
        out = fn()
        timings[name] = round(time.time() - t, 1)
        print(f"{name}: {timings[name]:.0f} s", flush=True)
        return out

    # Round r uses its own slice of the inputs, so round 2 annotates documents round 1 never saw.
    inputs = []
    for r in range(args.rounds):
        d = work / f"input{r + 1}"
        d.mkdir(parents=True, exist_ok=True)
        lo = r * args.corpus_docs
        write_jsonl(d / "corpus_prefiltered.jsonl", calc_docs[lo:lo + args.corpus_docs])
        write_jsonl(d / "generated_arithmetic.jsonl", training_documents(args.generated, seed=r))
        inputs.append(d)
    print(f"input per round: {args.corpus_docs} of {len(calc_docs)} pre-filtered corpus documents, "
          f"{args.generated} generated documents", flush=True)

    def cfg_for(r: int, extra: list[str]):
        base = [f"run.output={work / f'data{r}'}", f"corpus.input={inputs[r - 1]}",
                f"eval.output={work / 'eval'}", f"eval.limit={args.eval_n}"]
        if args.steps:
            base.append(f"finetune.max_steps={args.steps}")
        return load_config(args.config, base + args.overrides + extra)

    # round 1: the base model samples, scores and is fine-tuned
    cfg1 = cfg_for(1, [f"finetune.output={work / 'finetune1'}"])
    funnels["round1"] = _funnel(stage("generate1", lambda: run_generate(cfg1, use_ray=True)))
    model1 = stage("finetune1", lambda: run_finetune(cfg1)).model_dir
    final_cfg, final_model = cfg1, model1
    if args.rounds == 2:
        # round 2: round 1's model samples; the base model's losses keep or drop each call; the base
        # model is fine-tuned on the union of both rounds' kept calls
        union = work / "data_both/documents"
        cfg2 = cfg_for(2, [f"sampling.model={model1}", f"finetune.output={work / 'finetune2'}",
                           f"finetune.data={union.parent}"])
        funnels["round2"] = _funnel(stage("generate2", lambda: run_generate(cfg2, use_ray=True)))
        _union_documents([cfg1, cfg2], union)
        final_model = stage("finetune2", lambda: run_finetune(cfg2)).model_dir
        final_cfg = cfg2

    # evaluation sets
    data = work / "eval_data"
    data.mkdir(exist_ok=True)
    tasks, dist = [], {}
    for kind, (_, label) in EVAL_SETS.items():
        write_jsonl(data / f"{kind}.jsonl", eval_set(args.eval_n, kind=kind))
        tasks.append(("math", str(data / f"{kind}.jsonl")))
        dist[kind] = label
    tasks += [("math", str(shared / "eval/math/mawps/mawps_single.json")),
              ("math", str(shared / "eval/math/gsm8k/test.jsonl"))]
    held_out = corpus[-args.eval_n:]  # never in any round's input (those come from the front)
    write_jsonl(data / "heldout_text.jsonl", held_out)
    tasks.append(("perplexity", str(data / "heldout_text.jsonl")))
    dist.update(PUBLIC)
    report = stage("eval", lambda: run_eval(final_cfg, tasks=tasks,
                                            models=["default", str(final_model)],
                                            modes=["disabled", "tools"]))
    tuned = Path(final_model).name
    records = outcome_rows(report.rows, dist, "default", tuned)
    table = outcome_markdown(records)
    shown = {k: transcripts(final_cfg.eval.output, tuned, k) for k in ("one_step", "compound")}
    summary = {"args": vars(args), "config": args.config, "timings": timings, "funnel": funnels,
               "table": records, "transcripts": shown, "models": {"final": str(final_model)},
               "eval_rows": [r.to_dict() for r in report.rows]}
    (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (work / "summary.md").write_text(table + "\n")
    print(table)
    for k, v in shown.items():
        print(f"\n{k}:\n" + "\n\n".join(v))
    if args.publish:
        dest = ROOT / f"benchmarks/results/learning_outcome-{args.publish}.json"
        shutil.copyfile(work / "summary.json", dest)
        print(f"wrote {dest}")


def _funnel(summary) -> dict:
    print(summary.describe(), flush=True)
    if not summary.ok:
        raise SystemExit("generation did not finish: rerun to resume")
    return json.loads(Path(summary.manifest).read_text()).get("funnel", {})


def _union_documents(cfgs, dest: Path) -> None:
    """Both rounds' augmented documents in one folder (finetune.data reads a documents/ folder)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for i, cfg in enumerate(cfgs):
        version = Path(cfg.run.output) / cfg.config_hash() / "documents"
        for f in sorted(version.glob("*.parquet")):
            shutil.copyfile(f, dest / f"round{i + 1}-{f.name}")


if __name__ == "__main__":
    main()
