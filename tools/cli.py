"""The `cjs` command line."""

from __future__ import annotations

import click

from tools.cmd_batch import results, status, submit
from tools.cmd_demo import demo
from tools.cmd_replay import replay
from tools.cmd_worker import worker


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cj-streams")
def main() -> None:
    """cj-streams: Comparative Judgement of essays with an LLM judge, on Redis Streams.

    Start with `cjs demo`. Settings come from the environment: REDIS_URL,
    CJS_PREFIX (key namespace), CJS_PROCESSING_TIMEOUT_S, CJS_MAX_DELIVERIES,
    CJS_MOCK_PROFILE, ANTHROPIC_API_KEY, ...
    """


for command in (demo, submit, status, results, worker, replay):
    main.add_command(command)
