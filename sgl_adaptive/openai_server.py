"""An OpenAI-compatible HTTP front for adaptive Best-of-N (``sgl-adaptive serve``): ``/v1/chat/completions``,
``/v1/models`` and ``/health`` over any backend (``LocalBackend``, ``SGLangEndpoint``), with a bounded queue,
request timeouts, streaming and a draining shutdown. Requests are checked and responses shaped in
``openai_protocol.py``; importing either imports neither torch nor sglang.

Each admitted request runs its method in a worker thread; at most ``max_concurrency`` run at once,
``max_queue`` more wait, and any further request is answered 429 at once. A run cannot be cancelled:
one that outlives its request timeout (answered 504) keeps its slot until it ends. Other paths are
forwarded to ``native_url`` when one is given (``sgl-adaptive serve --model`` forwards SGLang's native
``/generate`` API to the in-process backend's server), else answered 404.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sgl_adaptive.errors import BackendUnavailableError, ProgramError, PromptTooLongError, UserError
from sgl_adaptive.openai_protocol import (
    ApiError,
    ChatRequest,
    Completion,
    ServerLimits,
    bad_request,
    models_body,
    parse_chat_request,
)
from sgl_adaptive.runner import run

MAX_BODY_BYTES = 8 << 20

Log = Callable[[str], None]


@dataclass(frozen=True)
class ServerOptions:
    """Load limits of the server."""

    max_concurrency: int = 4
    """Methods running at once (each forks its own samples, which the backend batches)."""
    max_queue: int = 16
    """Admitted requests waiting for a running slot; a request beyond them is answered 429."""
    request_timeout_s: float = 600.0
    """Queue wait and run together; past it the request is answered 504 (the run still ends normally)."""
    heartbeat_s: float = 15.0
    """A streamed response sends an SSE comment at least this often while the method runs."""
    read_timeout_s: float = 60.0
    """A client must send its request within this time (then 408, or the connection is closed)."""

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise UserError(f"--max-concurrency must be at least 1 (got {self.max_concurrency})")
        if self.max_queue < 0:
            raise UserError(f"--max-queue must be at least 0 (got {self.max_queue})")
        if self.request_timeout_s <= 0:
            raise UserError(f"--request-timeout must be positive (got {self.request_timeout_s})")


class Admission:
    """At most ``running`` runs at once and ``waiting`` more in line; beyond that, ``enter`` raises 429."""

    def __init__(self, running: int, waiting: int) -> None:
        self.max_running, self.max_waiting = running, waiting
        self.running = self.waiting = 0
        self._cond = threading.Condition()

    def enter(self, deadline: float) -> None:
        """Take a running slot, waiting in line until ``deadline`` (then 504); 429 if the line is full."""
        with self._cond:
            if self.running >= self.max_running and self.waiting >= self.max_waiting:
                raise ApiError(
                    429,
                    f"the server is at capacity ({self.running} running, {self.waiting} waiting); retry later",
                    type="rate_limit_error",
                    code="queue_full",
                )
            self.waiting += 1
            try:
                while self.running >= self.max_running:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise _timeout("waiting in the queue")
                    self._cond.wait(remaining)
                self.running += 1
            finally:
                self.waiting -= 1

    def leave(self) -> None:
        with self._cond:
            self.running -= 1
            self._cond.notify()

    @property
    def idle(self) -> bool:
        with self._cond:
            return self.running == 0 and self.waiting == 0


def _timeout(where: str) -> ApiError:
    return ApiError(504, f"the request timed out {where}", type="timeout_error", code="timeout")


def api_error(exc: BaseException) -> ApiError:
    """The OpenAI-shaped error for an exception of a run."""
    if isinstance(exc, ApiError):
        return exc
    message = str(exc)
    if isinstance(exc, PromptTooLongError):  # the endpoint backend raises it on the server's refusal too
        return ApiError(
            413, message, type="invalid_request_error", param="messages", code="context_length_exceeded"
        )
    if isinstance(exc, BackendUnavailableError):
        return ApiError(502, message, type="upstream_error", code="backend_unavailable")
    if isinstance(exc, UserError):
        return bad_request(message)
    if isinstance(exc, ProgramError):
        return ApiError(502, message, type="backend_error", code="backend_failed")
    return ApiError(
        500, f"internal error: {type(exc).__name__}: {exc}", type="server_error", code="internal_error"
    )


class PromptTokenProbe:
    """Delegates to a backend and keeps the smallest ``prompt_tokens`` of the run's requests: the first
    request of every program prefills the prompt alone, every later one extends it."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        self.prompt_tokens: int | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def generate(self, s: Any, sampling_params: Any) -> tuple[str, dict]:
        out, meta = self._backend.generate(s, sampling_params=sampling_params)
        tokens = int(meta.get("prompt_tokens", 0) or 0)
        if tokens and (self.prompt_tokens is None or tokens < self.prompt_tokens):
            self.prompt_tokens = tokens
        return out, meta


