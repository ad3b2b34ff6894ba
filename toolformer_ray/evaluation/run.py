"""`toolformer-ray eval`: the paper's zero-shot protocol for each task x model x decoding mode."""
from __future__ import annotations

import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Callable

import fsspec

from toolformer_ray.api_text import Markers
from toolformer_ray.errors import UserError
from toolformer_ray.evaluation.examples import DataError, TaskData
from toolformer_ray.evaluation.perplexity import perplexity, read_texts
from toolformer_ray.evaluation.readers import read_task
from toolformer_ray.evaluation.report import EvalReport, EvalRow, model_label
from toolformer_ray.evaluation.tasks import TASKS, allowed_tools, is_correct, prompt_for
from toolformer_ray.inference import MODES, ToolDecoder, load_tools, set_torch_threads
from toolformer_ray.models import load_model, pick_device


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _data_label(task: str, path: str) -> str:
    if task == "temporal" and path.split(":", 1)[0] == "dateset":
        return "dateset"
    return Path(path.rstrip("/")).stem or path


def run_eval(cfg, tasks: dict[str, str] | list[tuple[str, str]] | None = None,
             models: list[str] | None = None,
             modes: list[str] | None = None,
             progress: Callable[[str], None] | None = _progress) -> EvalReport:
    """Evaluate every model in every mode on every (task, data path); write the report to
    cfg.eval.output.

    tasks: {task: path} or [(task, path), ...] (default: cfg.eval.tasks with paths from
    cfg.eval.data); models: model paths ("default", "tiny", a directory, s3://...; default:
    cfg.model.path); modes: decoding modes (default: cfg.eval.modes).
    """
    say = progress or (lambda _msg: None)
    pairs = _task_pairs(cfg, tasks)
    modes = list(modes or cfg.eval.modes)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise UserError(f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}")
    models = list(models or [cfg.model.path])

    # Read every data set first: a bad path fails before any model is loaded.
    datasets: list[tuple[str, str, TaskData | list[str]]] = []
    for task, path in pairs:
        if task == "perplexity":
            texts = read_texts(path)
            datasets.append((task, path, texts[: cfg.eval.limit] if cfg.eval.limit else texts))
            continue
        data = read_task(task, path, cfg.eval.limit, cfg.eval.dateset_size)
        if not data.examples:
            reasons = ", ".join(f"{v} {k}" for k, v in data.skipped.items()) or "empty file"
            raise DataError(f"{path}: no usable {task} examples ({reasons})")
        say(f"{task}: {len(data.examples)} examples from {path} ({data.format})")
        datasets.append((task, path, data))

    set_torch_threads(cfg.inference.torch_threads)
    needs_tools = any(m != "disabled" for m in modes) and any(t != "perplexity"
                                                              for t, _, _ in datasets)
    tools, unavailable = load_tools(cfg, strict=False) if needs_tools else ({}, {})
    for name, why in unavailable.items():
        say(f"warning: tool {name} unavailable ({why}); the model cannot call it")
    infer_cfg = cfg.inference.model_copy(update={
        "temperature": 0.0,  # the protocol is greedy and deterministic
        "stop": list(cfg.eval.stop),
        "max_new_tokens": cfg.eval.max_new_tokens or cfg.inference.max_new_tokens,
    })
    markers = Markers.from_config(cfg.markers)
    output = cfg.eval.output.rstrip("/")
    today = dt.date.today().isoformat()
    rows: list[EvalRow] = []
    taken: set[str] = set()
    for model_path in models:
        label = model_label(model_path, taken)
        lm = load_model(model_path, cfg.model.dtype, cfg.model.cache_dir, cfg.model.tiny_seed,
                        device=pick_device(cfg.inference.device))
        decoder = ToolDecoder(lm.model, lm.tokenizer, tools, markers, infer_cfg,
                              tool_configs=cfg.tools)  # the data job's timeouts and batching
        try:
            for task, path, data in datasets:
                data_label = _data_label(task, path)
                if task == "perplexity":
                    rows.append(_perplexity_row(cfg, lm, decoder, data, data_label, label, say))
                    continue
                allowed = allowed_tools(task, list(tools), cfg.eval)
                for mode in modes:
                    if mode == "forced" and not allowed:
                        say(f"skipping {task}/{mode} for {label}: no tool may be called")
                        continue
                    row, records = _evaluate(task, data, mode, allowed, decoder, cfg, today)
                    row.data = data_label
                    row.model = label
                    row.model_path = lm.path
                    rows.append(row)
                    pred_file = f"{label}__{task}-{data_label}__{mode}.jsonl"
                    _write_predictions(f"{output}/predictions/{pred_file}", records)
                    say(f"{label} {task}/{data_label} {mode}: accuracy "
                        f"{100 * (row.accuracy or 0):.1f}%, with call "
                        f"{100 * (row.call_rate or 0):.1f}%, n={row.n}, {row.seconds:.1f}s")
        finally:
            decoder.close()
            del lm, decoder

    report = EvalReport(rows, meta={
        "models": models, "modes": modes, "tasks": [[t, p] for t, p, _ in datasets],
        "tools_available": sorted(tools), "tools_unavailable": unavailable,
        "inference": infer_cfg.model_dump(), "eval": cfg.eval.model_dump(),
                                    "markers": cfg.markers.model_dump(),
        "dtype": cfg.model.dtype,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    })
    report.write(output)
    return report


