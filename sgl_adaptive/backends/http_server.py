"""Serve the in-process backend over SGLang's HTTP API (``/get_model_info``, ``/generate``, ...).

A CPU machine cannot run the SGLang server; this speaks the subset of its protocol that the
frontend's ``RuntimeEndpoint`` (and so ``SGLangEndpoint``) uses, so the endpoint path of every
program can be exercised, and several clients can share one in-process model.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sglang.lang.ir import SglSamplingParams

from sgl_adaptive.backends.local import LocalBackend
from sgl_adaptive.errors import UserError

_PARAMS = {f for f in SglSamplingParams.__dataclass_fields__}


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/get_model_info":
            self._send(200, {"model_path": self.server.backend.model_path, "is_generation": True})
        elif self.path in ("/health", "/health_generate"):
            self._send(200, {})
        elif self.path == "/server_info":
            self._send(200, {"backend": "sgl-adaptive in-process"})
        else:
            self._send(404, {"error": f"unknown path {self.path}"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError:
            self._send(400, {"error": "malformed JSON"})
            return
        if self.path == "/flush_cache":
            self.server.backend.flush_cache()
            self._send(200, {})
        elif self.path == "/generate":
            self.server.requests.append(body)
            try:
                self._send(200, self.server.generate(body))
            except UserError as exc:
                self._send(400, {"error": str(exc)})
        else:
            self._send(404, {"error": f"unknown path {self.path}"})


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], backend: LocalBackend) -> None:
        super().__init__(address, _Handler)
        self.backend = backend
        self.requests: list[dict] = []
        """Every /generate body received (for tests and debugging)."""

    def generate(self, body: dict) -> dict | list:
        if isinstance(body.get("text"), list):
            return [self.generate({**body, "text": t}) for t in body["text"]]
        sp = SglSamplingParams(**{k: v for k, v in body.get("sampling_params", {}).items() if k in _PARAMS})
        for name in ("return_logprob", "top_logprobs_num", "logprob_start_len", "return_text_in_logprobs"):
            if name in body:
                setattr(sp, name, body[name])
        text = body.get("text", "")
        token_ids = body.get("token_ids_logprob") if body.get("return_logprob") else None
        out_text, meta = self.backend.complete(text, sp, token_ids_logprob=token_ids)
        return {"text": out_text, "meta_info": meta}


def serve(backend: LocalBackend, host: str = "127.0.0.1", port: int = 30000) -> _Server:
    """Start serving in a background thread; ``server.shutdown()`` stops it. Port 0 picks a free one."""
    server = _Server((host, port), backend)
    threading.Thread(target=server.serve_forever, name="sgl-adaptive-http", daemon=True).start()
    return server
