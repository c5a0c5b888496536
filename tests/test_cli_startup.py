"""The CLI starts light: commands load on first use, so `cjs --help` and the commands that need
no scoring import neither numpy nor scipy, and `cjs status` of a live batch none of the archive
code nor the metrics; the table that lists them stays true to them."""

from __future__ import annotations

import asyncio
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
import redis.asyncio as aioredis

import tools
from cj.registration import append_registration
from streams.keys import Keys
from tests.helpers import registration
from tools.cli import COMMANDS, main

HEAVY = ("numpy", "scipy")
# What `cjs status` of a live batch has no use for: the archive code (gzip, fsspec, and the
# replay it runs) is for archived batches, prometheus_client for the workers' metrics.
NOT_FOR_STATUS = ("app.archive", "app.replay", "gzip", "fsspec", "prometheus_client")

# Runs cjs with the arguments given, then prints its exit code and which of the heavy modules
# (or their submodules) were imported.
PROBE = """
import json, sys
from tools.cli import main
code = 0
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = {heavy!r}
print(json.dumps([code, sorted(m for m in sys.modules if m in heavy or m.split(".")[0] in heavy)]))
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
    code, imported = json.loads(done.stdout.splitlines()[-1])
    assert code == 0, done.stderr  # a command that failed early proves nothing
    return list(imported)


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


@pytest.mark.redis
def test_status_of_a_live_batch_loads_no_archive_code_and_no_metrics(redis_server: Any) -> None:
    keys = Keys("startup:")

    async def register() -> None:
        r = aioredis.from_url(redis_server.url)
        await append_registration(r, keys, registration(4, batch_id="live"))
        await r.aclose()

    asyncio.run(register())
    env = {"REDIS_URL": redis_server.url, "CJS_PREFIX": keys.prefix}
    for args in (["status", "live"], ["status", "live", "--json"]):
        assert _heavy_imported(args, env, heavy=NOT_FOR_STATUS) == [], args


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
