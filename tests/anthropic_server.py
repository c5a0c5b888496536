"""A loopback HTTP server that speaks enough of Anthropic's wire format for the real SDK.

`POST /v1/messages` plays a script of replies (success with a `record_comparison`
tool call, 429 with `retry-after` / `retry-after-ms`, 429 spend limit, 529, 500, 400,
401, 402, 403, 413, a slow reply that outlives the client timeout, a dropped
connection, `max_tokens`, `refusal`, malformed tool input, ...); when the script is
empty it answers with a success. The Message Batches endpoints (`POST
/v1/messages/batches`, `GET .../{id}`, `GET .../{id}/results` as JSONL, `POST
.../{id}/cancel`) keep batches in memory; a batch ends after a set number of polls,
and each item's result can be scripted by `custom_id`.

Every request is recorded (method, path, lower-cased headers, JSON body) so tests can
assert what the SDK really sent. A small prompt-cache simulation fills `usage`: the
first request with a given cached prefix (tools + system up to a `cache_control`
block) reports `cache_creation_input_tokens` (with the `cache_creation` breakdown by
TTL), later ones `cache_read_input_tokens`.

The server keeps its own bill, `usage_log`: one `Billed` per message it delivered whole
with usage (a 200 to `/v1/messages`, whatever its stop reason or tool input), and one per
Message Batch item that succeeded, when the batch ends (fetching results again is free).
Tests price it independently of the code under test.

More faults: `revoked_keys` (every call with such a key answers 401), Message Batches
listed newest first (`GET /v1/messages/batches`, paged) and cancelled, an ended batch whose
`results_url` is null for its first `null_results_url_polls` retrievals, a create that
registers the batch before it hangs or drops (`Reply(create_first=True)`), slow results
(`results_delay_s`), and `fuzz(rate, seed)`: that share of all requests, on every endpoint,
answers a random status, a body that is not JSON, JSON of the wrong shape, a truncated
body, or nothing at all (a dropped connection).

Stdlib only: `ThreadingHTTPServer` in a daemon thread; `stop()` wakes slow replies.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
import ssl
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

JSON = dict[str, Any]
BodyFn = Callable[[JSON, "AnthropicTestServer"], Any]

REASONS = {529: "Overloaded"}


@dataclass
class Reply:
    """One scripted response. `body` is JSON-able, bytes/str (sent raw) or a function of
    (request body, server) returning either."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    drop: bool = False
    """Close the connection without answering (a connection error for the client)."""
    truncate: bool = False
    """Announce the whole body, send half of it, close (an incomplete read for the client)."""
    create_first: bool = False
    """On `POST /v1/messages/batches`: create the batch, then play this reply (a batch that
    exists although its creator never learnt its id)."""


@dataclass
class Billed:
    """One line of the server's own bill."""

    model: str
    usage: dict[str, Any]
    batch_id: str | None = None
    custom_id: str | None = None


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float = field(default_factory=time.monotonic)


# --- reply builders --------------------------------------------------------------


def message_json(
    content: list[JSON],
    *,
    stop_reason: str | None,
    usage: JSON | None = None,
    model: str = "claude-sonnet-4-6",
) -> JSON:
    return {
        "id": "msg_test",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": usage or {"input_tokens": 10, "output_tokens": 5},
    }


def tool_use_block(tool_input: Any, name: str = "record_comparison") -> JSON:
    return {"type": "tool_use", "id": "toolu_test", "name": name, "input": tool_input}


def _simulated(content: list[JSON], stop_reason: str | None, usage: JSON | None) -> BodyFn:
    def body(request: JSON, server: AnthropicTestServer) -> JSON:
        return message_json(
            content,
            stop_reason=stop_reason,
            usage=usage if usage is not None else server.simulate_usage(request),
            model=str(request.get("model", "claude-sonnet-4-6")),
        )

    return body


