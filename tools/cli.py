"""The `cjs` command line.

Every module `tools/cmd_*.py` contributes the click commands it defines, so a
new command is a new module and nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil

import click

import tools
from app.errors import CjsError


class Cjs(click.Group):
    """Shows a CjsError as one line on stderr and exits with its code: the one place."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except CjsError as exc:
            failure = click.ClickException(exc.message)
            failure.exit_code = exc.exit_code
            raise failure from exc


@click.group(cls=Cjs, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cj-streams")
def main() -> None:
    """cj-streams: Comparative Judgement of essays with an LLM judge, on Redis Streams.

    Start with `cjs demo`. Settings come from the environment: REDIS_URL,
    CJS_PREFIX (key namespace), CJS_PROCESSING_TIMEOUT_S, CJS_MAX_DELIVERIES,
    CJS_MOCK_PROFILE, ANTHROPIC_API_KEY, ...
    """


def info_module(info: pkgutil.ModuleInfo) -> str:
    return f"tools.{info.name}"


def _register() -> None:
    for info in sorted(pkgutil.iter_modules(tools.__path__), key=lambda m: m.name):
        if not info.name.startswith("cmd_"):
            continue
        module = importlib.import_module(info_module(info))
        for value in vars(module).values():
            defined_here = getattr(
                getattr(value, "callback", None), "__module__", ""
            ) == info_module(info)
            # Only commands the module defines, not ones it imports.
            if isinstance(value, click.Command) and defined_here:
                main.add_command(value)


_register()
