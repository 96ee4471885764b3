"""The documents a user reads: README.md stays short, README.md and docs/ name no path of a particular machine
and link only to files (and headings) that exist in the repository, and every `longitudinal ...` command the
README shows parses with the real CLI."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from longitudinal.cli import app

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md"), REPO / "benchmarks" / "README.md"])
README_MAX_LINES = 210
# Paths of one machine (or of a folder beside the checkout): meaningless, or wrong, anywhere else.
MACHINE_PATH = re.compile(r"(?<![\w.$}])(/work/|/tmp/|/home/|/root/|/Users/|/mnt/|\.\./shared\b)")
ORGANISATION = re.compile(r"\b(session|issue|ticket|stop) [0-9]+\b|\bsession-[0-9]+\b", re.IGNORECASE)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
COMMAND = re.compile(r"(?:^|[\s`(])((?:\.venv/bin/)?longitudinal(?: [^`\n|]*)?)")


def _code(text: str) -> list[str]:
    """Lines of fenced code blocks and inline code spans (joined across a wrapped line)."""
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, re.S)
    lines = [ln for b in blocks for ln in b.splitlines()]
    prose = re.sub(r"```[^\n]*\n.*?```", "", text, flags=re.S)
    spans = re.findall(r"`([^`]+)`", prose.replace("\n", " "))
    return lines + spans


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_no_machine_paths_or_work_organisation(doc: Path) -> None:
    text = doc.read_text()
    bad = [ln for ln in text.splitlines() if MACHINE_PATH.search(ln)]
    assert not bad, f"{doc.name} names paths of one machine (use $WORK-style placeholders): {bad[:3]}"
    words = [m.group(0) for m in ORGANISATION.finditer(text)]
    assert not words, f"{doc.name} speaks of how the work was organised: {words[:3]}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc: Path) -> None:
    dead = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"^[a-z]+:", target) or target.startswith("#") and not target[1:]:
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if REPO not in dest.parents and dest != REPO:
            dead.append(f"{target} (outside the repository)")
        elif not dest.exists():
            dead.append(target)
        elif anchor and dest.suffix == ".md":
            headings = {_slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), re.M)}
            if anchor not in headings:
                dead.append(f"{target} (no such heading)")
    assert not dead, f"{doc.name}: dead links {dead}"


def test_readme_is_short() -> None:
    n = len((REPO / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; details belong in docs/"


def _readme_commands() -> list[list[str]]:
    out = []
    for snippet in _code((REPO / "README.md").read_text()):
        for m in COMMAND.finditer(snippet):
            cmd = re.split(r"\s(?:#|&&|;|>|\|)\s?", m.group(1))[0].strip()
            argv = shlex.split(cmd)[1:]
            if argv:
                out.append(argv)
    return out


COMMANDS = _readme_commands()


def test_readme_shows_the_commands() -> None:
    names = {a for argv in COMMANDS for a in argv if not a.startswith("-")}
    for needed in ("ingest", "train", "forecast", "store", "models", "evaluate", "calibrate", "synth"):
        assert needed in names, needed
    assert len(COMMANDS) >= 15


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a)[:60])
def test_readme_command_parses(argv: list[str]) -> None:
    """Parse the command as the CLI would (options, their types, required arguments) without running it, and
    show the help of the command it names. A bare command name in prose (`longitudinal calibrate`) only has to
    exist."""
    cmd = typer.main.get_command(app)
    args = [a for a in argv if a != "--help"]
    ctx = cmd.make_context("longitudinal", args, resilient_parsing=not args)
    path: list[str] = []
    while hasattr(cmd, "resolve_command"):  # a group: the next word names a command
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        if not rest:
            break
        name, sub, rest = cmd.resolve_command(ctx, rest)
        assert sub is not None, f"unknown command {name!r} in {argv}"
        path.append(name)
        leaf = not hasattr(sub, "resolve_command")
        ctx = sub.make_context(name, rest, parent=ctx, resilient_parsing=leaf and not rest)
        cmd = sub
    assert path or argv == ["--help"], f"no command in {argv}"
    res = CliRunner().invoke(app, [*path, "--help"])
    assert res.exit_code == 0, res.output
