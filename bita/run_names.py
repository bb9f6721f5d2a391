"""Run folder names built from a run's overrides, and the MLflow run name that matches them.

A run lives in `<paths.runs>/<name>/<overrides>`, so re-running a command finds its own folder
and resumes. Override values are not always folder-safe: a path would nest folders, and
characters such as `*`, `{` or spaces make names a shell mangles. `folder_name` keeps the
folder one level deep and readable: a path-like value is shortened to its last component, an
unsafe character becomes `_`, and either change appends a short hash of the original value,
so two different values never share a folder. The MLflow run name is the run folder relative
to `paths.runs`, the same on every machine.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from omegaconf import OmegaConf

RESOLVER = "bita.folder_name"
ITEM_SEP, KV_SEP = "+", "-"  # hydra.job.config.override_dirname in conf/config.yaml
_DROPPED = re.compile(r"[\[\]{}()'\" ]")  # list/dict punctuation and quotes: cosmetic only
_UNSAFE = re.compile(r"[^\w.,=@-]")  # what stays is safe in a folder name and a shell word
_MAX_LEN = 200  # one folder name (filesystems allow 255 bytes)


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:6]


def safe_value(value: str) -> str:
    """One override value as a folder-name part (see the module docstring)."""
    if "/" in value or "\\" in value:
        last = [part for part in re.split(r"[/\\]", value) if part][-1:] or ["root"]
        return f"{_UNSAFE.sub('_', _DROPPED.sub('', last[0]))}_{_short_hash(value)}"
    kept = _DROPPED.sub("", value)
    safe = _UNSAFE.sub("_", kept)
    return safe if safe == kept else f"{safe}_{_short_hash(value)}"


def folder_name(override_dirname: str) -> str:
    """Hydra's `override_dirname` ("key-value+key-value") made safe as one folder name."""
    items = []
    for item in str(override_dirname).split(ITEM_SEP):
        key, sep, value = item.partition(KV_SEP)
        items.append(f"{_UNSAFE.sub('_', key)}{sep}{safe_value(value)}" if sep else item)
    name = ITEM_SEP.join(items)
    if len(name) > _MAX_LEN:
        name = f"{name[: _MAX_LEN - 7]}_{_short_hash(name)}"
    return name


def run_name(run_dir: str | Path, runs_root: str | Path) -> str:
    """The MLflow run name of `run_dir`: its path below `runs_root` (`tiny/stage-finetune`),
    or the path itself when it lies elsewhere."""
    run_dir = Path(run_dir).resolve()
    try:
        return run_dir.relative_to(Path(runs_root).resolve()).as_posix()
    except ValueError:
        return run_dir.as_posix()


def register_resolver() -> None:
    """Make `${bita.folder_name:...}` available to `hydra.run.dir` / `hydra.sweep.subdir`."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, folder_name)
