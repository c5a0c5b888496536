"""Every `CJS_*` name an operator is told about is one the code reads, and every one the code
reads is told about.

Told about: README.md, docs/*.md, everything under deploy/, compose.yaml, the Dockerfile and
.ci/run. Read: the fields of the pydantic Settings class, the explicit environment reads of
`CJS_*` literals in the packages, and those of the test harness in tests/ (the
`CJS_REQUIRE_*` switches the README documents). Docs once told operators to set
`CJS_RETRY_MAX_RETRY_AFTER_S`, which workers never read.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

from app.env_names import READ_ELSEWHERE, settings_names

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("events", "streams", "projections", "cj", "lps", "app", "tools")
NAME = re.compile(r"\bCJS_[A-Z0-9_]*[A-Z0-9]")

# Read by code that no worker runs, so setting them changes nothing in a deployment. They
# must not be documented. An entry stops applying once Settings has the name. (None now:
# CJS_RETRY_MAX_RETRY_AFTER_S, read by a RetryPolicy.from_env no worker called, went with it.)
UNWIRED: dict[str, str] = {}
# Settings fields that no code uses: documenting them would promise an effect.
# field name -> why; the test fails once the field is used, to have it documented. (None now:
# log_format is CJS_LOG_FORMAT, read by app/logs.py's callers.)
UNUSED_FIELDS: dict[str, str] = {}


def _settings_names() -> dict[str, str]:
    """Environment name -> field name (what `cjs` itself knows as Settings' names)."""
    return settings_names()


def _python_files(*dirs: str) -> Iterator[Path]:
    for d in dirs:
        if (ROOT / d).is_dir():
            yield from sorted((ROOT / d).rglob("*.py"))


def _is_environ(node: ast.expr) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
        isinstance(node, ast.Name) and node.id in ("environ", "env")
    )


def _cjs(node: ast.expr | None, constants: dict[str, str] | None = None) -> str | None:
    """The `CJS_*` name a literal (or a module constant holding one) spells, else None."""
    if isinstance(node, ast.Name) and constants and node.id in constants:
        return constants[node.id]
    if (
        isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and NAME.fullmatch(node.value)
    ):
        return node.value
    return None


def _constants(tree: ast.Module) -> dict[str, str]:
    """Module-level `NAME = "CJS_…"` assignments (e.g. `PRICES_FILE_ENV`)."""
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name) and (name := _cjs(node.value)):
                found[target.id] = name
    return found


def _env_reads(path: Path, *, environ_only: bool) -> set[str]:
    """`CJS_*` literals read from an environment mapping: `X.get("CJS_…")`,
    `os.getenv("CJS_…")`, `environ["CJS_…"]` (not assignments) and `"CJS_…" in environ`.
    With environ_only, `.get` counts only on os.environ (tests build env dicts of their own)."""
    reads: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    constants = _constants(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            name = _cjs(node.args[0], constants)
            if name is None:
                continue
            if node.func.attr == "getenv" or (
                node.func.attr == "get" and (not environ_only or _is_environ(node.func.value))
            ):
                reads.add(name)
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            if (name := _cjs(node.slice)) and _is_environ(node.value):
                reads.add(name)
        elif (
            isinstance(node, ast.Compare)
            and isinstance(node.ops[0], ast.In)
            and (name := _cjs(node.left))
            and _is_environ(node.comparators[0])
        ):
            reads.add(name)
    return reads


def _code_reads() -> dict[str, list[str]]:
    """Environment name -> where it is read."""
    where: dict[str, list[str]] = {}
    for env in _settings_names():
        where.setdefault(env, []).append("Settings")
    for path in _python_files(*PACKAGES):
        for env in _env_reads(path, environ_only=False):
            where.setdefault(env, []).append(str(path.relative_to(ROOT)))
    for path in _python_files("tests"):
        for env in _env_reads(path, environ_only=True):
            where.setdefault(env, []).append(str(path.relative_to(ROOT)))
    return where


def _documents() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "compose.yaml", ROOT / "Dockerfile", ROOT / ".ci/run"]
    files += sorted((ROOT / "docs").glob("*.md"))
    files += sorted(p for p in (ROOT / "deploy").rglob("*") if p.is_file())
    return [p for p in files if p.is_file()]


