"""Every shell example runs as written: the ``examples:`` of each ``moeray ... --help``, and the
fenced ``bash`` blocks of README.md and docs/*.md.

An example is a command (backslash continuations and here-documents included). The commands of
one help text or one fenced block run in order, each in its own ``bash``, from one fresh
directory outside the checkout that holds the user's files the examples name (``trace.npz``,
``my_trace.npz``, ``routing.csv``, ``prompts.txt``; tiny ones); each must exit 0 within
``TIMEOUT_S``. A command identical to one that already passed in an earlier block without
writing anything is not run again (``moeray replay`` appears in four places, and each run starts
a local Ray).

What a fresh directory cannot give is marked in the example itself, with a comment:

- ``# ... needs: WHAT`` at the end of a command: that command is not run;
- a line ``# needs: WHAT`` alone in a block: none of the block is run;
- ``needs: the hf extra``: run when torch and transformers are installed.

``pip`` and ``ray`` commands (installing, starting clusters) must be marked.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
# a guard against hangs, not a speed goal (those live in benchmarks/): the pure-Python twin is
# tens of times slower, so its examples get longer
TIMEOUT_S = 180 if os.environ.get("MOERAY_PURE_PYTHON", "") not in ("", "0") else 60
_NEEDS = re.compile(r"#[^\n]*\bneeds:\s*([^\n]*)")
_HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")
_FENCE = re.compile(r"^```bash[ \t]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
_MUST_BE_MARKED = ("pip", "ray")


@dataclass(frozen=True)
class Command:
    text: str
    needs: str  # "" when the command runs here

    @property
    def words(self) -> str:
        """The command without its comments: the same command wherever it is shown."""
        try:
            return " ".join(shlex.split(self.text, comments=True))
        except ValueError:
            return self.text

    @property
    def runnable(self) -> bool:
        if not self.needs:
            return True
        if self.needs.startswith("the hf extra"):
            return all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
        return False


@dataclass(frozen=True)
class Block:
    where: str  # "README.md:36" or "moeray replay --help"
    commands: tuple[Command, ...]


def _needs(text: str) -> str:
    """WHAT of a ``needs: WHAT`` comment, without the parenthesis that may enclose the mark."""
    found = _NEEDS.search(text)
    if not found:
        return ""
    what = found.group(1).strip()
    if what.endswith(")") and what.count(")") > what.count("("):
        what = what[:-1].rstrip()
    return what


def split_commands(lines: list[str]) -> tuple[Command, ...]:
    """Commands of a block: continuation lines and here-documents joined; comment-only lines
    dropped, but a ``# needs: WHAT`` line marks every command of the block."""
    block_needs = next(
        (m.group(1).strip() for line in lines if (m := re.match(r"\s*#\s*needs:(.*)", line))), ""
    )
    commands, i = [], 0
    while i < len(lines):
        parts = [lines[i]]
        i += 1
        if not parts[0].strip() or parts[0].lstrip().startswith("#"):
            continue
        while parts[-1].rstrip().endswith("\\") and i < len(lines):
            parts.append(lines[i])
            i += 1
        heredoc = _HEREDOC.search(parts[0])
        if heredoc:
            while i < len(lines):
                parts.append(lines[i])
                i += 1
                if parts[-1].strip() == heredoc.group(1):
                    break
        text = "\n".join(parts)
        commands.append(Command(text, block_needs or _needs(text)))
    return tuple(commands)


def _subcommand_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommand_parsers(sub, path + (name,))


def help_blocks() -> list[Block]:
    """The ``examples:`` section of every ``moeray <command> --help``, one block per command."""
    from moeray.cli import _parser

    blocks = []
    for path, parser in _subcommand_parsers(_parser()):
        lines = parser.format_help().splitlines()
        if "examples:" not in lines:
            continue
        example_lines = []
        for line in lines[lines.index("examples:") + 1 :]:
            if not line.startswith(" "):
                break
            example_lines.append(line.strip())
        blocks.append(Block(f"moeray {' '.join(path)} --help", split_commands(example_lines)))
    return blocks


def document_blocks() -> list[Block]:
    """The fenced ``bash`` blocks of README.md and docs/*.md."""
    blocks = []
    for document in DOCUMENTS:
        text = document.read_text()
        for fence in _FENCE.finditer(text):
            line = text.count("\n", 0, fence.start()) + 1
            where = f"{document.relative_to(REPO_ROOT)}:{line}"
            blocks.append(Block(where, split_commands(fence.group(1).splitlines())))
    return blocks