def success(
    winner: str = "essay_a",
    confidence: float = 4,
    justification: str = "Essay A develops its argument more fully.",
    *,
    usage: JSON | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    tool_input = {"winner": winner, "justification": justification, "confidence": confidence}
    return Reply(
        200, _simulated([tool_use_block(tool_input)], "tool_use", usage), headers=headers or {}
    )


def tool_reply(
    tool_input: Any, *, name: str = "record_comparison", stop_reason: str = "tool_use"
) -> Reply:
    """A tool call with arbitrary (possibly malformed) input."""
    return Reply(200, _simulated([tool_use_block(tool_input, name)], stop_reason, None))


def content_reply(content: list[JSON], stop_reason: str | None) -> Reply:
    return Reply(200, _simulated(content, stop_reason, None))


def text_reply(text: str = "I think essay A is better.", stop_reason: str = "end_turn") -> Reply:
    return content_reply([{"type": "text", "text": text}], stop_reason)


def max_tokens_reply() -> Reply:
    return content_reply(
        [tool_use_block({"winner": "essay_a", "justification": "Essay A is"})], "max_tokens"
    )


def refusal_reply() -> Reply:
    return content_reply([], "refusal")


def error_json(etype: str, message: str, error_code: str | None = None) -> JSON:
    error: JSON = {"type": etype, "message": message}
    if error_code is not None:
        error["details"] = {"error_code": error_code}
    return {"type": "error", "error": error, "request_id": "req_test"}


def error_reply(
    status: int,
    etype: str,
    message: str = "scripted error",
    *,
    headers: dict[str, str] | None = None,
    error_code: str | None = None,
) -> Reply:
    h = {"request-id": "req_test", **(headers or {})}
    return Reply(status, error_json(etype, message, error_code), headers=h)


def rate_limited(
    retry_after: str | float | None = None, retry_after_ms: str | float | None = None
) -> Reply:
    headers: dict[str, str] = {}
    if retry_after is not None:
        headers["retry-after"] = str(retry_after)
    if retry_after_ms is not None:
        headers["retry-after-ms"] = str(retry_after_ms)
    return error_reply(
        429,
        "rate_limit_error",
        "Number of request tokens has exceeded your per-minute rate limit",
        headers=headers,
    )


def spend_limited() -> Reply:
    return error_reply(
        429,
        "rate_limit_error",
        "Your organization has reached its monthly usage limit.",
        error_code="enforced_spend_limit_reached",
    )


def overloaded() -> Reply:
    return error_reply(529, "overloaded_error", "Overloaded")


def server_error(status: int = 500) -> Reply:
    return error_reply(status, "api_error", "Internal server error")


def slow(delay_s: float, then: Reply | None = None) -> Reply:
    reply = then or success()
    return Reply(reply.status, reply.body, dict(reply.headers), delay_s=delay_s)


def drop_connection() -> Reply:
    return Reply(drop=True)


# --- batch results ---------------------------------------------------------------


def batch_succeeded(reply: Reply | None = None) -> Reply:
    """The `result` of a batch item: a message (the body of a 200 reply)."""
    return reply or success()


def batch_errored(etype: str = "invalid_request_error", message: str = "bad item") -> JSON:
    return {"type": "errored", "error": error_json(etype, message)}


def batch_expired() -> JSON:
    return {"type": "expired"}


def batch_canceled() -> JSON:
    return {"type": "canceled"}


@dataclass
class FakeBatch:
    id: str
    requests: list[JSON]
    polls_until_end: int
    polls: int = 0
    canceled: bool = False
    created_at: float = field(default_factory=time.time)
    results: list[JSON] | None = None
    """Fixed (and billed) the first time the batch is seen ended."""
    null_url_left: int = 0

    @property
    def ended(self) -> bool:
        return self.polls >= self.polls_until_end

    def cancel(self) -> None:
        """Canceling now, ended at the next poll; unscripted items then end `canceled`."""
        self.canceled = True
        self.polls_until_end = min(self.polls_until_end, self.polls + 1)


# --- the server -----------------------------------------------------------------


class AnthropicTestServer:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._script: deque[Reply] = deque()
        self._batch_create_script: deque[Reply] = deque()
        self._results_script: deque[Reply] = deque()
        self._stopping = threading.Event()
        self._ids = itertools.count(1)
        self._cache: set[str] = set()
        self.requests: list[Recorded] = []
        self.batches: dict[str, FakeBatch] = {}
        self.batch_results: dict[str, Reply | JSON] = {}
        """Result per custom_id for batch items: a Reply (→ succeeded) or a result JSON."""
        self.batch_default: Callable[[str], Reply | JSON | None] | None = None
        """Result of an item not in `batch_results`, by custom_id (None: a success)."""
        self.batch_polls_until_end = 1
        """GETs of a batch that answer `in_progress` before it is `ended`."""
        self.usage_log: list[Billed] = []
        self.revoked_keys: set[str] = set()
        """Calls with one of these keys answer 401 (a revoked key)."""
        self.null_results_url_polls = 0
        """An ended batch answers `results_url: null` to this many retrievals first."""
        self.results_delay_s = 0.0
        self._fuzz: tuple[float, int] | None = None
        self._fuzz_rngs: dict[str, random.Random] = {}
        self.fuzzed: Counter[str] = Counter()
        """Faults played by `fuzz`, by endpoint and kind."""
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )

    # lifecycle
    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> AnthropicTestServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    # scripting
    def script(self, *replies: Reply) -> None:
        with self._lock:
            self._script.extend(replies)

    def script_batch_create(self, *replies: Reply) -> None:
        with self._lock:
            self._batch_create_script.extend(replies)

    def script_results(self, *replies: Reply) -> None:
        """Replies to the next `GET .../results` of an ended batch (then the real results)."""
        with self._lock:
            self._results_script.extend(replies)

    def fuzz(self, rate: float, seed: int = 0) -> None:
        """From now on, answer `rate` of all requests with a random fault (0 stops). Each
        endpoint draws from its own generator, so the n-th call of an endpoint meets the same
        fault whatever the interleaving of the calls (the workers' timing)."""
        with self._lock:
            self._fuzz = (rate, seed) if rate > 0 else None
            self._fuzz_rngs = {}

    def billed(self) -> list[Billed]:
        with self._lock:
            return list(self.usage_log)

    def pending_script(self) -> int:
        with self._lock:
            return len(self._script)

    def calls(self, path: str = "/v1/messages", method: str = "POST") -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path == path and r.method == method]

    def simulate_usage(self, request: JSON) -> JSON:
        """Usage with a simulated prompt cache over tools + system (when marked cacheable)."""
        system = request.get("system")
        prefix_tokens = 0
        cached = False
        if isinstance(system, list) and system:
            marked = any(isinstance(b, dict) and b.get("cache_control") for b in system)
            prefix = json.dumps([request.get("tools"), system], sort_keys=True)
            prefix_tokens = max(1, len(prefix) // 4)
            if marked:
                key = hashlib.sha256(f"{request.get('model')}|{prefix}".encode()).hexdigest()
                with self._lock:
                    cached = key in self._cache
                    self._cache.add(key)
                ttl = next(
                    (
                        b["cache_control"].get("ttl", "5m")
                        for b in system
                        if isinstance(b, dict) and isinstance(b.get("cache_control"), dict)
                    ),
                    "5m",
                )
                written = 0 if cached else prefix_tokens
                usage = {
                    "input_tokens": max(1, len(json.dumps(request.get("messages"))) // 4),
                    "output_tokens": 40,
                    "cache_read_input_tokens": prefix_tokens if cached else 0,
                    "cache_creation_input_tokens": written,
                    "cache_creation": {
                        "ephemeral_5m_input_tokens": written if ttl == "5m" else 0,
                        "ephemeral_1h_input_tokens": written if ttl == "1h" else 0,
                    },
                }
                return usage
        return {
            "input_tokens": prefix_tokens + max(1, len(json.dumps(request.get("messages"))) // 4),
            "output_tokens": 40,
            "cache_read_input_tokens": 0,
            "cache_creation_input_tokens": 0,
        }

    # internals
    def _next_reply(self, queue: deque[Reply]) -> Reply:
        with self._lock:
            return queue.popleft() if queue else success()

    def _end(self, batch: FakeBatch) -> list[JSON]:
        """The batch's results, fixed and billed the first time it is seen ended."""
        if batch.results is None:
            results = [self._result_for(item, batch) for item in batch.requests]
            with self._lock:
                if batch.results is None:
                    batch.results = results
                    batch.null_url_left = self.null_results_url_polls
                    for item, result in zip(batch.requests, results, strict=True):
                        message = result.get("message")
                        if result.get("type") == "succeeded" and isinstance(message, dict):
                            self.usage_log.append(
                                Billed(
                                    str(message.get("model")),
                                    dict(message.get("usage") or {}),
                                    batch.id,
                                    str(item.get("custom_id")),
                                )
                            )
        assert batch.results is not None
        return batch.results

    def _batch_json(self, batch: FakeBatch, *, retrieval: bool = False) -> JSON:
        n = len(batch.requests)
        status = "ended" if batch.ended else ("canceling" if batch.canceled else "in_progress")
        counts = {"processing": n, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        url: str | None = None
        if batch.ended:
            counts["processing"] = 0
            for result in self._end(batch):
                counts[str(result["type"])] += 1
            url = f"{self.url}/v1/messages/batches/{batch.id}/results"
            if retrieval and batch.null_url_left > 0:
                batch.null_url_left -= 1
                url = None
        created = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(batch.created_at))
        created += f".{int(batch.created_at % 1 * 1e6):06d}Z"
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": counts,
            "created_at": created,
            "expires_at": "2099-01-02T00:00:00Z",
            "ended_at": created if batch.ended else None,
            "cancel_initiated_at": created if batch.canceled else None,
            "archived_at": None,
            "results_url": url,
        }

    def _fuzzed(self, method: str, path: str) -> Reply | None:
        """A random fault, for the share of requests `fuzz` asked for."""
        with self._lock:
            if self._fuzz is None:
                return None
            rate, seed = self._fuzz
            endpoint = re.sub(r"msgbatch_\w+", "{id}", f"{method} {path}")
            rng = self._fuzz_rngs.setdefault(endpoint, random.Random(f"{seed}:{endpoint}"))
            if rng.random() >= rate:
                return None
            kind = rng.choice(
                ["status", "status", "not_json", "wrong_shape", "truncated", "drop", "empty"]
            )
            status = rng.choice([400, 404, 409, 413, 422, 429, 500, 502, 503, 504, 529])
            self.fuzzed[f"{endpoint} {kind}"] += 1
        if kind == "status":
            return error_reply(status, rng.choice(["api_error", "overloaded_error", "x_error"]))
        if kind == "not_json":
            return Reply(rng.choice([200, 500]), b"<html>Bad Gateway</html>")
        if kind == "wrong_shape":
            return Reply(200, {"type": "message", "content": 7, "usage": "lots"})
        if kind == "truncated":
            return Reply(200, {"type": "message", "content": [], "pad": "x" * 200}, truncate=True)
        if kind == "empty":
            return Reply(200, b"")
        return drop_connection()

    def _list_json(self, query: str) -> JSON:
        """`GET /v1/messages/batches`: newest first, `limit` per page, `after_id` to page on."""
        params = dict(p.partition("=")[::2] for p in query.split("&") if p)
        limit = int(params.get("limit") or 20)
        with self._lock:
            ordered = sorted(self.batches.values(), key=lambda b: b.created_at, reverse=True)
        after = params.get("after_id")
        if after:
            ids = [b.id for b in ordered]
            ordered = ordered[ids.index(after) + 1 :] if after in ids else []
        page = ordered[:limit]
        data = [self._batch_json(b) for b in page]
        return {
            "data": data,
            "has_more": len(ordered) > limit,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }

    def _revoked(self, headers: dict[str, str]) -> bool:
        if not self.revoked_keys:
            return False
        auth = headers.get("authorization", "").removeprefix("Bearer ")
        return auth in self.revoked_keys or headers.get("x-api-key") in self.revoked_keys

    def _result_for(self, item: JSON, batch: FakeBatch) -> JSON:
        custom_id = str(item.get("custom_id"))
        scripted = self.batch_results.get(custom_id)
        if scripted is None and batch.canceled:
            return batch_canceled()
        if scripted is None and self.batch_default is not None:
            scripted = self.batch_default(custom_id)
        if scripted is None or isinstance(scripted, Reply):
            reply = scripted or success()
            body = reply.body
            if callable(body):
                body = body(item.get("params") or {}, self)
            return {"type": "succeeded", "message": body}
        return scripted

    def _bill(self, body: Any) -> None:
        if isinstance(body, dict) and body.get("type") == "message" and "usage" in body:
            with self._lock:
                self.usage_log.append(Billed(str(body.get("model")), dict(body["usage"])))

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as separate writes

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _read_body(self) -> Any:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                if not raw:
                    return None
                try:
                    return json.loads(raw)
                except ValueError:
                    return raw.decode(errors="replace")

            def _record(self, body: Any) -> bool:
                """Record the request; True when the server answered it already (a fault)."""
                headers = {k.lower(): v for k, v in self.headers.items()}
                path = self.path.split("?", 1)[0]
                with server._lock:
                    server.requests.append(Recorded(self.command, path, headers, body))
                if server._revoked(headers):
                    self._send(error_reply(401, "authentication_error", "invalid x-api-key"))
                    return True
                fault = server._fuzzed(self.command, path)
                if fault is not None:
                    self._send(fault)
                    return True
                return False

            def _send(self, reply: Reply, request_body: Any = None, *, bill: bool = False) -> None:
                if reply.delay_s > 0 and server._stopping.wait(reply.delay_s):
                    return
                if reply.drop:
                    self.close_connection = True
                    return
                body = reply.body
                if callable(body):
                    body = body(request_body if isinstance(request_body, dict) else {}, server)
                if isinstance(body, bytes):
                    payload, ctype = body, "application/octet-stream"
                elif isinstance(body, str):
                    payload, ctype = body.encode(), "text/plain"
                else:
                    payload, ctype = json.dumps(body).encode(), "application/json"
                if bill and reply.status == 200 and not reply.truncate:
                    server._bill(body)
                try:
                    self.send_response(reply.status, REASONS.get(reply.status))
                    self.send_header("content-type", ctype)
                    self.send_header("content-length", str(len(payload)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    if reply.truncate:
                        self.wfile.write(payload[: len(payload) // 2])
                        self.wfile.flush()
                        self.close_connection = True
                        return
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            def do_POST(self) -> None:
                body = self._read_body()
                if self._record(body):
                    return
                path = self.path.split("?", 1)[0]
                if path == "/v1/messages":
                    if isinstance(body, dict):
                        rejected = sorted({"temperature", "top_p", "top_k"} & set(body))
                        if rejected:
                            self._send(
                                error_reply(
                                    400,
                                    "invalid_request_error",
                                    f"{rejected[0]}: Extra inputs are not permitted",
                                )
                            )
                            return
                    self._send(server._next_reply(server._script), body, bill=True)
                elif path == "/v1/messages/batches":
                    with server._lock:
                        scripted = (
                            server._batch_create_script.popleft()
                            if server._batch_create_script
                            else None
                        )
                    if scripted is not None and not scripted.create_first:
                        self._send(scripted, body)
                        return
                    requests = body.get("requests", []) if isinstance(body, dict) else []
                    batch_id = f"msgbatch_{next(server._ids):04d}"
                    batch = FakeBatch(batch_id, list(requests), server.batch_polls_until_end)
                    with server._lock:
                        server.batches[batch_id] = batch
                    reply = Reply(200, server._batch_json(batch))
                    if scripted is not None:  # created; now hang, drop or fail all the same
                        reply = Reply(
                            scripted.status if scripted.body is not None else 200,
                            scripted.body if scripted.body is not None else reply.body,
                            scripted.headers,
                            delay_s=scripted.delay_s,
                            drop=scripted.drop,
                            truncate=scripted.truncate,
                        )
                    self._send(reply)
                elif (m := re.fullmatch(r"/v1/messages/batches/([^/]+)/cancel", path)) is not None:
                    batch_or_none = server.batches.get(m.group(1))
                    if batch_or_none is None:
                        self._send(error_reply(404, "not_found_error", "no such batch"))
                        return
                    batch_or_none.cancel()
                    self._send(Reply(200, server._batch_json(batch_or_none)))
                else:
                    self._send(error_reply(404, "not_found_error", f"no route {path}"))

            def do_GET(self) -> None:
                if self._record(None):
                    return
                path, _, query = self.path.partition("?")
                if path == "/v1/messages/batches":
                    self._send(Reply(200, server._list_json(query)))
                    return
                m = re.fullmatch(r"/v1/messages/batches/([^/]+)(/results)?", path)
                batch = server.batches.get(m.group(1)) if m else None
                if m is None or batch is None:
                    self._send(error_reply(404, "not_found_error", f"no such resource {path}"))
                    return
                if m.group(2):
                    if not batch.ended:
                        self._send(error_reply(400, "invalid_request_error", "not ended"))
                        return
                    with server._lock:
                        scripted = (
                            server._results_script.popleft() if server._results_script else None
                        )
                    if scripted is not None:
                        self._send(scripted)
                        return
                    # Results come out of request order: matching must use custom_id.
                    pairs = list(zip(batch.requests, server._end(batch), strict=True))
                    lines = [
                        json.dumps({"custom_id": item.get("custom_id"), "result": result})
                        for item, result in reversed(pairs)
                    ]
                    self._send(
                        Reply(
                            200,
                            ("\n".join(lines) + "\n").encode(),
                            delay_s=server.results_delay_s,
                        )
                    )
                    return
                batch.polls += 1
                self._send(Reply(200, server._batch_json(batch, retrieval=True)))

        return Handler


@contextmanager
def running_server() -> Iterator[AnthropicTestServer]:
    server = AnthropicTestServer().start()
    try:
        yield server
    finally:
        server.stop()


# --- helpers for tests -----------------------------------------------------------

TEST_KEY = "sk-ant-test-0123456789abcdefSECRET"
_SSL_CONTEXT: ssl.SSLContext | None = None


def http_client() -> Any:
    """An SDK http client sharing one SSL context: building one per client costs ~40 ms,
    which over a hundred tests is most of their time (the loopback server is plain http)."""
    global _SSL_CONTEXT
    if _SSL_CONTEXT is None:
        _SSL_CONTEXT = ssl.create_default_context()
    import anthropic

    return anthropic.DefaultAsyncHttpxClient(verify=_SSL_CONTEXT)


def client_env(monkeypatch: Any, server: AnthropicTestServer, tmp_path: Any) -> None:
    """Point the SDK at `server` the way production does: through the environment."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", TEST_KEY)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
    monkeypatch.setenv("ANTHROPIC_CONFIG_DIR", str(tmp_path / "anthropic-config"))
    for name in (
        "ANTHROPIC_AUTH_TOKEN",
        "ANTHROPIC_PROFILE",
        "ANTHROPIC_CUSTOM_HEADERS",
        "CJS_ANTHROPIC_MODEL",
        "CJS_ANTHROPIC_MAX_TOKENS",
        "CJS_ANTHROPIC_CACHE_TTL",
        "CJS_ANTHROPIC_TIMEOUT_S",
    ):
        monkeypatch.delenv(name, raising=False)
