"""The dashboard's ASGI app: pages rendered on the server from the same app/ functions (and JSON)
the CLI prints, refreshed in place by short polling (web/static/dashboard.js), and the POST
actions, guarded by web/security.py.

Pages: `/` overview, `/stuck` pending entries, `/deadletters` (and `/deadletter` one letter),
`/batches`, `/batches/<id>`. Each page's JSON is under `/api/...`, with the CLI's `--json`
contracts: `/api/stuck` is `cjs stuck --json`, `/api/dlq` is `cjs dlq --json` (essay text hidden
unless `?text=1`), `/api/batches/<id>/status|results|positions` are `cjs status|results|positions
--json`. A page asked for with `?partial=1` returns its content only (what the polling swaps in).
"""

from __future__ import annotations

import contextlib
import gzip
import ipaddress
import json
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import jinja2
import structlog
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Route

from app import batch_detail as detail_mod
from app import charts, deadletters, overview, stuck
from app.batches import LIST_LIMIT, STATUSES, list_view, require_batch
from app.connection import open_redis
from app.errors import CjsError, Conflict, InputError, NotFound
from app.settings import Settings, keys_for
from app.views import results_view, status_view
from events.streams import CONSUMED, STREAMS
from projections.batch import TERMINAL
from streams.dlq import read_dead_letters
from streams.errors import Policy, kind_of, policy_of
from web.security import SESSION_COOKIE, SESSION_TTL_S, Guard, Refused

log = structlog.get_logger("web.dashboard")

N = TypeVar("N", int, float)

