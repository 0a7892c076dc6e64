"""A stand-in model server for tests: a real HTTP server in its own process.

It speaks the OpenAI chat-completions and Anthropic Messages wire formats. Tests program
its next answers (``POST /program`` with a list of {status, text, headers, delay_s,
body, usage, output_share}: ``usage`` the provider's usage object as sent, or
``output_share`` of the request's max_tokens as the output tokens) and read what it
received (``GET /requests``). Unprogrammed calls get a 200 whose
text says which turn it is.

    python tests/llm/fake_provider.py      # prints the port it listens on
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_lock = threading.Lock()
_program: list[dict[str, Any]] = []
_received: list[dict[str, Any]] = []


class Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return None

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/requests":
            with _lock:
                self._send(200, list(_received))
        else:
            self._send(404, {"error": "no such path"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length) or b"{}")
        if self.path == "/program":
            with _lock:
                _program.clear()
                _program.extend(body)
                _received.clear()
            self._send(200, {"ok": True})
            return
        if self.path not in ("/v1/chat/completions", "/v1/messages"):
            self._send(404, {"error": {"message": f"no such endpoint {self.path}"}})
            return
        with _lock:
            _received.append({"path": self.path, "headers": dict(self.headers), "body": body})
            turn = len(_received)
            step = _program.pop(0) if _program else {}
        time.sleep(float(step.get("delay_s", 0)))
        status = int(step.get("status", 200))
        if status != 200:
            self._send(
                status, step.get("body", {"error": {"message": f"programmed {status}"}}), step.get("headers")
            )
            return
        text = step.get("text", f"answer {turn}")
        output = None
        if "output_share" in step:
            output = int(float(step["output_share"]) * int(body.get("max_tokens") or 0))
        if self.path == "/v1/messages":
            usage = {"input_tokens": 11, "output_tokens": 7 if output is None else output}
            self._send(
                200,
                {
                    "model": body.get("model"),
                    "content": [{"type": "text", "text": text}],
                    "usage": step.get("usage", usage),
                },
            )
        else:
            usage = {"prompt_tokens": 13, "completion_tokens": 5 if output is None else output}
            self._send(
                200,
                {
                    "model": body.get("model"),
                    "choices": [{"message": {"role": "assistant", "content": text}}],
                    "usage": step.get("usage", usage),
                },
            )


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
