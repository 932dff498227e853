"""Every ``bash`` and ``python`` block of README.md runs, as written, in README order.

The README promises that its commands work on a fresh clone; this runs them from the repository root with
the project's virtual environment first on ``PATH`` (as after ``make setup`` and ``source
.venv/bin/activate``, which the README states). Blocks run in order, so ``make demo`` in the quick start
makes the ``out/demo`` that later snippets open. Templates that need a user's own cluster, bucket or
checkpoint are ``text`` blocks in the README, which this test does not run.

One line is not re-run here: ``make test`` is the command CI itself runs (``.ci/run``), so running it
inside the suite would recurse; :func:`test_ci_runs_the_readme_test_command` checks that CI calls it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FENCE = re.compile(r"^```([A-Za-z0-9_-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
RUNNABLE = ("bash", "python")
CI_COMMAND = re.compile(r"^\s*make test(\s|$)")
BLOCK_TIMEOUT_S = 900


@dataclass(frozen=True)
class Block:
    lang: str
    line: int
    text: str


def readme_blocks() -> list[Block]:
    """The fenced blocks of the README, in order, with the line their fence opens on."""
    text = README.read_text(encoding="utf-8")
    return [Block(m.group(1), text.count("\n", 0, m.start()) + 1, m.group(2)) for m in FENCE.finditer(text)]


def _runnable() -> list[Block]:
    return [b for b in readme_blocks() if b.lang in RUNNABLE]


def _env() -> dict[str, str]:
    venv = ROOT / ".venv"
    env = dict(os.environ)
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    return env


def _bash_script(block: Block) -> str:
    lines = [line for line in block.text.splitlines() if not CI_COMMAND.match(line)]
    return "set -euo pipefail\n" + "\n".join(lines) + "\n"


@pytest.mark.parametrize("block", _runnable(), ids=lambda b: f"L{b.line}-{b.lang}")
def test_readme_block_runs(block: Block, tmp_path: Path) -> None:
    if block.lang == "bash":
        cmd = ["bash", "-c", _bash_script(block)]
    else:
        script = tmp_path / f"readme_L{block.line}.py"
        script.write_text(block.text, encoding="utf-8")
        cmd = [str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else sys.executable, str(script)]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S, check=False
    )
    assert proc.returncode == 0, (
        f"README.md block at line {block.line} ({block.lang}) exited {proc.returncode}\n"
        f"--- block ---\n{block.text}\n--- stdout (tail) ---\n{proc.stdout[-4000:]}\n"
        f"--- stderr (tail) ---\n{proc.stderr[-4000:]}"
    )


def test_readme_has_the_two_commands() -> None:
    """The quick start keeps the two fresh-machine commands: the main job and the tests."""
    first = next(b for b in readme_blocks() if b.lang == "bash")
    commands = [line.split("#")[0].strip() for line in first.text.splitlines()]
    assert "make demo" in commands and "make test" in commands


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert any(CI_COMMAND.match(line) for line in ci.splitlines()), ".ci/run must run the README's `make test`"


def test_fence_parser_sees_every_block() -> None:
    """Every opening fence is matched (an unbalanced fence would hide the blocks after it)."""
    text = README.read_text(encoding="utf-8")
    fences = sum(1 for line in text.splitlines() if line.startswith("```"))
    assert fences == 2 * len(readme_blocks())
