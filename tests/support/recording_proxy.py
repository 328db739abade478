"""RecordingProxy: passes HTTP requests through to a real service and records what clients sent.

A seam beside the real services: it lets a test see the headers and bodies a client sends
(the CLI's chat) while the store behind it answers for real. Responses stream through
chunk by chunk (chunked encoding), so server-sent events arrive as they are sent.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class RecordingProxy:
    """Listens on a loopback port; `requests` holds (method, path, headers, JSON body or None) in order."""

    def __init__(self, target: str):
        self.target = target.rstrip("/")
        self.requests: list[tuple[str, str, dict[str, str], object]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # the test reads `requests`, not stderr
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw
                proxy.requests.append((self.command, self.path, headers, body))
                upstream = requests.request(self.command, proxy.target + self.path, data=raw, headers=headers,
                                            stream=True, timeout=(5, 120))
                self.send_response(upstream.status_code)
                for key, value in upstream.headers.items():
                    if key.lower() not in HOP_BY_HOP:
                        self.send_header(key, value)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                with upstream:
                    for chunk in upstream.iter_content(chunk_size=None):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

            do_GET = do_POST = do_DELETE = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "RecordingProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def posts(self, path: str) -> list[tuple[dict[str, str], object]]:
        return [(h, b) for m, p, h, b in self.requests if m == "POST" and p == path]
