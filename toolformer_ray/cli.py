"""`toolformer-ray`: one subcommand per stage. User errors print one line (no traceback) and exit 2.

The stage modules (generate, finetune, infer, eval, verify, model) are imported inside their
command: each pulls in torch, transformers or ray, and importing them costs 1.5-5 s (measured:
models 1.5 s, evaluation 1.9 s, verify 4.6 s, generate 5.3 s) against 0.3 s for this module, so
`--help` and the light commands (tool, index, config) stay instant.
"""
from __future__ import annotations

import datetime
import sys
from pathlib import Path
from typing import Optional

import typer
from botocore.exceptions import NoCredentialsError
# typer 0.29 vendors click and raises its exceptions, which it does not re-export (only
# BadParameter).
from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError

from toolformer_ray.config import Config, dump_config, load_config
from toolformer_ray.errors import UserError
from toolformer_ray.tools import build_tool
from toolformer_ray.tools.base import clean_result
from toolformer_ray.tools.search_index import build_index

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Toolformer data generation, fine-tuning, tool-aware decoding and "
                       "evaluation on Ray.",
                  epilog="Benchmarks are scripts: make bench, or see benchmarks/README.md.")


ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (e.g. configs/local.yaml).")
SetOpt = typer.Option(None, "--set", "-s",
                      help="Override a config value: key.path=value (repeatable).")


