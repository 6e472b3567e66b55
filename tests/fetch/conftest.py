"""A file server on 127.0.0.1 for the fetch tests: HTTP Range, and on request a dropped connection mid-file, a
server that ignores Range, an error status or an HTML page instead of the file. Stopped at the end of each test."""

from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class FileServer:
    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.drop_after: dict[str, list[int]] = {}
        """name -> byte counts: each GET of the file sends only the next count of body bytes, then hangs up."""
        self.status: dict[str, int] = {}
        self.content_type: dict[str, str] = {}
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []
        """(name, Range header) of every GET."""
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/files"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def names(self) -> list[str]:
        return [name for name, _ in self.requests]

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.split("?")[0].rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                server.requests.append((name, rng))
                if name in server.status:
                    return self._empty(server.status[name])
                if name not in server.files:
                    return self._empty(404)
                data = server.files[name]
                start, code = 0, 200
                m = re.fullmatch(r"bytes=(\d+)-", rng or "")
                if m and not server.ignore_range:
                    start, code = int(m.group(1)), 206
                    if start >= len(data):
                        return self._empty(416, {"Content-Range": f"bytes */{len(data)}"})
                body = data[start:]
                self.send_response(code)
                self.send_header("Content-Type", server.content_type.get(name, "application/octet-stream"))
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                if code == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                drops = server.drop_after.get(name)
                if drops:
                    self.wfile.write(body[: drops.pop(0)])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def _empty(self, code: int, headers: dict[str, str] | None = None):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

        return Handler


@pytest.fixture
def server():
    s = FileServer()
    try:
        yield s
    finally:
        s.stop()