def _documented() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(names, wildcard families such as `CJS_RETRY_*`), each -> the files naming it."""
    names: dict[str, list[str]] = {}
    families: dict[str, list[str]] = {}
    for path in _documents():
        text = path.read_text()
        for match in NAME.finditer(text):
            rest = text[match.end() : match.end() + 2]
            target = families if rest.startswith(("*", "_*")) else names
            files = target.setdefault(match.group(), [])
            if str(path.relative_to(ROOT)) not in files:
                files.append(str(path.relative_to(ROOT)))
    return names, families


def _unwired() -> dict[str, str]:
    settings = _settings_names()
    return {name: why for name, why in UNWIRED.items() if name not in settings}


def _unused() -> set[str]:
    return {env for env, field in _settings_names().items() if field in UNUSED_FIELDS}


def test_every_documented_name_is_read() -> None:
    documented, _ = _documented()
    read = _code_reads()
    unknown = {
        name: files
        for name, files in documented.items()
        if name not in read or name in _unwired() or name in _unused()
    }
    assert not unknown, (
        "CJS_* names in the docs/deployment files that no worker reads "
        f"(fix the name, or add the setting): {unknown}"
    )


def test_every_name_read_is_documented() -> None:
    documented, _ = _documented()
    read = _code_reads()
    undocumented = {
        name: where
        for name, where in read.items()
        if name not in documented and name not in _unwired() and name not in _unused()
    }
    assert not undocumented, (
        f"CJS_* names read by the code but documented nowhere (README's settings table, "
        f"docs/operations.md): {undocumented}"
    )


def test_wildcard_families_name_real_settings() -> None:
    _, families = _documented()
    read = set(_code_reads())
    for family, files in families.items():
        prefix = family + "_"
        assert any(name.startswith(prefix) for name in read), (family, files)


def test_exemptions_still_hold() -> None:
    """UNWIRED: still not a Settings name. UNUSED_FIELDS: still unused."""
    assert not set(UNWIRED) & set(_settings_names())
    for field in UNUSED_FIELDS:
        users = [
            str(path.relative_to(ROOT))
            for path in _python_files(*PACKAGES)
            if path.name != "settings.py" and re.search(rf"\.{field}\b", path.read_text())
        ]
        assert not users, f"Settings.{field} is used now ({users}): document it, drop the exemption"


def test_the_retired_retry_after_name_stays_unread() -> None:
    """Docs once told operators to set CJS_RETRY_MAX_RETRY_AFTER_S, which workers never read:
    no code reads it now, so the name cannot come back as a trap."""
    assert "CJS_RETRY_MAX_RETRY_AFTER_S" not in _code_reads()


def test_the_retry_after_cap_is_documented_by_the_name_workers_read() -> None:
    """The case that started this: workers read CJS_RETRY_MAX_AFTER_S."""
    documented, _ = _documented()
    assert "CJS_RETRY_MAX_AFTER_S" in _settings_names()
    assert "docs/operations.md" in documented["CJS_RETRY_MAX_AFTER_S"]
    assert "deploy/prometheus/alerts.yml" in documented["CJS_RETRY_MAX_AFTER_S"]


def test_the_names_read_elsewhere_are_those_the_code_reads() -> None:
    """app/env_names.py's list, which tells a misspelt CJS_* name from one read outside
    Settings, is the code's reads: a new read must be added there (or workers warn about it)."""
    elsewhere = {name for name in _code_reads() if name not in _settings_names()}
    assert set(READ_ELSEWHERE) == elsewhere
