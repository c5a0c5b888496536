"""The CLI starts light: commands load on first use, so `cjs --help` and the commands that need
no scoring import neither numpy nor scipy; the table that lists them stays true to them."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from typing import Any

import click
import click.testing
import pytest

import tools
from tools.cli import COMMANDS, main

HEAVY = ("numpy", "scipy")

# Runs cjs with the arguments given, then prints which heavy modules were imported.
PROBE = """
import json, sys
from tools.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})))
"""


def _heavy_imported(
    args: list[str], env: dict[str, str] | None = None, heavy: tuple[str, ...] = HEAVY
) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=set(heavy)), *args],
        env={**os.environ, "REDIS_URL": "", **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    imported: list[str] = json.loads(done.stdout.splitlines()[-1])
    return imported


@pytest.mark.parametrize("args", [["--help"], ["dlq", "--help"], ["status", "--help"]])
def test_help_imports_neither_numpy_nor_scipy(args: list[str]) -> None:
    assert _heavy_imported(args) == []


def test_help_and_the_dashboard_help_do_not_load_the_web_stack() -> None:
    web = ("starlette", "uvicorn", "jinja2", "plotly", "web")
    assert _heavy_imported(["--help"], heavy=web) == []
    assert _heavy_imported(["dashboard", "--help"], heavy=(*web, *HEAVY)) == []


@pytest.mark.redis
def test_dlq_imports_neither_numpy_nor_scipy(redis_server: Any) -> None:
    assert _heavy_imported(["dlq", "--json"], {"REDIS_URL": redis_server.url}) == []


def test_the_table_lists_every_command_with_its_own_short_help() -> None:
    defined: dict[str, click.Command] = {}
    for info in pkgutil.iter_modules(tools.__path__):
        if not info.name.startswith("cmd_"):
            continue
        module = importlib.import_module(f"tools.{info.name}")
        # A group's subcommands (`cjs dlq redrive`) are reached through the group's row.
        nested = {
            id(sub)
            for value in vars(module).values()
            if isinstance(value, click.Group)
            for sub in value.commands.values()
        }
        for value in vars(module).values():
            # Only the commands a module defines, not those it imports.
            here = getattr(getattr(value, "callback", None), "__module__", "") == module.__name__
            if isinstance(value, click.Command) and here and id(value) not in nested:
                assert value.name is not None
                defined[value.name] = value
    assert sorted(defined) == sorted(COMMANDS)
    ctx = click.Context(main)
    dlq = main.get_command(ctx, "dlq")
    assert isinstance(dlq, click.Group) and "redrive" in dlq.commands
    ctx = click.Context(main)
    for name, entry in COMMANDS.items():
        command = main.get_command(ctx, name)
        assert command is defined[name]
        assert entry.short_help == command.get_short_help_str(limit=10_000), name


def test_unknown_command_is_a_usage_error() -> None:
    result = click.testing.CliRunner().invoke(main, ["nope"])
    assert result.exit_code == 2 and "No such command 'nope'" in result.output