REFRESH_S = 3.0
STATIC = ("dashboard.css", "dashboard.js")
SECURITY_HEADERS = {
    # plotly.js sets inline styles; nothing else is inline and nothing comes from elsewhere.
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
        "form-action 'self'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    # Not no-referrer: with it Chromium sends `Origin: null` on form POSTs, which are refused.
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class Asset:
    body: bytes
    gzipped: bytes
    media_type: str


def _asset(body: bytes, media_type: str) -> Asset:
    return Asset(body, gzip.compress(body, 6), media_type)


class Dashboard:
    """The app's state: one Redis client, the settings, the guard, the templates."""

    def __init__(self, settings: Settings, guard: Guard, redis: Any | None = None) -> None:
        self.settings = settings
        self.keys = keys_for(settings)
        self.guard = guard
        self.redis = redis
        self._own_redis = redis is None
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("web", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["dur"] = duration
        self.env.filters["num"] = number
        self.env.filters["tojson_safe"] = charts.to_json
        self.plotly_name = f"plotly-{charts.plotly_version()}.min.js"
        self.assets: dict[str, Asset] = {}

    async def start(self) -> None:
        if self.redis is None:
            self.redis = await open_redis(self.settings)

    async def stop(self) -> None:
        if self._own_redis and self.redis is not None:
            await self.redis.aclose()

    @property
    def r(self) -> Any:
        assert self.redis is not None
        return self.redis

    def asset(self, name: str) -> Asset | None:
        if name not in self.assets:
            if name == self.plotly_name:
                self.assets[name] = _asset(charts.plotly_js(), "text/javascript")
            elif name in STATIC:
                body = resources.files("web").joinpath(f"static/{name}").read_bytes()
                kind = "text/css" if name.endswith(".css") else "text/javascript"
                self.assets[name] = _asset(body, kind)
            else:
                return None
        return self.assets[name]

    def page(self, request: Request, template: str, **context: Any) -> HTMLResponse:
        """A page, or only its content (`?partial=1`, what the polling swaps in)."""
        session = self.guard.session_of(request)
        common = {
            "prefix": self.keys.prefix,
            "read_only": self.guard.read_only,
            "may_act": session is not None,
            "csrf": self.guard.csrf_for(session) if session else "",
            "path": request.url.path,
            "refresh_s": REFRESH_S,
            "plotly": self.plotly_name,
            "now": time.strftime("%H:%M:%S UTC", time.gmtime()),
        }
        partial = request.query_params.get("partial") == "1"
        name = f"_{template}" if partial else template
        body = self.env.get_template(name).render(**common, **context)
        return HTMLResponse(body, headers=SECURITY_HEADERS)


def duration(seconds: Any) -> str:
    if seconds is None:
        return "–"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _json(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(
        json.loads(charts.to_json(data)), status_code=status, headers=SECURITY_HEADERS
    )


def _number(request: Request, name: str, parse: Callable[[str], N], what: str) -> N | None:
    """Query parameter `name` read by `parse` (None when absent or empty); InputError, saying
    it must be `what`, when it does not parse."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        return parse(raw)
    except ValueError as exc:
        raise InputError(f"{name} must be {what}, not {raw!r}") from exc


def _float(request: Request, name: str, default: float) -> float:
    value = _number(request, name, float, "a number")
    if value is None:
        return default
    if value < 0:
        raise InputError(f"{name} must not be negative")
    return value


def _int(request: Request, name: str, default: int, high: int) -> int:
    value = _number(request, name, int, "a whole number")
    return default if value is None else max(1, min(high, value))


def _status_of(exc: CjsError) -> int:
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, Conflict):
        return 409
    if isinstance(exc, InputError):
        return 400
    return 503


Handler = Callable[[Dashboard, Request], Awaitable[Response]]


def routes(d: Dashboard) -> list[Route]:
    def wrap(handler: Handler, *, api: bool) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(d, request)
            except Refused as exc:
                return _json({"error": exc.reason}, exc.status)
            except CjsError as exc:
                if api:
                    return _json({"error": exc.message}, _status_of(exc))
                page = d.page(request, "error.html", message=exc.message)
                page.status_code = _status_of(exc)
                return page
            except Exception as exc:
                # Redis down or in a state that passes (out of memory, read-only, loading, ...:
                # the workers' table, streams/errors.py) is 503; anything else is a bug.
                if policy_of(exc) in (Policy.WAIT, Policy.RECONNECT):
                    log.warning(
                        "dashboard_redis_unavailable",
                        path=request.url.path,
                        error_kind=kind_of(exc),
                        error=str(exc),
                    )
                    return _json({"error": f"Redis is unavailable: {exc}"}, 503)
                log.exception("dashboard_error", path=request.url.path)
                return _json({"error": "internal error (logged)"}, 500)

        return endpoint

    table: list[tuple[str, Handler, list[str], bool]] = [
        ("/", overview_page, ["GET"], False),
        ("/stuck", stuck_page, ["GET"], False),
        ("/deadletters", deadletters_page, ["GET"], False),
        ("/deadletter", deadletter_page, ["GET"], False),
        ("/batches", batches_page, ["GET"], False),
        ("/batches/{batch_id}", batch_page, ["GET"], False),
        ("/login", login_page, ["GET"], False),
        ("/login", login, ["POST"], False),
        ("/logout", logout, ["POST"], False),
        ("/api/overview", api_overview, ["GET"], True),
        ("/api/stuck", api_stuck, ["GET"], True),
        ("/api/stuck/page", api_stuck_page, ["GET"], True),
        ("/api/dlq", api_dlq, ["GET"], True),
        ("/api/deadletter", api_deadletter, ["GET"], True),
        ("/api/batches", api_batches, ["GET"], True),
        ("/api/batches/{batch_id}", api_batch, ["GET"], True),
        ("/api/batches/{batch_id}/status", api_batch_status, ["GET"], True),
        ("/api/batches/{batch_id}/results", api_batch_results, ["GET"], True),
        ("/api/batches/{batch_id}/positions", api_batch_positions, ["GET"], True),
        ("/api/batches/{batch_id}/figures", api_batch_figures, ["GET"], True),
        ("/api/batches/{batch_id}/essays/{essay_id}/text", api_essay_text, ["GET"], True),
        ("/actions/stuck", action_stuck, ["POST"], True),
        ("/actions/deadletter", action_deadletter, ["POST"], True),
        ("/static/{name}", static, ["GET"], True),
    ]
    return [Route(path, wrap(h, api=api), methods=methods) for path, h, methods, api in table]


# --- pages ------------------------------------------------------------------------------------


async def overview_page(d: Dashboard, request: Request) -> Response:
    view = await overview.overview(d.r, d.keys, d.settings)
    return d.page(request, "overview.html", view=view, terminal=TERMINAL)


def _stuck_query(d: Dashboard, request: Request) -> dict[str, Any]:
    q = request.query_params
    stream_name = q.get("stream") or CONSUMED[0][0]
    return {
        "stream_name": stream_name,
        "min_idle_s": _float(request, "idle", 0.0),
        "consumer": q.get("consumer") or None,
        "batch_id": q.get("batch") or None,
        "after": q.get("after") or None,
        "size": _int(request, "size", stuck.PAGE_SIZE, 500),
        "partition": q.get("partition") or None,
    }


async def stuck_page(d: Dashboard, request: Request) -> Response:
    query = _stuck_query(d, request)
    page = await stuck.stuck_page(d.r, d.keys, **query)
    return d.page(
        request,
        "stuck.html",
        page=page,
        streams=[s for s, _ in CONSUMED],
        actions=stuck.ENTRY_ACTIONS.get(query["stream_name"], ()),
        processing_timeout_s=d.settings.processing_timeout_s,
    )


async def deadletters_page(d: Dashboard, request: Request) -> Response:
    stream_name = request.query_params.get("stream") or None
    if stream_name is not None:
        stream_name = stream_name.removeprefix("dlq:")
        if stream_name not in STREAMS:
            raise InputError(f"unknown stream {stream_name!r}")
    limit = _int(request, "limit", 100, 1000)
    view = deadletters.redact_listing(
        await read_dead_letters(d.r, d.keys, stream=stream_name, limit=limit)
    )
    return d.page(request, "deadletters.html", view=view, streams=STREAMS, stream=stream_name)


async def deadletter_page(d: Dashboard, request: Request) -> Response:
    q = request.query_params
    show_text = q.get("text") == "1"
    if show_text:
        d.guard.may_read_text(request)
    letter = await deadletters.inspect(
        d.r,
        d.keys,
        q.get("stream", ""),
        q.get("id", ""),
        show_text=show_text,
        partition=q.get("partition"),
    )
    if show_text:
        log.info(
            "dead_letter_text_shown",
            dlq_stream=letter["dlq_stream"],
            entry_id=letter["entry_id"],
            client=_client(request),
        )
    return d.page(
        request,
        "deadletter.html",
        letter=letter,
        show_text=show_text,
        fields_json=json.dumps(letter["fields"], indent=2, ensure_ascii=False),
    )


def _readable(fields: Any) -> Any:
    """A letter's original fields with its `data` (the event's JSON) parsed, to read."""
    if isinstance(fields, dict) and isinstance(fields.get("data"), str):
        with contextlib.suppress(ValueError):
            return {**fields, "data": json.loads(fields["data"])}
    return fields


async def batches_page(d: Dashboard, request: Request) -> Response:
    status = request.query_params.get("status") or None
    text = (request.query_params.get("q") or "").strip()
    rows = (await list_view(d.r, d.keys, statuses=[status] if status else []))["batches"]
    if text:
        rows = [row for row in rows if text in row["batch_id"]]
    return d.page(
        request,
        "batches.html",
        rows=rows,
        status=status,
        q=text,
        statuses=STATUSES,
    )


async def batch_page(d: Dashboard, request: Request) -> Response:
    batch_id = request.path_params["batch_id"]
    data = await detail_mod.batch_detail(d.r, d.keys, batch_id)
    return d.page(
        request,
        "batch.html",
        d_=data,
        figures=charts.batch_figures(data),
        config=charts.CONFIG,
        terminal=data["status"]["status"] in TERMINAL,
    )


async def login_page(d: Dashboard, request: Request) -> Response:
    return d.page(request, "login.html", failed=False)


async def login(d: Dashboard, request: Request) -> Response:
    d.guard.check_origin(request)
    if d.guard.read_only:
        raise Refused(403, "the dashboard is read-only: set CJS_DASHBOARD_TOKEN to allow actions")
    offered = (await _form(request)).get("token", "")
    if not d.guard.token_matches(offered):
        log.warning("dashboard_login_refused", client=_client(request))
        refused = d.page(request, "login.html", failed=True)
        refused.status_code = 401
        return refused
    session = d.guard.open_session()
    log.info("dashboard_login", client=_client(request))
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        session,
        max_age=SESSION_TTL_S,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


async def logout(d: Dashboard, request: Request) -> Response:
    d.guard.check_origin(request)
    d.guard.close_session(request)
    response = RedirectResponse("/", status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response


# --- JSON -------------------------------------------------------------------------------------


async def api_overview(d: Dashboard, request: Request) -> Response:
    return _json(await overview.overview(d.r, d.keys, d.settings))


async def api_stuck(d: Dashboard, request: Request) -> Response:
    """`cjs stuck --json` (with `?idle=`, `?batch_idle=`, `?limit=` as its options)."""
    s = d.settings
    view = await stuck.collect(
        d.r,
        d.keys,
        idle_s=_float(request, "idle", s.processing_timeout_s),
        batch_idle_s=_float(request, "batch_idle", s.batch_idle_timeout_s),
        limit=_int(request, "limit", 1000, 100_000),
        dead_after_s=s.processing_timeout_s,
    )
    return _json(view)


async def api_stuck_page(d: Dashboard, request: Request) -> Response:
    return _json(await stuck.stuck_page(d.r, d.keys, **_stuck_query(d, request)))


async def api_dlq(d: Dashboard, request: Request) -> Response:
    """`cjs dlq --json`; essay text hidden unless `?text=1`."""
    stream_name = request.query_params.get("stream") or None
    if stream_name is not None:
        stream_name = stream_name.removeprefix("dlq:")
    view = await read_dead_letters(
        d.r, d.keys, stream=stream_name, limit=_int(request, "limit", 100, 10_000)
    )
    if request.query_params.get("text") == "1":
        d.guard.may_read_text(request)
        log.info("dead_letter_text_shown", dlq_stream=stream_name, client=_client(request))
        return _json(view)
    return _json(deadletters.redact_listing(view))


async def api_deadletter(d: Dashboard, request: Request) -> Response:
    q = request.query_params
    if q.get("text") == "1":
        d.guard.may_read_text(request)
    return _json(
        await deadletters.inspect(
            d.r,
            d.keys,
            q.get("stream", ""),
            q.get("id", ""),
            show_text=q.get("text") == "1",
            partition=q.get("partition"),
        )
    )


async def api_batches(d: Dashboard, request: Request) -> Response:
    """`cjs batches --json` (with `?status=` and `?limit=` as its options)."""
    statuses = request.query_params.getlist("status")
    limit = _int(request, "limit", LIST_LIMIT, 100_000)
    return _json(await list_view(d.r, d.keys, statuses=statuses, limit=limit))


async def api_batch(d: Dashboard, request: Request) -> Response:
    return _json(await detail_mod.batch_detail(d.r, d.keys, request.path_params["batch_id"]))


async def api_batch_status(d: Dashboard, request: Request) -> Response:
    return _json(status_view(await require_batch(d.r, d.keys, request.path_params["batch_id"])))


async def api_batch_results(d: Dashboard, request: Request) -> Response:
    return _json(results_view(await require_batch(d.r, d.keys, request.path_params["batch_id"])))


async def api_batch_positions(d: Dashboard, request: Request) -> Response:
    from cj.positions import position_report

    state = await require_batch(d.r, d.keys, request.path_params["batch_id"])
    return _json(position_report(state))


async def api_batch_figures(d: Dashboard, request: Request) -> Response:
    data = await detail_mod.batch_detail(d.r, d.keys, request.path_params["batch_id"])
    return _json({"status": data["status"], "figures": charts.batch_figures(data)})


async def api_essay_text(d: Dashboard, request: Request) -> Response:
    """One essay's text, because the user asked (logged without the text)."""
    d.guard.may_read_text(request)
    batch_id, essay_id = request.path_params["batch_id"], request.path_params["essay_id"]
    text = await detail_mod.essay_text(d.r, d.keys, batch_id, essay_id)
    log.info("essay_text_shown", batch_id=batch_id, essay_id=essay_id, client=_client(request))
    return PlainTextResponse(text, headers=SECURITY_HEADERS)


async def static(d: Dashboard, request: Request) -> Response:
    asset = d.asset(request.path_params["name"])
    if asset is None:
        return PlainTextResponse("not found", status_code=404)
    headers = {"cache-control": "public, max-age=86400", "x-content-type-options": "nosniff"}
    if "gzip" in request.headers.get("accept-encoding", ""):
        headers["content-encoding"] = "gzip"
        headers["vary"] = "Accept-Encoding"
        return Response(asset.gzipped, media_type=asset.media_type, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


# --- actions ----------------------------------------------------------------------------------


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None


async def _body(request: Request) -> dict[str, Any]:
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            body = await request.json()
        except ValueError as exc:
            raise InputError("the body is not JSON") from exc
        if not isinstance(body, dict):
            raise InputError("the body must be a JSON object")
        return body
    return dict(await _form(request))


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form body (the only kind the pages send), first value of each field."""
    fields = urllib.parse.parse_qs((await request.body()).decode(errors="replace"))
    return {name: values[0] for name, values in fields.items()}


async def _act(
    d: Dashboard, request: Request, kind: str, run: Callable[[dict[str, Any]], Awaitable[Any]]
) -> Response:
    body = await _body(request)
    fields = {k: body.get(k) for k in ("stream", "entry_id", "action", "partition")}
    try:
        who = d.guard.authorize(request, body.get("csrf"))
    except Refused as exc:
        log.warning(
            f"dashboard_{kind}_refused", **fields, reason=exc.reason, client=_client(request)
        )
        raise
    try:
        done = await run(body)
    except CjsError as exc:
        log.warning(
            f"dashboard_{kind}_failed",
            **fields,
            reason=exc.message,
            by=who,
            client=_client(request),
        )
        raise
    log.info(f"dashboard_{kind}", **done, by=who, client=_client(request))
    return _json({"ok": True, **done})


async def action_stuck(d: Dashboard, request: Request) -> Response:
    """Reclaim now / expire / dead-letter one pending entry: `{stream, entry_id, action,
    min_idle_s}` (app.stuck.act_on_entry)."""

    async def run(body: dict[str, Any]) -> Any:
        try:
            min_idle_s = float(body.get("min_idle_s") or 0)
        except (TypeError, ValueError) as exc:
            raise InputError("min_idle_s must be a number") from exc
        return await stuck.act_on_entry(
            d.r,
            d.keys,
            d.settings,
            stream_name=str(body.get("stream", "")),
            entry_id=str(body.get("entry_id", "")),
            action=str(body.get("action", "")),
            min_idle_s=min_idle_s,
            partition=body.get("partition"),
        )

    return await _act(d, request, "entry_action", run)


async def action_deadletter(d: Dashboard, request: Request) -> Response:
    """Redrive or delete one dead letter: `{stream, entry_id, action}` (app.deadletters)."""

    async def run(body: dict[str, Any]) -> Any:
        action = body.get("action")
        stream_name, entry_id = str(body.get("stream", "")), str(body.get("entry_id", ""))
        partition = body.get("partition")
        if action == "redrive":
            return await deadletters.redrive(d.r, d.keys, stream_name, entry_id, partition)
        if action == "delete":
            return await deadletters.delete(d.r, d.keys, stream_name, entry_id, partition)
        raise InputError(f"unknown action {action!r}: redrive or delete")

    return await _act(d, request, "dead_letter_action", run)


# --- the app ----------------------------------------------------------------------------------


def create_app(
    settings: Settings,
    *,
    token: str | None,
    host: str = "127.0.0.1",
    redis: Any | None = None,
) -> Starlette:
    """The dashboard for `settings`' Redis and prefix. Bound to a loopback address it answers
    only requests naming a loopback host (a page elsewhere cannot reach it by DNS rebinding)."""
    d = Dashboard(settings, Guard(token or None), redis)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await d.start()
        try:
            yield
        finally:
            await d.stop()

    middleware = []
    if loopback(host):
        middleware.append(
            Middleware(
                TrustedHostMiddleware,
                allowed_hosts=["127.0.0.1", "localhost", "::1", "[::1]", host],
            )
        )
    app = Starlette(routes=routes(d), middleware=middleware, lifespan=lifespan)
    app.state.dashboard = d
    return app


def serve(settings: Settings, *, host: str, port: int, token: str | None) -> None:
    """Run the dashboard until Ctrl-C / SIGTERM."""
    import uvicorn

    app = create_app(settings, token=token, host=host)
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", access_log=False, lifespan="on"
    )
    uvicorn.Server(config).run()
