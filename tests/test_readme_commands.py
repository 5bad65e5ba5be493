"""Every command in the README's shell blocks names a real subcommand, option, method, setting
and make target: a README that drifts from the CLI fails here."""

import argparse
import re
import shlex
from pathlib import Path

import pytest

from engine.api import method_config
from engine.cli import build_parser, parse_sets

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    """The commands of every ```sh / ```bash block, continuation lines joined, comments dropped."""
    blocks = re.findall(r"```(?:sh|bash)\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    lines = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def subparsers(parser: argparse.ArgumentParser) -> dict:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return actions[0].choices if actions else {}


def engine_arguments(tokens: list[str]) -> list[str] | None:
    """The CLI's arguments of an `erasure ...`, `python -m engine ...` or `torchrun ... -m engine ...` line."""
    if tokens[0] == "erasure":
        return tokens[1:]
    if "-m" in tokens and tokens[tokens.index("-m") + 1] == "engine":
        return tokens[tokens.index("-m") + 2 :]
    return None


def check_engine_command(args: list[str], line: str) -> list[str]:
    """Walk to the (sub)subcommand, then check every option, the method and its settings."""
    parser, path = build_parser(), []
    while subparsers(parser) and args and args[0] in subparsers(parser):
        path.append(args[0])
        parser = subparsers(parser)[args.pop(0)]
    assert path and not subparsers(parser), f"{line!r}: no such subcommand"
    options = {opt for action in parser._actions for opt in action.option_strings}
    given = [t.strip("[]") for t in args if t.strip("[]").startswith("--")]
    unknown = [opt.split("=")[0] for opt in given if opt.split("=")[0] not in options]
    assert not unknown, f"{line!r}: {' '.join(path)} has no option {unknown}"
    if "--method" in args:
        method = args[args.index("--method") + 1]
        sets = [args[i + 1] for i, t in enumerate(args) if t == "--set"]
        method_config(method, **parse_sets(sets))  # raises on an unknown method or setting
    return path


def python_target(tokens: list[str]) -> Path:
    """The file a `python path.py ...` or `python -m package.module ...` line runs."""
    if tokens[1] == "-m":
        return ROOT / (tokens[2].replace(".", "/") + ".py")
    return ROOT / tokens[1]


def test_every_readme_command_is_real():
    lines = readme_commands()
    makefile = (ROOT / "Makefile").read_text()
    checked = 0
    for line in lines:
        tokens = shlex.split(line)
        if tokens[0] == "make":
            for target in tokens[1:]:
                assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"{line!r}: no make target {target}"
        elif engine_arguments(tokens) is not None:
            check_engine_command(engine_arguments(tokens), line)
        elif tokens[0] == "python":
            assert python_target(tokens).is_file(), f"{line!r}: no script {python_target(tokens)}"
        else:
            pytest.fail(f"README command of an unknown kind: {line!r}")
        checked += 1
    assert checked >= 10


def test_every_documented_subcommand_has_help(capsys):
    paths = {tuple(check_engine_command(engine_arguments(shlex.split(line)), line))
             for line in readme_commands() if engine_arguments(shlex.split(line)) is not None}
    for path in sorted(paths):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([*path, "--help"])
        assert exit_info.value.code == 0, path
        assert "usage:" in capsys.readouterr().out


def test_a_drifted_option_is_caught():
    with pytest.raises(AssertionError, match="no option"):
        check_engine_command(["erase", "--model", "m", "--concepts", "c", "--out", "o", "--exprot-lora"], "typo")
    with pytest.raises(ValueError):
        check_engine_command(["erase", "--model", "m", "--method", "esd", "--set", "ridge=1"], "wrong setting")


def test_every_benchmark_the_readme_quotes_runs_as_a_module():
    """Benchmark commands in the text are `python -m benchmarks.<name> ...`, each naming a real script."""
    text = (ROOT / "README.md").read_text()
    assert "python benchmarks/" not in text
    names = re.findall(r"python -m benchmarks\.(\w+)", text)
    assert len(names) >= 5
    assert [n for n in names if not python_target(["python", "-m", f"benchmarks.{n}"]).is_file()] == []