class OpenAIServer(ThreadingHTTPServer):
    """The HTTP server; ``stop()`` drains it (new requests get 503 while those in flight finish)."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        backend: Any,
        limits: ServerLimits,
        options: ServerOptions | None = None,
        *,
        native_url: str | None = None,
        log: Log | None = None,
    ) -> None:
        super().__init__(address, _Handler)
        self.backend, self.limits = backend, limits
        self.options = options or ServerOptions()
        self.native_url = native_url.rstrip("/") if native_url else None
        self.log = log or _stderr_log
        self.admission = Admission(self.options.max_concurrency, self.options.max_queue)
        self.created = int(time.time())
        self.draining = False
        self._active = 0
        self._active_lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    @contextmanager
    def in_flight(self) -> Iterator[None]:
        with self._active_lock:
            self._active += 1
        try:
            yield
        finally:
            with self._active_lock:
                self._active -= 1

    def stop(self, grace_s: float | None = None) -> bool:
        """Refuse new requests (503), wait up to ``grace_s`` (default: the request timeout) for those in
        flight and their runs, then close. True when everything finished in time. (The server must be
        serving, as ``serve_openai`` starts it: ``shutdown`` waits for ``serve_forever`` to return.)"""
        self.draining = True
        deadline = time.monotonic() + (self.options.request_timeout_s if grace_s is None else grace_s)
        while not self._drained() and time.monotonic() < deadline:
            time.sleep(0.05)
        drained = self._drained()
        self.shutdown()
        self.server_close()
        return drained

    def _drained(self) -> bool:
        with self._active_lock:
            return self._active == 0 and self.admission.idle

    def start_run(self, request: ChatRequest, events: queue.Queue) -> None:
        """Run the method in a worker thread (its running slot is already taken); ``events`` receives
        ``("progress", line)`` while it runs (streaming only), then ``("done", Completion)`` or
        ``("error", exception)``."""

        def work() -> None:
            try:
                probe = PromptTokenProbe(self.backend)
                progress = (lambda line: events.put(("progress", line))) if request.stream else None
                result = run(request.prompt, probe, request.method, request.config, progress=progress)
                events.put(("done", Completion(request, result, probe.prompt_tokens or 0, self.limits.model)))
            except BaseException as exc:  # reported to the client, never lost in a thread
                events.put(("error", exc))
            finally:
                self.admission.leave()

        threading.Thread(target=work, name="sgl-adaptive-openai-run", daemon=True).start()

    def backend_health(self) -> str | None:
        """None when the backend answers, else why not (an ``SGLangEndpoint``'s server is asked)."""
        base_url = getattr(self.backend, "base_url", None)
        if not base_url:
            return None
        api_key = getattr(self.backend, "api_key", None)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            with urllib.request.urlopen(
                urllib.request.Request(base_url + "/health", headers=headers), timeout=5
            ):
                return None
        except (urllib.error.URLError, OSError) as exc:
            return f"the SGLang server at {base_url} is not healthy: {exc}"


_log_lock = threading.Lock()


def _stderr_log(line: str) -> None:
    with _log_lock:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


class _ClientGone(Exception):
    """The client closed the connection while its response was being written."""


class _Handler(BaseHTTPRequestHandler):
    server: OpenAIServer
    protocol_version = "HTTP/1.0"  # one request per connection: nothing idles on keep-alive at shutdown

    def setup(self) -> None:
        self.timeout = self.server.options.read_timeout_s  # socket timeout while the request arrives
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request, written by _handle

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        start = time.monotonic()
        self._status, self._detail = 0, ""
        with self.server.in_flight():
            try:
                try:
                    self._route()
                except ApiError as exc:
                    self._detail += f" error={exc.code}"
                    self._send_json(exc.status, exc.body())
                except _ClientGone:
                    raise
                except Exception as exc:  # a bug: answered 500, and logged
                    error = api_error(exc)
                    self._detail += f" error={error.message}"
                    self._send_json(error.status, error.body())
            except _ClientGone:
                self._detail += " client closed the connection"
        self.server.log(
            f'{self.client_address[0]} "{self.command} {self.path}" {self._status} '
            f"{time.monotonic() - start:.2f}s{self._detail}"
        )

    def _route(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        if self.command == "GET" and path == "/health":
            self._health()
        elif self.command == "GET" and path == "/v1/models":
            self._send_json(200, models_body(self.server.limits.model, self.server.created))
        elif self.command == "GET" and path.startswith("/v1/models/"):
            name = path[len("/v1/models/") :]
            data = models_body(self.server.limits.model, self.server.created)["data"]
            if name != self.server.limits.model:
                raise ApiError(
                    404,
                    f"the model {name!r} does not exist",
                    type="invalid_request_error",
                    param="model",
                    code="model_not_found",
                )
            self._send_json(200, data[0])
        elif path == "/v1/chat/completions":
            if self.command != "POST":
                raise ApiError(405, "use POST", type="invalid_request_error", code="method_not_allowed")
            self._chat()
        elif self.server.native_url and not path.startswith("/v1/"):
            self._forward()
        else:
            raise ApiError(404, f"unknown path {path}", type="invalid_request_error", code="not_found")

    # ---- routes ----------------------------------------------------------------------------------
    def _health(self) -> None:
        if self.server.draining:
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
        problem = self.server.backend_health()
        if problem:
            raise ApiError(503, problem, type="server_error", code="backend_unavailable")
        admission = self.server.admission
        self._send_json(200, {"status": "ok", "running": admission.running, "waiting": admission.waiting})

    def _chat(self) -> None:
        body = self._read_json()
        if self.server.draining:
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
        request = parse_chat_request(body, self.server.limits)
        if "seed" in request.given and not request.greedy and not hasattr(self.server.backend, "reseed"):
            raise bad_request(
                "seed is honoured by the in-process backend only, not by an SGLang server (it is accepted "
                "when nothing is sampled: method greedy or temperature 0)",
                "seed",
            )
        self._detail = f" method={request.method} stream={str(request.stream).lower()}"
        deadline = time.monotonic() + self.server.options.request_timeout_s
        self.server.admission.enter(deadline)
        events: queue.Queue = queue.Queue()
        self.server.start_run(request, events)
        if request.stream:
            self._stream(events, deadline)
        else:
            completion = self._wait(events, deadline, on_progress=None)
            self._note(completion)
            self._send_json(200, completion.body())

    def _wait(
        self, events: queue.Queue, deadline: float, on_progress: Callable[[str | None], None] | None
    ) -> Completion:
        """The run's completion; progress lines (and ``None`` on each idle heartbeat) go to ``on_progress``."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _timeout(f"after {self.server.options.request_timeout_s:g} s")
            try:
                kind, value = events.get(timeout=min(remaining, self.server.options.heartbeat_s))
            except queue.Empty:
                if on_progress is not None:
                    on_progress(None)
                continue
            if kind == "done":
                return value
            if kind == "error":
                raise api_error(value)
            if on_progress is not None:
                on_progress(value)

    def _stream(self, events: queue.Queue, deadline: float) -> None:
        """SSE: comments with the run's progress, then the chosen answer's chunks and ``[DONE]``. The status
        line goes out with the first progress line, so errors found before it (400, 413, 429) keep theirs;
        an error after it is sent as a ``data: {"error": ...}`` event."""
        started = False

        def start() -> None:
            nonlocal started
            if not started:
                started = True
                self._status = 200
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()

        def progress(line: str | None) -> None:
            if line is not None:
                start()
            if started:
                self._write(": " + (line or "keep-alive").replace("\r", " ").replace("\n", " ") + "\n\n")

        try:
            completion = self._wait(events, deadline, on_progress=progress)
        except ApiError as exc:
            if not started:
                raise
            self._detail += f" error={exc.code} (after the stream started)"
            self._write(f"data: {json.dumps(exc.body())}\n\n")
            return
        start()
        self._note(completion)
        for chunk in completion.chunks():
            self._write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n")
        self._write("data: [DONE]\n\n")

    def _forward(self) -> None:
        """Pass a native SGLang request through to ``native_url`` and its answer back."""
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length) if length else None
        request = urllib.request.Request(
            self.server.native_url + self.path,
            data=data,
            method=self.command,
            headers={"Content-Type": self.headers.get("Content-Type", "application/json")},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.server.options.request_timeout_s) as answer:
                status, payload, kind = answer.status, answer.read(), answer.headers.get("Content-Type")
        except urllib.error.HTTPError as exc:
            status, payload, kind = exc.code, exc.read(), exc.headers.get("Content-Type")
        except (urllib.error.URLError, OSError) as exc:
            raise ApiError(
                502,
                f"the native SGLang API is unreachable: {exc}",
                type="upstream_error",
                code="backend_unavailable",
            ) from None
        self._send_bytes(status, payload, kind or "application/json")

    # ---- helpers ---------------------------------------------------------------------------------
    def _note(self, completion: Completion) -> None:
        c = completion.result.costs
        if completion.result.requested_method:
            self._detail += f" ran={completion.result.method} (temperature 0)"
        self._detail += (
            f" samples={c.samples} batches={c.batches} self_evals={c.self_evals} "
            f"prompt_tokens={completion.prompt_tokens} generated={c.generated_tokens} run={c.wall_s:.2f}s"
        )

    def _read_json(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise bad_request("bad Content-Length header", code="invalid_request") from None
        if length > MAX_BODY_BYTES:
            raise ApiError(
                413,
                f"the request body exceeds {MAX_BODY_BYTES} bytes",
                type="invalid_request_error",
                code="request_too_large",
            )
        try:
            return json.loads(self.rfile.read(length) or b"null")
        except TimeoutError:
            raise ApiError(
                408,
                "the request body did not arrive in time",
                type="invalid_request_error",
                code="request_timeout",
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise bad_request("the request body is not valid JSON", code="invalid_json") from None

    def _send_json(self, status: int, payload: Any) -> None:
        self._send_bytes(status, json.dumps(payload, ensure_ascii=False).encode(), "application/json")

    def _send_bytes(self, status: int, payload: bytes, content_type: str) -> None:
        self._status = status
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            raise _ClientGone() from None

    def _write(self, text: str) -> None:
        try:
            self.wfile.write(text.encode())
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            raise _ClientGone() from None


def serve_openai(
    backend: Any,
    host: str = "127.0.0.1",
    port: int = 30000,
    *,
    model: str | None = None,
    options: ServerOptions | None = None,
    max_samples: int = 64,
    native_url: str | None = None,
    log: Log | None = None,
) -> OpenAIServer:
    """Start serving ``backend`` in a background thread (port 0 picks a free one); ``server.stop()`` drains
    and closes it. ``model`` is the id clients name (default: the backend's model path)."""
    name = model or getattr(backend, "model_path", None) or backend.get_model_name()
    limits = ServerLimits(model=name, max_samples=max_samples)
    server = OpenAIServer((host, port), backend, limits, options, native_url=native_url, log=log)
    threading.Thread(target=server.serve_forever, name="sgl-adaptive-openai", daemon=True).start()
    return server
