"""The result: one JSON object per run and a Markdown table of it."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any

import torch
import transformers

from .config import Precision
from .presets import PHASES
from .timing import Bench


def report(
    settings: Any,
    precision: Precision,
    bench: Bench,
    flops: dict[str, dict[str, float]],
    lm_tokens: int,
) -> dict[str, Any]:
    """The JSON result: images/s per side and phase, ratios, FLOPs, MFU on CUDA, targets."""
    device, preset = settings.device, settings.preset
    ours, theirs = bench.rates["ours"], bench.rates["theirs"]
    ratio = {p: ours[p] / theirs[p] for p in PHASES if p in ours and p in theirs}
    result: dict[str, Any] = {
        "bench": "bita",
        "preset": settings.preset_name,
        "device": device.type,
        "device_name": _device_name(device),
        "threads": torch.get_num_threads(),
        "precision": precision.name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "warmup": settings.warmup,
        "iters": settings.iters,
        "batch": settings.batch,
        "new_tokens": settings.new_tokens,
        "lm_text_tokens": lm_tokens,
        "ours": _rounded(ours),
        "theirs": _rounded(theirs),
        "ratio": _rounded(ratio, 3),
        "gflops_per_image": {
            side: {k: float(f"{v / 1e9:.4g}") for k, v in f.items()} for side, f in flops.items()
        },
    }
    if device.type == "cuda":
        peak = settings.peak_tflops * 1e12
        result["peak_tflops"] = settings.peak_tflops
        result["mfu"] = {
            side: _rounded({p: flops[side][p] * rate / peak for p, rate in rates.items()}, 4)
            for side, rates in bench.rates.items()
        }
    figures = {
        **{f"ours.{k}": v for k, v in ours.items()},
        **{f"ratio.{k}": v for k, v in ratio.items()},
    }
    result["targets"] = preset.targets
    result["met"] = {
        key: key in figures and figures[key] >= goal for key, goal in preset.targets.items()
    }
    if preset.reference:
        result["reference"] = preset.reference
    if bench.errors:
        result["errors"] = bench.errors
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    names = re.findall(r"model name\s*:\s*(.+)", cpuinfo.read_text()) if cpuinfo.exists() else []
    return f"{names[0] if names else platform.machine()}, {os.cpu_count()} cores"


def _rounded(values: dict[str, float], digits: int = 1) -> dict[str, float]:
    return {k: round(v, digits) for k, v in values.items()}


def table(result: dict[str, Any]) -> str:
    """A Markdown table of images/s per phase, ours beside theirs, with the targets."""
    mfu = result.get("mfu")
    head = "| phase | batch | ours img/s | BLIP-2 img/s | ours/theirs | target |"
    rule = "|---|---|---|---|---|---|"
    if mfu:
        head += " MFU ours | MFU theirs |"
        rule += "---|---|"
    lines = [head, rule]
    for phase in PHASES:
        cells = [
            phase,
            str(result["batch"][phase]),
            _cell(result["ours"].get(phase)),
            _cell(result["theirs"].get(phase)),
            _cell(result["ratio"].get(phase), "{:.2f}x"),
            _target_cell(result, phase),
        ]
        if mfu:
            cells += [
                _cell(mfu["ours"].get(phase), "{:.1%}"),
                _cell(mfu["theirs"].get(phase), "{:.1%}"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: float | None, fmt: str = "{:,.1f}") -> str:
    return "—" if value is None else fmt.format(value)


def _target_cell(result: dict[str, Any], phase: str) -> str:
    parts = []
    for key, goal in result["targets"].items():
        kind, _, target_phase = key.partition(".")
        if target_phase != phase:
            continue
        mark = "met" if result["met"][key] else "NOT met"
        text = f">= {goal:g}x theirs" if kind == "ratio" else f">= {goal:,.0f} img/s"
        parts.append(f"{text} ({mark})")
    if phase in result.get("reference", {}):
        parts.append(f"reference stack {result['reference'][phase]:g} img/s")
    return "; ".join(parts) or "—"
