"""Who may act: the dashboard is read-only unless `CJS_DASHBOARD_TOKEN` is set; then an action
is a POST that carries either the token itself (`Authorization: Bearer <token>`, for scripts) or
a session cookie obtained by entering the token at /login together with the session's CSRF token
(`X-CSRF-Token` header or `csrf` form field). A POST whose Origin or Sec-Fetch-Site names another
site is refused whatever it carries.

Sessions live in this process's memory (a restart logs everyone out); the CSRF token is an HMAC
of the session id under a per-process secret, so it needs no storage and cannot be guessed from
the cookie, which scripts cannot read (HttpOnly) and other sites do not send (SameSite=Strict).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field

from starlette.requests import Request

SESSION_COOKIE = "cjs_session"
CSRF_HEADER = "x-csrf-token"
SESSION_TTL_S = 12 * 3600


class Refused(Exception):
    """An action the request may not do: HTTP `status`, and why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Guard:
    token: str | None
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    sessions: dict[str, float] = field(default_factory=dict)  # session id -> expiry (monotonic)

    @property
    def read_only(self) -> bool:
        return not self.token

    def token_matches(self, offered: str) -> bool:
        return bool(self.token) and hmac.compare_digest(
            offered.encode(), (self.token or "").encode()
        )

    def open_session(self) -> str:
        now = time.monotonic()
        self.sessions = {s: t for s, t in self.sessions.items() if t > now}
        session = secrets.token_urlsafe(32)
        self.sessions[session] = now + SESSION_TTL_S
        return session

    def close_session(self, request: Request) -> None:
        self.sessions.pop(request.cookies.get(SESSION_COOKIE, ""), None)

    def session_of(self, request: Request) -> str | None:
        session = request.cookies.get(SESSION_COOKIE)
        if not session or self.read_only:
            return None
        expiry = self.sessions.get(session)
        return session if expiry is not None and expiry > time.monotonic() else None

    def csrf_for(self, session: str) -> str:
        return hmac.new(self.secret, session.encode(), hashlib.sha256).hexdigest()

    def may_act(self, request: Request) -> bool:
        """Whether the page should offer actions (the POST is checked again by `authorize`)."""
        return self.session_of(request) is not None

    def may_read_text(self, request: Request) -> None:
        """Essay text (student data) is shown only when asked for, and, where a token is set,
        only to a session that logged in with it."""
        if not self.read_only and self.session_of(request) is None:
            raise Refused(401, "essay text is shown after logging in with the dashboard token")

    def check_origin(self, request: Request) -> None:
        """Refuse a request that a browser says comes from another site."""
        site = request.headers.get("sec-fetch-site")
        if site not in (None, "same-origin", "none"):
            raise Refused(403, f"cross-site request refused ({site})")
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
            raise Refused(403, f"request from another origin refused ({origin})")

    def authorize(self, request: Request, form_csrf: str | None = None) -> str:
        """Check an action's POST; returns who acts ('token' or 'session'), else Refused."""
        if self.read_only:
            raise Refused(
                403, "the dashboard is read-only: set CJS_DASHBOARD_TOKEN to allow actions"
            )
        self.check_origin(request)
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            if self.token_matches(auth[7:].strip()):
                return "token"
            raise Refused(401, "wrong token")
        session = self.session_of(request)
        if session is None:
            raise Refused(401, "not logged in: enter the dashboard token at /login")
        offered = request.headers.get(CSRF_HEADER) or form_csrf or ""
        if not hmac.compare_digest(offered.encode(), self.csrf_for(session).encode()):
            raise Refused(403, "missing or wrong CSRF token")
        return "session"
