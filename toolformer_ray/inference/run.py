"""`toolformer-ray infer`: build the tools and the decoder from a config and decode prompts."""
from __future__ import annotations

import datetime as dt
import sys

import torch

from toolformer_ray.api_text import Markers
from toolformer_ray.config import Config
from toolformer_ray.errors import UserError
from toolformer_ray.inference.calls import Transcript
from toolformer_ray.inference.decoder import MODES, ToolDecoder
from toolformer_ray.models import load_from_config, pick_device
from toolformer_ray.tools import build_tool
from toolformer_ray.tools.base import Tool


def load_tools(cfg: Config, names: list[str] | None = None,
               strict: bool = True) -> tuple[dict[str, Tool], dict[str, str]]:
    """Build the named tools (default: the config's enabled tools) in-process.

    Returns (tools, failed): with strict=False a tool that cannot be built (missing index or
    weights) is left out and its error recorded instead of stopping the run.
    """
    names = list(cfg.enabled_tools()) if names is None else names
    tools, failed = {}, {}
    for name in names:
        options = cfg.tools[name].options if name in cfg.tools else {}
        try:
            tool = build_tool(name, options)
            tool.load()  # an index or model that cannot load fails here, not as silent "no result"
            tools[name] = tool
        except KeyError as e:
            if strict:
                raise UserError(str(e.args[0])) from None
            failed[name] = str(e.args[0])
        except Exception as e:  # noqa: BLE001 - reported to the user, not swallowed
            if strict:
                raise UserError(f"tool {name} could not be built: {e}") from None
            failed[name] = f"{type(e).__name__}: {e}"
    return tools, failed


def set_torch_threads(n: int | None) -> None:
    if n is not None:
        torch.set_num_threads(n)


def decoder_from_config(cfg: Config, lm=None, tools: dict[str, Tool] | None = None) -> ToolDecoder:
    """A decoder over the configured model; tool calls run under the tools' own ToolConfig (the data
    job's timeout and batching)."""
    lm = lm or load_from_config(cfg.model, device=pick_device(cfg.inference.device))
    return ToolDecoder(lm.model, lm.tokenizer, tools or {}, Markers.from_config(cfg.markers),
                       cfg.inference, tool_configs=cfg.tools)


def run_infer(cfg: Config, prompts: list[str], mode: str = "tools", tools: list[str] | None = None,
              date: str | None = None) -> list[Transcript]:
    """`toolformer-ray infer`: decode the prompts with the configured model and tools."""
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if not prompts:
        raise UserError("no prompts given")
    if date is not None:
        try:
            dt.date.fromisoformat(date)
        except ValueError:
            raise UserError(f"--date must be an ISO date (yyyy-mm-dd), got {date!r}") from None
    date = date or dt.date.today().isoformat()
    set_torch_threads(cfg.inference.torch_threads)
    built = {}
    if mode != "disabled":
        # Tools asked for by name must load; of the config's tools, those that cannot (no index, no
        # weights) are left out with a warning.
        built, failed = load_tools(cfg, tools, strict=tools is not None)
        for name, why in failed.items():
            print(f"warning: tool {name} unavailable ({why})", file=sys.stderr)
    decoder = decoder_from_config(cfg, tools=built)
    try:
        return decoder.generate(prompts, mode=mode, allowed_tools=list(built),
                                dates=[date] * len(prompts), seed=cfg.run.seed)
    finally:
        decoder.close()
