"""The grammar of identifiers, checked before an identifier touches a key.

Batch ids and correlation ids become parts of Redis keys (`proj:batch:<batch_id>:corr`,
`lps:answered:<batch_id>`) and hash fields, so they are restricted to a grammar in which a
key separator (`:`), a Cluster hash tag (`{`, `}`), whitespace and control characters cannot
occur: no id can name another batch's key, whatever it is. Essay ids never become keys; they
only must be printable text of bounded length.

- batch id, correlation id: 1–128 characters of `A-Z a-z 0-9 . _ -`, the first a letter or
  digit (`KEY_ID`);
- essay id: 1–200 characters, no control character, no leading or trailing whitespace.

Correlation ids are numbered per batch (`1`, `2`, ...: cj/continuation.py `numbered_ids`), so
one names a request only together with its batch: `request_key` is what names a request among
every batch's (keys of LPS, Message Batch items, per-request state of a process).

The grammar is checked where an id enters: at registration (`cj/registration.py`), when a
file is imported, and on every entry a consumer group reads (`streams/consumer.py`: an entry
with a bad id goes to the dead letters with reason `invalid_id`); replay skips the same
entries, so that it folds what the consumers applied.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from typing import Any

import msgspec

KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ESSAY_ID_MAX = 200


def is_numbered(correlation_id: str) -> bool:
    """Whether `correlation_id` is one numbered in its batch (digits only), not one of the
    random ids of before (16 characters of base32, or 32 hex: unique among all batches)."""
    return correlation_id.isascii() and correlation_id.isdigit()


def id_order(correlation_id: str) -> tuple[int, int, str]:
    """Sort key of correlation ids as people read them: numbered ones by number (2 before 10),
    then random ones of before."""
    if is_numbered(correlation_id):
        return (0, int(correlation_id), "")
    return (1, 0, correlation_id)


def request_key(batch_id: str, correlation_id: str) -> str:
    """What names one request among every batch's: `<batch id>:<correlation id>` (`:` occurs in
    neither id); a random correlation id of before (`is_numbered` false) names it alone, as it
    did then, so that keys and Message Batch items written before the upgrade are found again."""
    return f"{batch_id}:{correlation_id}" if is_numbered(correlation_id) else correlation_id


def key_id_problem(kind: str, value: object) -> str | None:
    """Why `value` is not a valid batch or correlation id (`kind` names it), or None."""
    if not isinstance(value, str) or KEY_ID.fullmatch(value) is None:
        shown = repr(value)[:80]
        return f"{kind} {shown} is not 1-128 of A-Z a-z 0-9 . _ - (starting with a letter or digit)"
    return None


@lru_cache(maxsize=65536)  # a batch's essay ids recur in every one of its events
def essay_id_problem(value: object) -> str | None:
    """Why `value` is not a valid essay id, or None."""
    if not isinstance(value, str) or not value or len(value) > ESSAY_ID_MAX:
        return f"essay_id {repr(value)[:80]} must be 1-{ESSAY_ID_MAX} characters"
    if value != value.strip():
        return f"essay_id {value[:80]!r} has leading or trailing whitespace"
    if any(unicodedata.category(ch) == "Cc" for ch in value):
        return f"essay_id {value[:80]!r} contains a control character"
    return None


# The attributes whose identifiers are checked, named once for `_key_ids`, `_essay_ids` and
# `_plan`: key ids, lists of key ids (with the kind of each), essay ids, essays, and what
# holds several essays (a wave's pairs also hold correlation ids).
_KEYS = ("batch_id", "correlation_id")
_KEY_LISTS = (
    ("batch_ids", "batch_id"),
    ("correlation_ids", "correlation_id"),
    ("abandoned", "correlation_id"),
)
_ESSAY_IDS = ("essay_a_id", "essay_b_id")
_ESSAYS = ("essay_a", "essay_b")
_ESSAY_LISTS = ("essays", "pairs")


def _essay_ids(event: Any) -> list[Any]:
    out: list[Any] = [getattr(event, name, None) for name in _ESSAY_IDS]
    for name in _ESSAYS:
        essay = getattr(event, name, None)
        if essay is not None:
            out.append(essay.essay_id)
    out.extend(e.essay_id for e in getattr(event, "essays", None) or ())
    for pair in getattr(event, "pairs", None) or ():
        out.extend((pair.essay_a, pair.essay_b))
    return [i for i in out if i is not None]


def _key_ids(event: Any) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for name in _KEYS:
        if hasattr(event, name):
            out.append((name, getattr(event, name)))
    for name, kind in _KEY_LISTS:
        out.extend((kind, value) for value in getattr(event, name, None) or ())
    for pair in getattr(event, "pairs", None) or ():
        out.append(("correlation_id", pair.correlation_id))
    return out


def event_id_problem(event: Any) -> str | None:
    """The first identifier of `event` outside the grammar (as a message), or None."""
    cls = type(event)
    try:
        plan = _PLANS[cls]
    except KeyError:
        plan = _PLANS[cls] = _plan(cls)
    if plan is None:
        return _event_id_problem(event)
    keys, general, essay_ids, essays = plan
    for name in keys:
        problem = key_id_problem(name, getattr(event, name))
        if problem:
            return problem
    if general:  # the rarer events, with lists of ids: the general order, as below
        return _event_id_problem(event)
    for name in essay_ids:
        value = getattr(event, name)
        if value is not None and (problem := essay_id_problem(value)):
            return problem
    for name in essays:
        essay = getattr(event, name)
        value = None if essay is None else essay.essay_id
        if value is not None and (problem := essay_id_problem(value)):
            return problem
    return None


_Plan = tuple[tuple[str, ...], bool, tuple[str, ...], tuple[str, ...]]
# Per event type: which of the names `_key_ids` and `_essay_ids` look for it has (None: an
# object whose attributes its type does not tell). `event_id_problem` then reads just those:
# a third of the time of asking every name of every event (issue 11), the same answers.
_PLANS: dict[type, _Plan | None] = {}


def _plan(cls: type) -> _Plan | None:
    if not issubclass(cls, msgspec.Struct) or cls.__struct_config__.dict:
        return None  # instances may hold attributes the class does not name

    def has(names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(n for n in names if hasattr(cls, n))

    general = bool(has(tuple(name for name, _ in _KEY_LISTS)) or has(_ESSAY_LISTS))
    return has(_KEYS), general, has(_ESSAY_IDS), has(_ESSAYS)


def _event_id_problem(event: Any) -> str | None:
    for kind, value in _key_ids(event):
        problem = key_id_problem(kind, value)
        if problem:
            return problem
    for value in _essay_ids(event):
        problem = essay_id_problem(value)
        if problem:
            return problem
    return None
