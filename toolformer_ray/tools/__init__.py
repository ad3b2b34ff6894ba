"""Tool registry. A tool is one module in this package that defines a `Tool` subclass decorated with
`@register`, plus its prompt file `toolformer_ray/prompts/<name>.txt` and an entry under `tools:` in
a config.
"""
from __future__ import annotations

import importlib
import pkgutil

from toolformer_ray.tools.base import Tool, ToolOptions, stable_fraction

REGISTRY: dict[str, type[Tool]] = {}


def register(cls: type[Tool]) -> type[Tool]:
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"two tools named {cls.name!r}")
    REGISTRY[cls.name] = cls
    return cls


_discovered = False


def _discover() -> None:
    global _discovered
    for mod in pkgutil.iter_modules(__path__):
        if mod.name not in ("base", "executor", "pool"):  # not tool modules
            importlib.import_module(f"{__name__}.{mod.name}")
    _discovered = True


def tool_class(name: str) -> type[Tool]:
    # Not "if not REGISTRY": importing one tool module first (e.g. for a helper) registers only that
    # tool.
    if name not in REGISTRY and not _discovered:
        _discover()
    if name not in REGISTRY:
        raise KeyError(f"unknown tool {name!r}; known tools: {', '.join(tool_names())}")
    return REGISTRY[name]


def tool_names() -> list[str]:
    """Every registered tool's name, sorted."""
    if not _discovered:
        _discover()
    return sorted(REGISTRY)


def build_tool(name: str, options: dict | None = None) -> Tool:
    return tool_class(name)(options)


def build_tools(tool_configs: dict) -> dict[str, Tool]:
    """{name: ToolConfig} -> {name: Tool instance} (loads each tool's read-only resources)."""
    return {name: build_tool(name, tc.options) for name, tc in tool_configs.items()}


__all__ = ["REGISTRY", "Tool", "ToolOptions", "build_tool", "build_tools", "register",
           "stable_fraction", "tool_class", "tool_names"]
