"""Tool registry. A tool is one module in this package that defines a `Tool` subclass decorated with
`@register`, plus its prompt file `toolformer_ray/prompts/<name>.txt` and an entry under `tools:` in a config.
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


def _discover() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if mod.name not in ("base", "pool"):
            importlib.import_module(f"{__name__}.{mod.name}")


def tool_class(name: str) -> type[Tool]:
    if not REGISTRY:
        _discover()
    if name not in REGISTRY:
        raise KeyError(f"unknown tool {name!r}; known tools: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def build_tool(name: str, options: dict | None = None) -> Tool:
    return tool_class(name)(options)


def build_tools(tool_configs: dict) -> dict[str, Tool]:
    """{name: ToolConfig} -> {name: Tool instance} (loads each tool's read-only resources)."""
    return {name: build_tool(name, tc.options) for name, tc in tool_configs.items()}


__all__ = ["REGISTRY", "Tool", "ToolOptions", "build_tool", "build_tools", "register", "stable_fraction",
           "tool_class"]
