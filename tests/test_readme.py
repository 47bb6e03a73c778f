"""The README and the guides under docs/ (issue 15): every ``ncsn-train``, ``ncsn-sample``,
``ncsn-eval`` and ``ncsn-import`` command in their code blocks is valid as written, the
quick start's Swiss-roll commands run, and no relative link is dead.

"Valid" is what the commands' own pre-flight checks say (:mod:`ncsn.cli.precheck`): the
command line composes, every key is one a schema declares, the values fit, the parts fit
together. The one check left out is that a ``ckpt=`` file exists: the guides name
checkpoints a reader's own runs will write (``ckpt=runs/swissroll/checkpoints/last.pt``),
and whether a file is on disk says nothing about the command. The same goes for the files
``ncsn-import`` reads. Commands that cannot be checked this way are listed in ``SKIPPED``
with the reason; each entry must still match a command of the docs.
"""
from __future__ import annotations

import contextlib
import io
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_cli

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PROGRAMS = {"ncsn-train": "train", "ncsn-sample": "sample", "ncsn-eval": "eval",
            "ncsn-import": "import"}
MODULES = {"ncsn.cli.train": "ncsn-train", "ncsn.cli.sample": "ncsn-sample",
           "ncsn.cli.eval": "ncsn-eval", "ncsn.cli.import_": "ncsn-import"}
# Hydra's flags that print or sweep rather than run one job; what follows them is checked.
PRINT_FLAGS = {"--cfg": 1, "-c": 1, "--info": 0, "-i": 0, "--resolve": 0}
SWEEP_FLAGS = {"-m", "--multirun"}
HELP_FLAGS = {"--help", "-h"}
# Programs that run a command given after their own options.
LAUNCHERS = {"srun", "torchrun", "python", "python3", "time", "exec", "sudo"}

# Commands of the docs that are not checked, each with the reason: (document, the command
# as extracted, reason). An entry that no longer matches a command fails the test, so the
# list stays the list of what is actually skipped.
SKIPPED: list[tuple[str, str, str]] = []


def code_blocks(text: str) -> list[tuple[int, list[str]]]:
    """``(line number of the first line, lines)`` of each fenced code block."""
    blocks, current, fence = [], None, None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if fence is None and stripped.startswith(("```", "~~~")):
            fence, current = stripped[:3], (number + 1, [])
        elif fence is not None and stripped.startswith(fence):
            blocks.append(current)
            fence = None
        elif fence is not None:
            current[1].append(line)
    return blocks


def shell_lines(lines: list[str], first: int) -> list[tuple[int, str]]:
    """The block's lines with ``\\`` continuations joined: ``(line number, line)``."""
    joined, start, parts = [], None, []
    for number, line in enumerate(lines, first):
        start = number if not parts else start
        if line.rstrip().endswith("\\"):
            parts.append(line.rstrip()[:-1])
            continue
        parts.append(line)
        joined.append((start, " ".join(p.strip() for p in parts)))
        parts = []
    if parts:
        joined.append((start, " ".join(p.strip() for p in parts)))
    return joined


def words(line: str) -> list[str]:
    """The line's words as the shell splits them, up to a comment (a word that starts with
    ``#``) or the end of the first command (``;``, ``&&``, ``||``, ``|``)."""
    lexer = shlex.shlex(line, posix=True)
    lexer.whitespace_split, lexer.commenters = True, ""
    out = []
    while (word := lexer.get_token()) is not None:
        if word.startswith("#") or word in {";", "&&", "||", "|"}:
            break
        if word.endswith(";"):
            out.append(word[:-1])
            break
        out.append(word)
    return out