def _config(config: Optional[Path], overrides: Optional[list[str]],
            extra: Optional[list[str]] = None) -> Config:
    return load_config(config, list(overrides or []) + list(extra or []))


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def generate(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    input: Optional[str] = typer.Option(None, "--input", "-i",
                                        help="Corpus file, directory or prefix (local or s3://)."),
    output: Optional[str] = typer.Option(None, "--output", "-o",
                                         help="Output directory (local or s3://)."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", help="Only the first N documents."),
    no_ray: bool = typer.Option(False, "--no-ray",
                                help="Run the core in this process, without Ray (profiling, "
                                     "debugging)."),
):
    """Annotate a corpus with API calls (sample -> execute -> filter -> merge) and write the
    tables + report."""
    extra = []
    if input is not None:
        extra.append(f"corpus.input={input}")
    if output is not None:
        extra.append(f"run.output={output}")
    if limit is not None:
        extra.append(f"corpus.limit={limit}")
    cfg = _config(config, overrides, extra)
    from toolformer_ray.datajob.run import run_generate

    summary = run_generate(cfg, use_ray=not no_ray)
    typer.echo(summary.describe())
    if not summary.ok:
        # A failed shard is not committed: a rerun retries it. The summary's FAILED lines say which.
        what = (f"{len(summary.shards_failed)} shard(s) failed" if summary.shards_failed
                else "the run did not finish")
        typer.secho(f"error: {what} (FAILED lines above); run the same command again to retry",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


@app.command()
def finetune(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    data: Optional[str] = typer.Option(None, "--data",
                                       help="Augmented corpus (a generate run's output)."),
    output: Optional[str] = typer.Option(None, "--output", "-o",
                                         help="Where checkpoints and the model go."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps."),
):
    """Fine-tune the model on the augmented corpus with DeepSpeed ZeRO under Ray Train."""
    extra = []
    if data is not None:
        extra.append(f"finetune.data={data}")
    if output is not None:
        extra.append(f"finetune.output={output}")
    if max_steps is not None:
        extra.append(f"finetune.max_steps={max_steps}")
    cfg = _config(config, overrides, extra)
    from toolformer_ray.finetune import run_finetune

    result = run_finetune(cfg)
    typer.echo(result.describe())


@app.command()
def infer(
    prompts: list[str] = typer.Argument(...,
                                        help="Prompts to continue (use - to read one per line from "
                                             "stdin)."),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Model directory (default: the config's model)."),
    mode: str = typer.Option("tools", help="tools | disabled | forced"),
    tools: Optional[list[str]] = typer.Option(None, "--tool", "-t",
                                              help="Allowed tools (default: the config's)."),
    date: Optional[str] = typer.Option(None,
                                       help="Today's date for Calendar (ISO; default: today)."),
):
    """Tool-aware decoding: generate, pausing to run a tool whenever the model writes a call."""
    extra = [f"model.path={model}"] if model else []
    cfg = _config(config, overrides, extra)
    if prompts == ["-"]:
        prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    from toolformer_ray.inference import run_infer

    for transcript in run_infer(cfg, prompts, mode=mode, tools=tools, date=date):
        typer.echo(transcript.describe())


@app.command("eval")
def evaluate(
    task: Optional[list[str]] = typer.Option(None, "--task",
                                             help="math | lama | qa | temporal | perplexity "
                                                  "(repeatable; default: eval.tasks)."),
    data: Optional[list[str]] = typer.Option(None, "--data",
                                             help="Data file for each --task, in the same order "
                                                  "(default: eval.data.<task>); temporal also "
                                                  "takes dateset[:N[:seed]]."),
    model: Optional[list[str]] = typer.Option(None, "--model", "-m",
                                              help="Model directories (repeatable; default: the "
                                                   "config's)."),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    modes: Optional[list[str]] = typer.Option(None, "--mode",
                                              help="Decoding modes to compare: tools | disabled | "
                                                   "forced (default: eval.modes)."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", help="First N examples per task."),
    output: Optional[str] = typer.Option(None, "--output", "-o",
                                         help="Where the table, JSON and chart go."),
):
    """The paper's zero-shot evaluation, with and without tools: prints a table, writes JSON and a
    chart."""
    extra = [f"eval.limit={limit}"] if limit is not None else []
    if output:
        extra.append(f"eval.output={output}")
    cfg = _config(config, overrides, extra)
    task = list(task or [])
    data = list(data or [])
    if data and len(task) != len(data):
        _fail("give one --data per --task")
    if task and not data:
        missing = [t for t in task if t not in cfg.eval.data]
        if missing:
            _fail(f"give --data for {', '.join(missing)} (or set eval.data.<task> in the config)")
        data = [cfg.eval.data[t] for t in task]
    from toolformer_ray.evaluation import run_eval

    report = run_eval(cfg, tasks=list(zip(task, data)) or None, models=list(model or []),
                      modes=list(modes or []))
    typer.echo(report.describe())


@app.command()
def index(
    passages: str = typer.Argument(...,
                                   help="Passages jsonl ({id,title,text}; .gz ok); local or s3://."),
    output: str = typer.Argument(..., help="Index directory to write; local or s3://."),
):
    """Build the BM25 index that WikiSearch and QA workers load."""
    stats = build_index(passages, output)
    skipped = f" ({stats['skipped']} records without text skipped)" if stats["skipped"] else ""
    typer.echo(f"indexed {stats['passages']} passages into {output}{skipped}: "
               f"{stats['vocabulary']} terms, build {stats['build_id']}, {stats['seconds']} s")


@app.command()
def tool(
    name: str = typer.Argument(..., help="Tool name: Calculator, Calendar, WikiSearch, QA or MT."),
    input: str = typer.Argument("",
                                help="The call's input, e.g. '400/1400' (nothing for Calendar)."),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
    date: Optional[str] = typer.Option(None,
                                       help="The document's date for Calendar (ISO; default: "
                                            "today)."),
):
    """Run one tool on one input and print its result (or why there is none), as a worker would."""
    cfg = _config(config, overrides)
    options = cfg.tools[name].options if name in cfg.tools else {}
    try:
        t = build_tool(name, options)
    except KeyError as e:
        raise UserError(str(e.args[0])) from None
    if t.uses_date and date is None:
        date = datetime.date.today().isoformat()
    t.load()
    result = clean_result(t.run([input], dates=[date])[0])
    if result is None:
        reason = t.diagnose(input, date) or "the tool returned no result"
        typer.echo(f"{name}({input}) -> no result: {reason}")
        raise typer.Exit(1)
    typer.echo(result)


@app.command()
def verify(
    version: str = typer.Argument(...,
                                  help="An output version: <run.output>/<config_hash> (local or "
                                       "s3://)."),
    limit: Optional[int] = typer.Option(None, help="Check only the first N kept calls."),
    dtype: Optional[str] = typer.Option(None, help="Recompute in this dtype (default: the run's)."),
    tolerance: Optional[float] = typer.Option(None,
                                              help="Allowed |recomputed - stored| (default: 1e-4 "
                                                   "for float32 runs, 0.15 for bf16 ones)."),
    model: Optional[str] = typer.Option(None,
                                        help="The run's model, if not at the path stored in the "
                                             "rows."),
    rejected: int = typer.Option(20,
                                 help="Also re-score this many rejected candidates (a seeded "
                                      "sample)."),
):
    """Recompute the kept calls' losses from the output alone (plain full forwards) and re-check the
    filter."""
    from toolformer_ray.verify import verify_output

    report, tol = verify_output(version, limit=limit, dtype=dtype, tolerance=tolerance,
                                model_path=model,
                                rejected=rejected)
    typer.echo(report.describe(tol))
    if not report.ok:
        raise typer.Exit(1)


@app.command("model")
def model_info(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
):
    """Resolve (and convert once, if needed) the configured model; print its directory and
    revision."""
    cfg = _config(config, overrides)
    from toolformer_ray.models import load_from_config

    lm = load_from_config(cfg.model)
    n = sum(p.numel() for p in lm.model.parameters())
    typer.echo(f"{lm.path}\nrevision {lm.revision}, dtype {lm.dtype}, {n / 1e6:.1f}M parameters")


@app.command("config")
def show_config(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = SetOpt,
):
    """Print the resolved config and its hash."""
    cfg = _config(config, overrides)
    typer.echo(dump_config(cfg))
    typer.echo(f"# config_hash: {cfg.config_hash()}")


def main() -> None:
    try:
        # standalone_mode=False returns a command's exit code instead of exiting: pass it on.
        sys.exit(app(standalone_mode=False) or 0)
    except (UserError, FileNotFoundError) as e:
        _fail_plain(str(e))
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(130)
    except NoArgsIsHelpError as e:  # bare `toolformer-ray`: the help is what was asked for
        e.show()
        sys.exit(0)
    except UsageError as e:  # unknown option or command, bad value, missing argument
        where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        _fail_plain(_one_line(e.format_message()) + where)
    except ClickException as e:
        _fail_plain(_one_line(e.format_message()))
    except Exception as e:
        if _no_credentials(e):
            _fail_plain("no S3 credentials found: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                        "(or AWS_PROFILE), or run where the node has an instance role")
        raise


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _no_credentials(error: BaseException) -> bool:
    """botocore's NoCredentialsError, raised directly or as the cause of an fsspec/s3fs error."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, NoCredentialsError):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _fail_plain(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
