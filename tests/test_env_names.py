"""A CJS_* variable nothing reads (a misspelt setting) is warned about by name, never by
value, with the known name it most likely meant: pydantic would ignore it without a word."""

from __future__ import annotations

import json

import pytest

from app.env_names import known_names, unknown_names
from app.logs import configure


def test_unknown_names_are_found_with_the_name_they_likely_meant() -> None:
    environ = {
        "CJS_BLOCKMS": "200",  # CJS_BLOCK_MS
        "CJS_MOCK_PROFIL": "realistic",  # CJS_MOCK_PROFILE
        "CJS_NOTHING_LIKE_IT": "1",
        "CJS_BLOCK_MS": "100",  # known: not reported
        "CJS_ANTHROPIC_MODEL": "m",  # read outside Settings: known
        "REDIS_URL": "redis://x",  # not a CJS_ name
        "PATH": "/bin",
    }
    assert unknown_names(environ) == [
        ("CJS_BLOCKMS", "CJS_BLOCK_MS"),
        ("CJS_MOCK_PROFIL", "CJS_MOCK_PROFILE"),
        ("CJS_NOTHING_LIKE_IT", None),
    ]
    assert "CJS_LOG_FORMAT" in known_names() and "CJS_REQUIRE_REDIS" in known_names()


def test_a_command_warns_about_a_misspelt_setting_by_name_not_value(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import structlog

    from tools.common import quiet_logs

    monkeypatch.setenv("CJS_BLOCKMS", "s3cret-value")
    monkeypatch.setenv("CJS_LOG_FORMAT", "json")
    try:
        quiet_logs(False, level="ERROR")  # as the commands that run workers in process ask
        structlog.get_logger().warning("filtered_out")  # the level holds for the rest
    finally:
        configure(json_logs=None, level="WARNING")
    err = capsys.readouterr().err
    [line] = [json.loads(x) for x in err.splitlines() if "unknown_setting" in x]
    assert (line["name"], line["did_you_mean"], line["level"]) == (
        "CJS_BLOCKMS",
        "CJS_BLOCK_MS",
        "warning",
    )
    assert "s3cret-value" not in err and "filtered_out" not in err


def test_a_keyword_naming_no_setting_is_refused_while_the_environment_only_warns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`Settings(redis_url=...)` named no field (the field reads its alias REDIS_URL) and
    was dropped without a word; a misspelt CJS_* variable must still not stop a worker."""
    from pydantic import ValidationError

    from app.settings import Settings

    with pytest.raises(ValidationError, match="redis_url"):
        Settings(redis_url="redis://x:1/0")
    monkeypatch.setenv("CJS_BLOCKMS", "5")
    monkeypatch.setenv("CJS_BLOCK_MS", "300")
    assert Settings().block_ms == 300