def ncsn_command(line: str) -> tuple[str, list[str]] | None:
    """``(program, arguments)`` for a line that runs one of the four commands, directly
    (``ncsn-train ...``), through a launcher (``srun ... ncsn-sample ...``) or as a module
    (``torchrun ... -m ncsn.cli.train ...``); None for any other line (log output that
    quotes a command, other programs)."""
    if not re.search(r"\bncsn-(train|sample|eval|import)\b|\bncsn\.cli\.", line):
        return None
    tokens = words(line)
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):
        tokens = tokens[1:]                       # VAR=value before the command
    if not tokens or (tokens[0] not in PROGRAMS and tokens[0] not in LAUNCHERS):
        return None
    for i, token in enumerate(tokens):
        if token in PROGRAMS:
            return token, tokens[i + 1:]
        if token == "-m" and i + 1 < len(tokens) and tokens[i + 1] in MODULES:
            return MODULES[tokens[i + 1]], tokens[i + 2:]
    return None


def documented_commands() -> list[tuple[str, int, str, list[str]]]:
    """``(document, line, program, arguments)`` of every command in a code block."""
    found = []
    for doc in DOCS:
        name = doc.relative_to(REPO).as_posix()
        for first, lines in code_blocks(doc.read_text()):
            for number, line in shell_lines(lines, first):
                command = ncsn_command(line)
                if command is not None:
                    found.append((name, number, *command))
    return found


COMMANDS = documented_commands()


def as_text(program: str, args: list[str]) -> str:
    return " ".join([program, *args])


def skip_reason(doc: str, program: str, args: list[str]) -> str | None:
    text = as_text(program, args)
    return next((why for d, command, why in SKIPPED if d == doc and command == text), None)


def check_command(program: str, args: list[str], monkeypatch) -> None:
    """What the command's pre-flight check would do with ``args``, in this process; raises
    ``ConfigError`` (or ``CheckpointError``) for a command that the program would refuse."""
    import ncsn.checkpoint
    from ncsn.cli import precheck

    # The one part of the pre-flight checks left out: the ckpt= file's existence.
    monkeypatch.setattr(ncsn.checkpoint, "existing_checkpoint", lambda path: Path(path))
    if program == "ncsn-import":
        from ncsn.cli.import_ import parse_args

        if not HELP_FLAGS & set(args):
            parse_args(args)
        return
    module = __import__(f"ncsn.cli.{PROGRAMS[program]}", fromlist=["main"])
    if HELP_FLAGS & set(args):                      # the help itself composes the config
        monkeypatch.setattr(sys, "argv", [program, *args])
        with contextlib.redirect_stdout(io.StringIO()) as out:
            module.main()
        assert program in out.getvalue()
        return
    if program == "ncsn-eval" and args[:1] == ["stats"]:
        args = ["mode=stats", *args[1:]]
    overrides, sweep, i = [], False, 0
    while i < len(args):
        arg = args[i]
        if arg in SWEEP_FLAGS:
            sweep = True
        elif arg in PRINT_FLAGS:
            i += PRINT_FLAGS[arg]
        elif arg.startswith("-"):
            raise AssertionError(f"{arg}: a flag this test does not know")
        else:
            overrides.append(arg)
        i += 1
    check = {"train": precheck.check_train, "sample": precheck.check_ckpt_given,
             "eval": getattr(module, "_check_request", None)}[PROGRAMS[program]]
    for point in precheck.sweep_points(overrides) if sweep else [overrides]:
        cfg = precheck.compose_checked(PROGRAMS[program], point)
        precheck.check_keys(cfg)
        check(cfg)


@pytest.mark.parametrize("doc, line, program, args", COMMANDS,
                         ids=[f"{d}:{n}" for d, n, _, _ in COMMANDS])
def test_documented_command_is_valid_as_written(doc, line, program, args, monkeypatch):
    why = skip_reason(doc, program, args)
    if why is not None:
        pytest.skip(f"{as_text(program, args)}: {why}")
    check_command(program, args, monkeypatch)


def test_the_skipped_commands_are_still_in_the_docs():
    documented = {(doc, as_text(program, args)) for doc, _, program, args in COMMANDS}
    stale = [(doc, command) for doc, command, _ in SKIPPED if (doc, command) not in documented]
    assert not stale, f"SKIPPED names commands the docs no longer have: {stale}"


def test_every_command_is_found():
    """The extraction finds the commands it should, so a broken parser cannot pass the
    test above by finding nothing."""
    programs = {program for _, _, program, _ in COMMANDS}
    assert programs == set(PROGRAMS)
    readme = [c for c in COMMANDS if c[0] == "README.md"]
    assert len(readme) >= 8


