"""HTTP plumbing shared by the test doubles (tests/ollama_double.py, tests/provider_doubles.py).

Only the tests import it. Stdlib only: a ThreadingHTTPServer on a port the OS picks, served from a daemon thread,
keep-alive HTTP/1.1 (every response has a Content-Length or is chunked, as httpx expects), request bodies with a
Content-Length or chunked. A double subclasses HTTPDouble (start, stop, context manager) and DoubleHandler (read
the body, send JSON, text, an empty body or a chunked stream); the handler reaches its double as `self.double`.

    class MyDouble(HTTPDouble):
        def __init__(self) -> None:
            self.knob = 1                      # set the double's state first: the server starts in __init__
            super().__init__(MyHandler)
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


class DoubleServer(ThreadingHTTPServer):
    """A threading server that knows its double and the connections it holds open (to close them on stop)."""

    daemon_threads = True
    double: Any

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._connections_lock = threading.Lock()
        self._connections: set[socket.socket] = set()

    def track(self, connection: socket.socket, open_: bool) -> None:
        with self._connections_lock:
            (self._connections.add if open_ else self._connections.discard)(connection)

    def close_connections(self) -> None:
        """Shut down every open (keep-alive) connection, as a dead server's would be."""
        with self._connections_lock:
            connections, self._connections = list(self._connections), set()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up (a timeout test) is expected; anything else is reported as usual."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class DoubleHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every response has a length or is chunked
    timeout = 30  # idle keep-alive connections do not hold a thread forever

    @property
    def double(self) -> Any:
        return self.server.double  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr logging
        pass

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)  # type: ignore[attr-defined]

    def finish(self) -> None:
        self.server.track(self.connection, False)  # type: ignore[attr-defined]
        super().finish()

    # ---- requests -------------------------------------------------------------------------------
    def read_body(self) -> bytes:
        """The request body, with a Content-Length or chunked (trailers read and dropped)."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    @staticmethod
    def decode_json(raw: bytes) -> tuple[Any, bool]:
        """(decoded body or None when empty, whether it was not valid JSON)."""
        if not raw:
            return None, False
        try:
            return json.loads(raw), False
        except ValueError:
            return None, True

    # ---- responses ------------------------------------------------------------------------------
    def send_body(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status: int, obj: Any) -> None:
        self.send_body(status, "application/json; charset=utf-8", json.dumps(obj, ensure_ascii=False).encode("utf-8"))

    def send_text(self, status: int, text: str) -> None:
        self.send_body(status, "text/plain; charset=utf-8", text.encode("utf-8"))

    def send_empty(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def send_chunked(self, content_type: str, pieces: Iterable[bytes], headers: dict[str, str] | None = None) -> None:
        """A 200 with Transfer-Encoding: chunked, one chunk per piece, each flushed as it is written."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for piece in pieces:
            self.wfile.write(f"{len(piece):x}\r\n".encode("ascii") + piece + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")


class HTTPDouble:
    """Serves `handler` on http://HOST:<port the OS picks> from a daemon thread, from construction until stop().

    Attributes: lock (an RLock for the double's state), host, port, root ("http://HOST:PORT"), url (root + the
    class's `prefix`).
    """

    prefix = ""

    def __init__(self, handler: type[DoubleHandler], host: str = "127.0.0.1") -> None:
        self.lock = threading.RLock()
        self._server = DoubleServer((host, 0), handler)
        self._server.double = self
        self.host, self.port = self._server.server_address[:2]
        self.root = f"http://{self.host}:{self.port}"
        self.url = self.root + self.prefix
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=self._thread_name(), daemon=True)
        self._thread.start()
        self._stopped = False

    def _thread_name(self) -> str:
        return f"{type(self).__name__}-{self.port}"

    def stop(self) -> None:
        """Stop serving, close open keep-alive connections (as a dead server's would be) and free the port; safe to
        call twice."""
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._server.close_connections()
        self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