BLOCKS = help_blocks() + document_blocks()


def test_examples_are_found():
    helps = {block.where for block in BLOCKS if block.where.endswith("--help")}
    for command in ("replay", "convert", "record", "shards synth", "place"):
        assert f"moeray {command} --help" in helps
    assert all(block.commands for block in BLOCKS), [b.where for b in BLOCKS if not b.commands]
    documents = {
        block.where.split(":")[0] for block in BLOCKS if not block.where.endswith("--help")
    }
    assert {"README.md", "docs/shards.md", "docs/user-guide.md", "docs/placement.md"} <= documents


def test_installs_and_clusters_are_marked():
    unmarked = [
        f"{block.where}: {command.text}"
        for block in BLOCKS
        for command in block.commands
        if command.text.split()[0] in _MUST_BE_MARKED and not command.needs
    ]
    assert not unmarked, "mark with `# needs: ...` (see tests/test_examples.py):\n" + "\n".join(
        unmarked
    )


def test_splitting_joins_continuations_and_heredocs():
    commands = split_commands(
        [
            "# a comment",
            "moeray a \\",
            "    --b   # needs: c",
            "cat > x.json <<'EOF'",
            '{"a": 1}',
            "EOF",
            "moeray d",
        ]
    )
    assert [c.text.splitlines()[0] for c in commands] == [
        "moeray a \\",
        "cat > x.json <<'EOF'",
        "moeray d",
    ]
    assert [c.needs for c in commands] == ["c", "", ""]
    assert commands[1].text.endswith("EOF")
    assert all(c.needs == "a cluster" for c in split_commands(["# needs: a cluster", "moeray e"]))


def _write_user_files(folder: Path) -> None:
    """Tiny stand-ins for the files examples name as the user's own."""
    rng = np.random.default_rng(0)
    for name, tokens in (("trace.npz", 400), ("my_trace.npz", 400)):
        # 24 layers x 32 experts, top-4 distinct ids per token: the bundled trace's shape
        ids = np.argsort(rng.random((tokens, 24, 32)), axis=-1)[..., :4].astype(np.int32)
        np.savez(folder / name, expert_ids=ids, num_experts=np.int64(32))
    rows = [
        f"{layer},{token}," + ",".join(map(str, rng.choice(64, 2, replace=False)))
        for token in range(50)
        for layer in range(4)
    ]
    (folder / "routing.csv").write_text("\n".join(rows) + "\n")
    (folder / "prompts.txt").write_text("The capital of France is\nMixture of experts route\n")


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # a new user's shell: no cluster to join
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MPLBACKEND"] = "Agg"
    return env


def _listing(folder: Path) -> set[tuple[str, int, int]]:
    return {
        (str(p.relative_to(folder)), p.stat().st_mtime_ns, p.stat().st_size)
        for p in folder.rglob("*")
        if p.is_file()
    }


def _run(command: str, cwd: Path) -> tuple[int | None, str]:
    """(exit status, output tail); None when it ran over TIMEOUT_S, after a Ctrl-C (moeray shuts
    its Ray down on one) and then a kill of the command's own process group."""
    proc = subprocess.Popen(
        ["bash", "-c", f"set -e -o pipefail\n{command}"],
        cwd=cwd,
        env=_environment(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
        return proc.returncode, output[-3000:]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        return None, output[-3000:]


_PASSED_WITHOUT_WRITING: set[str] = set()


@pytest.mark.parametrize("block", BLOCKS, ids=[block.where for block in BLOCKS])
def test_example_runs_as_written(block, tmp_path_factory):
    runnable = [command for command in block.commands if command.runnable]
    if not runnable:
        needs = sorted({command.needs for command in block.commands})
        pytest.skip(f"not runnable here, needs: {'; '.join(needs)}")
    folder = tmp_path_factory.mktemp("example")
    assert REPO_ROOT not in folder.parents
    _write_user_files(folder)
    for command in runnable:
        if command.words in _PASSED_WITHOUT_WRITING:
            continue
        before = _listing(folder)
        status, output = _run(command.text, folder)
        assert status is not None, f"{block.where}: over {TIMEOUT_S} s: {command.text}\n{output}"
        assert status == 0, f"{block.where}: exit {status}: {command.text}\n{output}"
        if _listing(folder) == before:
            _PASSED_WITHOUT_WRITING.add(command.words)