def _task_pairs(cfg, tasks) -> list[tuple[str, str]]:
    if tasks:
        pairs = list(tasks.items()) if isinstance(tasks, dict) else [tuple(p) for p in tasks]
    else:
        missing = [t for t in cfg.eval.tasks if t not in cfg.eval.data]
        if missing:
            raise UserError(f"no data path for task(s) {', '.join(missing)}: give --data or set "
                            "eval.data.<task>")
        pairs = [(t, cfg.eval.data[t]) for t in cfg.eval.tasks]
    for task, _ in pairs:
        if task not in TASKS:
            raise UserError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return pairs


def _evaluate(task: str, data: TaskData, mode: str, allowed: list[str], decoder: ToolDecoder, cfg,
              today: str) -> tuple[EvalRow, list[dict]]:
    examples = data.examples
    prompts = [prompt_for(task, ex, cfg.eval) for ex in examples]
    dates = [ex.date or today for ex in examples]
    t0 = time.perf_counter()
    transcripts = decoder.generate(prompts, mode=mode, allowed_tools=allowed, dates=dates,
                                   seed=cfg.run.seed)
    seconds = time.perf_counter() - t0
    row = EvalRow(task=task, data="", model="", mode=mode, n=len(examples), seconds=seconds,
                  skipped=dict(data.skipped))
    records = []
    for ex, tr in zip(examples, transcripts):
        ok = is_correct(task, tr.final_text, ex, cfg.eval)
        row.correct += ok
        row.with_call += tr.called
        records.append({"id": ex.id, "prompt": tr.prompt, "output": tr.text, "final": tr.final_text,
                        "answers": ex.answers, "correct": ok, "date": ex.date,
                        "calls": [{"tool": c.tool, "input": c.input, "result": c.result,
                                   "status": c.status}
                                  for c in tr.calls]})
    return row, records


def _perplexity_row(cfg, lm, decoder: ToolDecoder, texts: list[str], data_label: str, label: str,
                    say) -> EvalRow:
    t0 = time.perf_counter()
    ppl = perplexity(lm.model, lm.tokenizer, texts, max_length=cfg.eval.perplexity_max_length,
                     batch_size=max(1, cfg.inference.batch_size // 4),
                     mask_token_ids=decoder.start_ids[:1])
    row = EvalRow(task="perplexity", data=data_label, model=label, mode="disabled", n=len(texts),
                  seconds=time.perf_counter() - t0, perplexity=ppl, model_path=lm.path)
    say(f"{label} perplexity/{data_label}: {ppl:.2f} over {len(texts)} texts, {row.seconds:.1f}s")
    return row


def _write_predictions(path: str, records: list[dict]) -> None:
    fs, root = fsspec.core.url_to_fs(path)
    fs.makedirs(root.rsplit("/", 1)[0], exist_ok=True)
    with fsspec.open(path, "wt", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
