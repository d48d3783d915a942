"""The command line as a user meets it: --help, --version, every subcommand's --help with examples."""
import subprocess
import sys

import pytest

from metaham import __version__
from metaham.cli import build_parser, main


def _run(*args):
    return subprocess.run([sys.executable, "-m", "metaham", *args], capture_output=True, text=True, timeout=120)


def test_version():
    out = _run("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"metaham {__version__}"


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: metaham" in capsys.readouterr().out


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


@pytest.mark.parametrize("command", _subcommands())
def test_every_subcommand_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text
    assert "metaham " + command.split()[0] in text


def test_nothing_outside_the_cli_imports_it():
    """The CLI parses and prints; the package (benchmarks included) never imports it, at any depth of a module."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    offenders = []
    for path in [*(root / "metaham").rglob("*.py"), *(root / "systems").rglob("*.py"), *(root / "tasks").rglob("*.py")]:
        if "cli" in path.relative_to(root).parts or path.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            offenders += [f"{path.relative_to(root)}: {n}" for n in names if n == "metaham.cli" or n.startswith("metaham.cli.")]
    assert not offenders, offenders
