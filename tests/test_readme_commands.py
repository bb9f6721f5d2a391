"""README.md works as written: every command of its ```bash blocks (and every inline `python ...`
command with arguments) composes (`bita.run`) or is accepted by its tool's own parser, the
repository paths it names exist, its layout tree lists every module of bita/, and the venv is
activated before bare `python`. How each kind of command is checked, and what stands in for
placeholders such as `init_from=runs/NAME/...`: tests/readme_commands.py.

Fails on the README as it was before this check: bare `python` came with no
`source .venv/bin/activate`, and the layout tree left out options.py, errors.py, locations.py
and most modules of the sub-packages. test_the_check_reports_each_broken_line_of_a_readme
feeds the checker a README with broken lines (misspelt group option and key, a refused value,
a tool missing required arguments, ...) and asserts each is reported."""

from pathlib import Path

import pytest
import readme_commands as check

README = check.README.read_text(encoding="utf-8")
COMMANDS = check.bash_commands(README) + check.inline_commands(README)

# README commands that cannot be checked here, each with the reason. A listed command that is
# no longer in the README fails test_skipped_commands_are_still_in_the_readme.
SKIPPED: dict[str, str] = {}


@pytest.mark.parametrize("command", COMMANDS, ids=[f"line{c.line}-{c.words[0]}" for c in COMMANDS])
def test_command_works_as_written(command: check.Command, tmp_path: Path):
    if command.text in SKIPPED:
        pytest.skip(SKIPPED[command.text])
    assert check.command_problem(command, tmp_path) is None, f"README.md:{command.line}"


def test_skipped_commands_are_still_in_the_readme():
    assert check.stale_skips(COMMANDS, SKIPPED) == []


def test_repository_paths_it_names_exist():
    assert check.missing_paths(README) == []


def test_layout_lists_every_module():
    assert check.layout_problems(README, check.REPO / "bita") == []


def test_venv_is_activated_before_bare_commands():
    assert check.venv_problem(check.bash_commands(README)) is None


FAKE_README = """\
# fake
```
bita/          the library
  run.py       the entry point
  models/      towers (encoders.py)
  ghost.py     a module that is gone
conf/          configs
```
```bash
python -m bita.run experiment=tiny stage=pretrain1
python -m bita.run stage=pretrain9
python -m bita.run experiment=tiny train.max_stepz=3 \\
    optim.lr=1e-4
python -m bita.run experiment=tiny train.max_steps=abc
python tools/bench_data.py --dataset rsicd --shards data/shards
python tools/make_shards.py --dataset ucm --annotations a.json --images imgs --out data/shards
python tools/no_such_tool.py
python tools/cache_features.py experiment=tiny features.views=2 augment=false
python -m bita.run stage=scst dataset=rsicd init_from=runs/NAME/finetune/checkpoints/best
torchrun --nproc_per_node 5 -m bita.run hardware=gpu_zero2 stage=pretrain1 dataset=all
frobnicate --all
```
See `conf/stage/pretrain1.yaml`, `conf/stage/nothing.yaml`, `tools/*.sh` and `tools/*.rs`;
`python -m bita.caption` names a program, `python -m bita.caption --beams 3` is a command, and
so is `python -m bita.run -m optim.lr=1e-4,2e-4
stage=pretrain1 experiment=tiny`.
"""


def test_the_check_reports_each_broken_line_of_a_readme(tmp_path: Path):
    """The checker itself: a misspelt group option, a misspelt key (over a continuation line),
    a value the compose-time checks refuse, a tool missing a required argument, a missing
    tool, a cache that contradicts its options, a launcher whose processes do not divide the
    batch, an unknown program, a missing path, a layout that lists a gone module and misses
    real ones, and bare python without the venv are all reported; the good lines are not."""
    commands = check.bash_commands(FAKE_README) + check.inline_commands(FAKE_README)
    problems = {c.line: check.command_problem(c, tmp_path) for c in commands}
    good = (10, 16, 19, 25)
    assert [line for line, problem in problems.items() if problem is None] == list(good)
    expected = {
        11: "Could not find 'stage/pretrain9'",
        12: "train.max_stepz",
        14: "train.max_steps='abc': expected an integer >= 1",
        15: "the following arguments are required: --annotations, --images",
        17: "tools/no_such_tool.py: no such file",
        18: "features.views=2 with augment=false",
        20: "multiple of the world size (5 processes)",
        21: "frobnicate: a program this check does not know",
        24: "the following arguments are required: --checkpoint",
    }
    for line, message in expected.items():
        assert message in (problems[line] or ""), (line, problems[line])
    assert check.missing_paths(FAKE_README) == [
        "tools/no_such_tool.py",
        "conf/stage/nothing.yaml",
        "tools/*.rs",
    ]
    layout = check.layout_problems(FAKE_README, check.REPO / "bita")
    assert "bita/caption.py" in layout and "bita/models/ift.py" in layout
    assert "bita/data/" in layout and "bita/ghost.py is listed but does not exist" in layout
    assert "bita/run.py" not in layout and "bita/models/encoders.py" not in layout
    assert check.venv_problem(commands).startswith("README.md:10: `python` before any")
    assert check.stale_skips(commands, {"python tools/no_such_tool.py": "", "gone": ""}) == ["gone"]
