"""Real receivers on 127.0.0.1 for the alert tests: an SMTP server (aiosmtpd) and an HTTP
server (http.server) that answers 200, answers 500, or accepts and never answers. Nothing
here talks to any other address.
"""

from __future__ import annotations

import email
import email.policy
import json
import socket
import threading
import time
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LOOPBACK = "127.0.0.1"


def refuse_non_loopback(monkeypatch) -> None:
    """Make any connection to an address other than loopback fail the test at once."""
    real_connect = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"test tried to connect to {host!r}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (at the moment of asking)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float = 10.0, step: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


# -- SMTP -------------------------------------------------------------------------------------

class SmtpReceiver:
    """aiosmtpd on 127.0.0.1:<free port>; `messages` are the parsed mails it accepted."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        self.envelopes: list[Any] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd API
                with receiver.lock:
                    receiver.envelopes.append(envelope)
                return "250 Message accepted for delivery"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname=LOOPBACK, port=self.port)

    def __enter__(self) -> SmtpReceiver:
        self.controller.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.controller.stop()

    def url(self, to: str = "ops@example.com", sender: str = "sensor@example.com",
            extra: str = "") -> str:
        # mailto:// (not mailtos://) with no user: plain SMTP, no STARTTLS, no AUTH.
        return f"mailto://{LOOPBACK}:{self.port}?from={sender}&to={to}{extra}"

    @property
    def messages(self) -> list[EmailMessage]:
        with self.lock:
            envelopes = list(self.envelopes)
        return [email.message_from_bytes(e.content, policy=email.policy.default)
                for e in envelopes]

    @property
    def raw(self) -> list[bytes]:
        with self.lock:
            return [bytes(e.content) for e in self.envelopes]

    @staticmethod
    def text_of(message: EmailMessage) -> str:
        part = message.get_body(preferencelist=("plain",))
        return part.get_content() if part is not None else ""


# -- HTTP -------------------------------------------------------------------------------------

class HttpReceiver:
    """http.server on 127.0.0.1:<free port>.

    mode "ok" answers 200, "error" answers 500, "reject" answers 400, "hang" reads the
    request and never answers (until the receiver is stopped). With fail_first=N the first N
    requests get a 503 whatever the mode.
    """

    def __init__(self, mode: str = "ok", fail_first: int = 0) -> None:
        self.mode = mode
        self.fail_first = fail_first
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server API
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                with receiver.lock:
                    receiver.requests.append({"path": self.path, "headers": dict(self.headers),
                                              "raw": raw, "at": time.monotonic()})
                    number = len(receiver.requests)
                if number <= receiver.fail_first:
                    status = 503
                elif receiver.mode == "hang":
                    receiver.stop_event.wait(60)
                    return
                else:
                    status = {"error": 500, "reject": 400}.get(receiver.mode, 200)
                body = b"ok" if status == 200 else b"boom"
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)

    def __enter__(self) -> HttpReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_event.set()
        self.server.shutdown()
        self.server.server_close()

    def url(self, path: str = "/hook") -> str:
        return f"json://{LOOPBACK}:{self.port}{path}"

    @property
    def payloads(self) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(r["raw"]) for r in self.requests]

    @property
    def raw(self) -> list[bytes]:
        with self.lock:
            return [r["raw"] for r in self.requests]
