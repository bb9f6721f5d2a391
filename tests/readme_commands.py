"""Check README.md against the code: its commands work as written, the repository paths it
names exist, and its layout tree lists every module of `bita/`.

A README drifts silently: an option is renamed, a tool gains a required argument, a module
is added, and the commands a new user copies fail. tests/test_readme_commands.py runs these
checks in the default suite (so in CI). The commands are every line of the ```bash blocks and
every inline `python ...` / launcher span of the prose that gives arguments. How each is checked:

- `python -m bita.run ARGS`, also after `torchrun ... -m` / `deepspeed ... --module`: ARGS are
  composed by `bita.run.compose_config`, which runs Hydra and the compose-time option checks.
  `-m` composes every combination of the sweep's values; `--cfg X` is dropped. A launcher's
  process count (`--nproc_per_node` x `--nnodes`, `--num_gpus`) must divide each training
  stage's global batch into micro-batches.
- `python tools/NAME.py ARGS` and `python -m bita.MODULE ARGS`: the tool's `main(ARGS)` runs
  until its argparse parser has accepted ARGS (or, for a tool without one, until it composes
  its overrides) and is stopped there, before it does any work; the KEY=VALUE arguments its
  parser leaves (`parse_known_args`) are composed as above.
- `bash tools/NAME.sh ...`: the script exists.
- other programs: see NOT_CHECKED; a program in neither list is reported.

The README's placeholders and what stands in for them:
- `init_from=VALUE` (`runs/NAME/finetune/checkpoints/best`, `RUN_FOLDER/...`, `...`): a
  checkpoint folder whose `config.yaml` is the same command composed without `init_from`, as
  the README's earlier command would have left it (no weights: composing reads none);
- `...` or `…` as a whole word ("plus the options of the command above"): dropped;
- `[--flag VALUE]` (optional arguments): the brackets are dropped, so the arguments are checked.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import itertools
import re
import shlex
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from unittest import mock

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import bita.run
from bita.engine.deepspeed_config import batch_layout
from bita.stages.pipeline import effective_config, stage_sequence

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# Programs whose command lines are not checked, and why.
NOT_CHECKED = {
    "mlflow": "MLflow's own command line",
    "curl": "a request to a server the README starts",
    "source": "activates the virtual environment that tools/setup.sh creates",
}
# `python -m MODULE` commands that are not checked, and why.
MODULES_NOT_CHECKED = {"pytest": "the test suite, which these checks are part of"}
PYTHONS = {"python", "python3", ".venv/bin/python"}
LAUNCHERS = {"torchrun": ("-m",), "deepspeed": ("--module",)}
# `python -m bita.run` flags: how many words each takes with it; all are left out of composing.
HYDRA_FLAGS = {"-m": 0, "--multirun": 0, "--cfg": 1, "-c": 1, "--package": 1, "-p": 1}
ELLIPSES = {"...", "…"}
CHAINS = {"&&", "||", ";", "|"}
ACTIVATE = ("source .venv/bin/activate", ". .venv/bin/activate")
BARE_PROGRAMS = {"python", "python3", "mlflow", "torchrun", "deepspeed", "pytest"}
REPO_PATH = re.compile(
    r"(?<![\w./-])(?:bita|conf|experiments|tools|tests|hydra_plugins|\.ci)/[\w./*-]*"
)


@dataclass(frozen=True)
class Command:
    """One command of the README: its line, the whole logical line or inline span as written
    (continuations joined; the key of the skip list) and its words."""

    line: int
    text: str
    words: tuple[str, ...]


class ArgumentsAccepted(BaseException):
    """Stops a tool's main() once its command line is accepted, before it does any work; a
    BaseException so that no `except Exception` in the tool catches it."""

    def __init__(self, overrides: list[str]) -> None:
        super().__init__(overrides)
        self.overrides = overrides


# ---------------------------------------------------------------- reading the README


def fenced_blocks(markdown: str) -> Iterator[tuple[str, int, list[str]]]:
    """(language, line number of the first line, lines) of every fenced block."""
    lines = markdown.splitlines()
    opened: tuple[str, int] | None = None
    for number, line in enumerate(lines, 1):
        if not line.strip().startswith("```"):
            continue
        if opened is None:
            opened = (line.strip()[3:].strip(), number + 1)
        else:
            language, start = opened
            yield language, start, lines[start - 1 : number - 1]
            opened = None


def bash_commands(markdown: str) -> list[Command]:
    """Every command of every ```bash block: `\\` continuations joined, comments dropped, and
    `a && b` chains split into their commands."""
    commands = []
    for language, first, lines in fenced_blocks(markdown):
        if language != "bash":
            continue
        logical: list[tuple[int, str]] = []
        for number, line in enumerate(lines, first):
            if logical and logical[-1][1].endswith("\\"):
                logical[-1] = (logical[-1][0], logical[-1][1][:-1] + " " + line.strip())
            else:
                logical.append((number, line.strip()))
        for number, text in logical:
            words = [_unbracketed(w) for w in shlex.split(text, comments=True)]
            commands += [Command(number, text, tuple(piece)) for piece in _split_chain(words)]
    return commands


def inline_commands(markdown: str) -> list[Command]:
    """The commands written as inline code in the prose (`python -m bita.run stage=scst ...`):
    spans outside fenced blocks that start with python or a launcher and give it arguments. A
    bare `python -m bita.caption` or `torchrun` names a program; `missing_paths` checks that a
    named `tools/...` script exists."""
    lines = markdown.splitlines()
    for _, first, block in fenced_blocks(markdown):
        lines[first - 2 : first + len(block)] = [""] * (len(block) + 2)
    prose = "\n".join(lines)
    commands = []
    for span in re.finditer(r"`([^`]+)`", prose):
        text = " ".join(span.group(1).split())
        words = tuple(shlex.split(text))
        if words[0] in PYTHONS | set(LAUNCHERS) and len(words) > _program_length(words):
            line = prose.count("\n", 0, span.start()) + 1
            commands.append(Command(line, text, words))
    return commands


def _program_length(words: tuple[str, ...]) -> int:
    """How many of `words` name the program: `torchrun`, `python PATH` or `python -m MODULE`."""
    if words[0] in LAUNCHERS:
        return 1
    return 3 if words[1:2] == ("-m",) else 2


def _unbracketed(word: str) -> str:
    """`[--batch-size` -> `--batch-size`, `16]` -> `16`: optional arguments, checked as given."""
    if word.startswith("[-"):
        return word[1:]
    return word[:-1] if word.endswith("]") and "[" not in word else word


def _split_chain(words: list[str]) -> list[list[str]]:
    pieces: list[list[str]] = [[]]
    for word in words:
        if word in CHAINS:
            pieces.append([])
        else:
            pieces[-1].append(word)
    return [p for p in pieces if p]


def _without_env(words: tuple[str, ...]) -> list[str]:
    """The command without its leading `VAR=value` assignments."""
    rest = list(words)
    while rest and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", rest[0]):
        rest.pop(0)
    return rest


# ---------------------------------------------------------------- checking one command


def command_problem(command: Command, scratch: Path) -> str | None:
    """What is wrong with `command` as written (None: it works); `scratch` is an empty folder
    for the stand-in checkpoints."""
    words = _without_env(command.words)
    program, args = words[0], words[1:]
    try:
        if program in PYTHONS:
            return _python_problem(args, scratch)
        if program in LAUNCHERS:
            return _launcher_problem(program, args, scratch)
        if program == "bash":
            return None if (REPO / args[0]).is_file() else f"{args[0]}: no such script"
        if program in NOT_CHECKED:
            return None
        return f"{program}: a program this check does not know (add it to NOT_CHECKED)"
    except Exception as err:  # any failure is the command's problem, reported with its type
        return f"{type(err).__name__}: {err}"


def _python_problem(args: list[str], scratch: Path) -> str | None:
    if args[0] == "-m":
        module, rest = args[1], args[2:]
        if module in MODULES_NOT_CHECKED:
            return None
        if module == "bita.run":
            compose_run(rest, scratch)
            return None
        return tool_problem(importlib.import_module(module), rest, scratch)
    path = REPO / args[0]
    if not path.is_file():
        return f"{args[0]}: no such file"
    return tool_problem(load_tool(path), args[1:], scratch)


def _launcher_problem(program: str, args: list[str], scratch: Path) -> str | None:
    """`torchrun ... -m bita.run ARGS` or `deepspeed ... --module bita.run ARGS`."""
    flag = next((i for i, w in enumerate(args) if w in LAUNCHERS[program]), None)
    if flag is None or args[flag + 1] != "bita.run":
        return f"{program}: expected `{LAUNCHERS[program][0]} bita.run` among its arguments"
    launcher, run_args = args[:flag], args[flag + 2 :]
    for cfg in compose_run(run_args, scratch):
        check_batch_division(cfg, launcher_world_size(launcher))
    return None


def launcher_world_size(launcher_args: list[str]) -> int | None:
    """Processes a launcher starts, where its arguments say (None: a hostfile decides)."""
    counts = dict(zip(launcher_args, launcher_args[1:], strict=False))
    per_node = counts.get("--nproc_per_node") or counts.get("--num_gpus")
    if per_node is None or not per_node.isdigit():
        return None
    nodes = counts.get("--nnodes", "1")
    return int(per_node) * int(nodes) if nodes.isdigit() else None


def check_batch_division(cfg, world_size: int | None) -> None:
    """Each training stage's global batch splits into micro-batches on `world_size` processes
    (the run stops at start-up otherwise)."""
    if world_size is None:
        return
    for stage_cfg in stage_sequence(cfg):
        if "train" in stage_cfg:
            eff = effective_config(cfg, stage_cfg, {}, None)
            batch_layout(eff.hardware, eff.train, world_size)


# ---------------------------------------------------------------- composing bita.run


def compose_run(args: list[str], scratch: Path) -> list:
    """The configs `python -m bita.run ARGS` composes (one per sweep combination), with the
    README's placeholders replaced (module docstring)."""
    overrides, multirun = _overrides(args)
    combinations = sweep_combinations(overrides) if multirun else [overrides]
    return [bita.run.compose_config(_with_checkpoint(c, scratch)) for c in combinations]


def _overrides(args: list[str]) -> tuple[list[str], bool]:
    """The Hydra overrides among `args`, and whether `-m` asks for a sweep."""
    overrides, multirun, skip = [], False, 0
    for word in args:
        if skip:
            skip -= 1
        elif word in HYDRA_FLAGS:
            multirun |= word in ("-m", "--multirun")
            skip = HYDRA_FLAGS[word]
        elif word.startswith("-"):
            raise ValueError(f"bita.run: flag {word} is neither an override nor a Hydra flag")
        elif word not in ELLIPSES:
            overrides.append(word)
    return overrides, multirun


def sweep_combinations(overrides: list[str]) -> list[list[str]]:
    """Every job of a `-m` sweep: one value of each swept key, as Hydra's basic sweeper runs."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = [
        [f"{o.get_key_element()}={value}" for value in o.sweep_string_iterator()]
        if o.is_sweep_override()
        else [text]
        for text, o in zip(overrides, parsed, strict=True)
    ]
    return [list(job) for job in itertools.product(*choices)]


def _with_checkpoint(overrides: list[str], scratch: Path) -> list[str]:
    """`overrides` with any `init_from=` pointed at a stand-in checkpoint of the same command."""
    given = [o for o in overrides if o.split("=", 1)[0] == "init_from"]
    if not given:
        return overrides
    rest = [o for o in overrides if o not in given]
    folder = scratch / f"checkpoint{len(list(scratch.iterdir()))}"
    folder.mkdir(parents=True)
    config = bita.run.compose_config(rest)
    OmegaConf.save(OmegaConf.to_container(config, resolve=True), folder / "config.yaml")
    (folder / "trainer_state.json").write_text("{}")
    return [*rest, f"init_from={folder}"]


# ---------------------------------------------------------------- tools


def load_tool(path: Path) -> ModuleType:
    """Import `tools/NAME.py` by name, with tools/ on the path, as the tools import each other."""
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    module = importlib.import_module(path.stem)
    if Path(module.__file__).resolve() != path.resolve():
        raise ImportError(f"{path.stem} imports {module.__file__}, not {path}")
    return module


def tool_problem(module: ModuleType, args: list[str], scratch: Path) -> str | None:
    """Whether the tool's own parser accepts `args` (and its overrides compose)."""
    if not hasattr(module, "main"):
        return f"{module.__name__}: no main() to check its arguments with"
    composes = getattr(module, "compose_config", None) is bita.run.compose_config
    if not composes and "argparse" not in vars(module):
        return f"{module.__name__}: neither argparse nor compose_config; cannot check it dry"
    stderr = io.StringIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stderr(stderr))
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        stack.enter_context(stop_once_parsed())
        if composes:
            stack.enter_context(mock.patch.object(module, "compose_config", _accept))
        try:
            module.main([w for w in args if w not in ELLIPSES])
        except ArgumentsAccepted as accepted:
            if accepted.overrides:
                compose_run(accepted.overrides, scratch)
            return None
        except SystemExit as exit_:
            lines = stderr.getvalue().strip().splitlines() or [f"exit status {exit_.code}"]
            return f"{module.__name__}: {lines[-1]}"
    return f"{module.__name__}: main() returned without parsing its arguments"


def _accept(overrides: list[str]) -> None:
    raise ArgumentsAccepted(list(overrides))


@contextlib.contextmanager
def stop_once_parsed() -> Iterator[None]:
    """argparse raises ArgumentsAccepted(leftover arguments) when the outermost parse of a
    command line succeeds; parses nested in it (sub-parsers, `parse_args` calling
    `parse_known_args`) run as usual, so every check of the outer parse still applies."""
    depth = 0

    def stopping(original: Callable, leftovers: Callable) -> Callable:
        def parse(self, *args, **kwargs):
            nonlocal depth
            depth += 1
            try:
                result = original(self, *args, **kwargs)
            finally:
                depth -= 1
            if depth == 0:
                raise ArgumentsAccepted(leftovers(result))
            return result

        return parse

    parser = argparse.ArgumentParser
    with (
        mock.patch.object(parser, "parse_args", stopping(parser.parse_args, lambda _: [])),
        mock.patch.object(
            parser, "parse_known_args", stopping(parser.parse_known_args, lambda r: r[1])
        ),
    ):
        yield


# ---------------------------------------------------------------- the rest of the README


def missing_paths(markdown: str) -> list[str]:
    """Repository paths the README names (`conf/...`, `tools/...`, ...) that do not exist;
    a `*` in one is a glob that must match something."""
    missing = []
    for match in REPO_PATH.finditer(markdown):
        path = match.group().rstrip(".,:")
        found = any(REPO.glob(path)) if "*" in path else (REPO / path).exists()
        if not found and path not in missing:
            missing.append(path)
    return missing


def layout_problems(markdown: str, package: Path) -> list[str]:
    """Modules and packages of `package` (bita/) that the README's layout tree does not list
    where they are, and entries it lists that do not exist."""
    entries = layout_entries(markdown, package.name)
    modules = " ".join(f"{n} {text}" for n, text in entries.items() if not n.endswith("/"))
    problems = [f"{package.name}/{m.name}" for m in _modules(package) if not _names(modules, m)]
    for sub in (p for p in sorted(package.iterdir()) if p.is_dir() and _is_part(p)):
        listed = entries.get(f"{sub.name}/")
        if listed is None:
            problems.append(f"{package.name}/{sub.name}/")
            continue
        problems += [
            f"{package.name}/{sub.name}/{m.name}" for m in _parts(sub) if not _names(listed, m)
        ]
    problems += [
        f"{package.name}/{name} is listed but does not exist"
        for name in entries
        if not (package / name).exists()
    ]
    return problems


def layout_entries(markdown: str, package: str) -> dict[str, str]:
    """The entries under `PACKAGE/` in the layout tree (```-block beginning with it): entry name
    (`run.py`, `models/`) -> its description, continuation lines included."""
    for language, _, lines in fenced_blocks(markdown):
        if not language and lines and lines[0].startswith(f"{package}/"):
            break
    else:
        return {}
    entries: dict[str, str] = {}
    name = None
    for line in lines[1:]:
        indent = len(line) - len(line.lstrip())
        if indent == 0:
            break
        if indent == 2:
            name, _, text = line.strip().partition(" ")
            entries[name] = text.strip()
        elif name is not None:
            entries[name] += " " + line.strip()
    return entries


def _is_part(path: Path) -> bool:
    return not path.name.startswith(("_", "."))


def _modules(package: Path) -> list[Path]:
    return [p for p in sorted(package.glob("*.py")) if _is_part(p)]


def _parts(package: Path) -> list[Path]:
    """A sub-package's modules and folders (e.g. data/demo/)."""
    return [
        p for p in sorted(package.iterdir()) if _is_part(p) and (p.is_dir() or p.suffix == ".py")
    ]


def _names(text: str, path: Path) -> bool:
    name = f"{path.name}/" if path.is_dir() else path.name
    return re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", text) is not None


def venv_problem(commands: list[Command]) -> str | None:
    """The README must activate the venv before its first bare `python`/`mlflow`/... command."""
    for command in commands:
        if " ".join(command.words).startswith(ACTIVATE):
            return None
        words = _without_env(command.words)
        if words[0] in BARE_PROGRAMS:
            return (
                f"README.md:{command.line}: `{words[0]}` before any `{ACTIVATE[0]}` "
                "(only .venv/bin/python works without it)"
            )
    return None


def stale_skips(commands: list[Command], skips: dict[str, str]) -> list[str]:
    """Skip-list entries that no command of the README is any more."""
    written = {command.text for command in commands}
    return [text for text in skips if text not in written]