def section(text: str, heading: str) -> str:
    """The text under the ``## heading`` (the heading's start is enough), to the next
    heading of the same level."""
    match = re.search(rf"^## {re.escape(heading)}.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no section '## {heading}'"
    return match.group(1)


def with_value(args: list[str], key: str, value) -> list[str]:
    """``args`` with ``key=value``, in place of the one the command gives or added."""
    kept = [a for a in args if a.split("=", 1)[0] != key]
    return [*kept, f"{key}={value}"]


def test_the_quick_start_runs_as_written(tmp_path):
    """The README's Swiss-roll quick start, run in an empty folder as written, shortened to
    200 training steps and 200 samples."""
    text = section((REPO / "README.md").read_text(), "Quick start")
    lines = [line for first, block in code_blocks(text) for _, line in shell_lines(block, first)]
    commands = [ncsn_command(line) for line in lines]
    train = next(args for prog, args in filter(None, commands)
                 if prog == "ncsn-train" and "experiment=swissroll" in args)
    sample = next(args for prog, args in filter(None, commands)
                  if prog == "ncsn-sample" and any("swissroll" in a for a in args))
    result = run_cli("ncsn-train", *with_value(train, "trainer.n_steps", 200), cwd=tmp_path,
                     timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt = dict(a.split("=", 1) for a in sample)["ckpt"]
    assert (tmp_path / ckpt).is_file(), f"{ckpt} is not where the quick start looks for it"
    result = run_cli("ncsn-sample", *with_value(sample, "n_samples", 200), cwd=tmp_path,
                     timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / dict(a.split("=", 1) for a in sample)["out"]
    samples = np.load(out / "samples.npz")["samples"]
    assert samples.shape == (200, 2) and np.isfinite(samples).all()
    assert (out / "samples.png").is_file()


def test_install_and_test_commands_are_the_ones_ci_runs():
    """.ci/run installs and tests with the README's commands (issue 15)."""
    readme, ci = (REPO / "README.md").read_text(), (REPO / ".ci" / "run").read_text()
    install = [line for _, block in code_blocks(section(readme, "Install")) for line in block]
    tests = [line for _, block in code_blocks(section(readme, "Tests")) for line in block]
    assert 'pip install -e ".[dev]"' in install
    assert "python -m pytest -q -n 2 --dist loadgroup" in tests
    for command in ('pip install -e ".[dev]"', "python -m pytest -q -n 2 --dist loadgroup"):
        assert command in ci.splitlines(), command


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to -."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = path.read_text()
    in_code = False
    found = set()
    for line in text.splitlines():
        if line.strip().startswith("```"):
            in_code = not in_code
        elif not in_code and (match := re.match(r"#{1,6}\s+(.*)", line)):
            found.add(github_anchor(match.group(1)))
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """``(line, target)`` of each markdown link and image outside code blocks and spans."""
    found, in_code = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip().startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            continue
        line = re.sub(r"`[^`]*`", "", line)
        found += [(number, target) for target in re.findall(r"\]\(([^)\s]+)\)", line)]
    return found


@pytest.mark.parametrize("doc", DOCS, ids=[d.relative_to(REPO).as_posix() for d in DOCS])
def test_no_dead_relative_links(doc):
    dead = []
    for number, target in links(doc):
        if re.match(r"[a-z]+:", target):           # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        where = (doc.parent / file).resolve() if file else doc
        if not where.exists():
            dead.append(f"{doc.name}:{number}: {target} (no such file)")
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            dead.append(f"{doc.name}:{number}: {target} (no such heading)")
    assert not dead, "\n".join(dead)


def test_configs_group_table_is_what_config_reference_prints():
    # docs/CONFIG.md's table is generated from the YAML files' first comments: regenerate it
    # with `python scripts/config_reference.py` when an option's comment changes.
    import subprocess
    table = subprocess.run([sys.executable, str(REPO / "scripts" / "config_reference.py")],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert table in (REPO / "docs" / "CONFIG.md").read_text(encoding="utf-8")
