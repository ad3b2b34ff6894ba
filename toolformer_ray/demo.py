"""`make demo`: the whole story on the default model and the bundled corpus, in one go.

index -> generate -> finetune -> eval (base vs fine-tuned, tools on and off) -> a short summary.
Sizes (documents, steps, examples) come from the config (configs/local.yaml), so it fits a 2-core laptop.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from toolformer_ray.config import load_config


def banner(step: str) -> None:
    print(f"\n=== {step} " + "=" * max(0, 70 - len(step)), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/local.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="key.path=value")
    ap.add_argument("--eval-n", type=int, default=30, help="arithmetic word problems to evaluate on")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    t0 = time.time()
    times: dict[str, float] = {}

    if "WikiSearch" in cfg.enabled_tools() or "QA" in cfg.enabled_tools():
        banner("1/4 index: BM25 over the bundled Wikipedia passages")
        from toolformer_ray.tools.search_index import build_index

        options = (cfg.tools.get("WikiSearch") or cfg.tools["QA"]).options
        index = options.get("index", "runs/index/passages")
        if (Path(index) / "meta.json").is_file():
            print(f"index already built: {index}")
        else:
            t = time.time()
            stats = build_index("data/passages.jsonl", index)
            times["index"] = time.time() - t
            print(f"indexed {stats['passages']} passages into {index}")

    banner("2/4 generate: sample, execute and filter API calls (Ray, local)")
    from toolformer_ray.datajob.run import run_generate

    t = time.time()
    gen = run_generate(cfg, use_ray=True)
    times["generate"] = time.time() - t
    print(gen.describe())

    banner("3/4 finetune: DeepSpeed ZeRO under Ray Train on the augmented documents")
    from toolformer_ray.finetune import run_finetune

    t = time.time()
    ft = run_finetune(cfg)
    times["finetune"] = time.time() - t
    print(ft.describe())

    banner("4/4 eval: arithmetic word problems, base vs fine-tuned, tools on and off")
    from toolformer_ray.evaluation import run_eval
    from toolformer_ray.evaluation.arithmetic import eval_set, write_jsonl

    data = Path(cfg.eval.output) / "arithmetic.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(data, eval_set(args.eval_n))
    t = time.time()
    report = run_eval(cfg, tasks=[("math", str(data))], models=[cfg.model.path, ft.model_dir],
                      modes=["disabled", "tools"])
    times["eval"] = time.time() - t
    print(report.describe())

    banner(f"done in {time.time() - t0:.0f} s")
    print("\n".join([
        "timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()),
        f"augmented corpus + calls: {gen.output}",
        f"run report:               {gen.report}",
        f"fine-tuned model:         {ft.model_dir}",
        f"evaluation:               {cfg.eval.output}/results.md",
        "next: toolformer-ray infer --model " + str(ft.model_dir) + " \"What is 27 times 14?\" --tool Calculator",
    ]))


if __name__ == "__main__":
    main()
