"""``xpcnn serve``: a local web page to draw digits on, and ``POST /predict`` behind it.

The page (``static/index.html``, given the checkpoint's class names) sends the
canvas as a PNG; ``/predict`` prepares it exactly as ``xpcnn predict`` prepares
a picture file (:func:`images.decode_picture`) and answers ``{"class": int,
"label": str, "probabilities": [K floats]}``.  Every error is a JSON
``{"error": "..."}`` with a 4xx status (a 500 only for a bug in xpcnn, a 503 once the
server is stopping).  The standard library's threading HTTP server is enough for one
person's browser and a few scripts.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import re
import socket
import sys
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import urlsplit

import numpy as np

from ..backends.backend import Backend
from ..base.errors import NonFiniteOutputs, XpcnnError
from ..data.checkpoint import Checkpoint
from ..data.device_data import normalize_images
from ..data.images import MAX_PIXELS, ImageError, decode_picture
from ..training.fitting import ARRAYS
from ..training.runs import checkpoint_config, model_from_checkpoint, picture_framing
from ..training.train import predict_probabilities

MAX_BODY_BYTES = 1024 * 1024  # a 280x280 canvas is a few kB; anything over 1 MiB is refused before it is read
BODY_TIMEOUT_S = 10.0  # default limit for a whole body to arrive, and for a connection to idle
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALLOWED_HOST = re.compile(r"\.?[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")  # a name; a leading dot: its subdomains too
ROUTES = {"/": "GET", "/index.html": "GET", "/predict": "POST"}  # path -> its one method (and HEAD for GET)


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a one-line reason for the JSON body."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class DigitReader:
    """A checkpoint's model on a thread of its own: PNG bytes in, class probabilities out."""

    def __init__(self, checkpoint: Checkpoint, backend: Backend):
        self.backend = backend
        self.model, self.norm = model_from_checkpoint(checkpoint, backend)
        self.framing = picture_framing(checkpoint)
        self.classes = [str(name) for name in checkpoint.meta["classes"]]
        self.dataset = checkpoint_config(checkpoint).dataset
        # One picture at a time, on one thread of its own: the layers keep per-call state (their mode, what
        # forward saves); it bounds memory to one decoded picture however many clients post at once; and the
        # backends' per-thread state (CuPy's current device, JAX's and torch's) lives on that thread alone, which
        # close() joins: a request's thread ending with such state while the interpreter ends aborts the process.
        # A 280x280 drawing takes a few milliseconds.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xpcnn-serve-model")

    def read(self, png: bytes) -> dict:
        """PNG bytes -> {"class": int, "label": its name, "probabilities": [K floats]}; RequestError for pictures
        it cannot use, and once :meth:`close` has begun."""
        if not png.startswith(PNG_SIGNATURE):
            raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "the body is not a PNG image")
        try:
            reading = self._worker.submit(self._read, png)
        except RuntimeError:  # after close()
            raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "the server is stopping") from None
        try:
            return reading.result()
        except CancelledError:  # waiting when close() came
            raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "the server is stopping") from None

    def close(self) -> None:
        """Finish the picture being read, refuse the others, and end the model's thread."""
        self._worker.shutdown(wait=True, cancel_futures=True)

    def _read(self, png: bytes) -> dict:
        """:meth:`read`'s work, on the model's thread."""
        with self.backend.activate():
            try:
                image = decode_picture(png, "the PNG", formats=("PNG",), max_pixels=MAX_PIXELS, framing=self.framing)
            except ImageError as exc:
                raise RequestError(HTTPStatus.BAD_REQUEST, str(exc)) from None
            batch = normalize_images(self.backend, image[None, None], self.norm)
            try:
                probabilities = predict_probabilities(self.model, batch)[0]
            except NonFiniteOutputs as exc:  # the model's fault, not the picture's
                raise RequestError(HTTPStatus.INTERNAL_SERVER_ERROR, str(exc)) from None
        top = int(np.argmax(probabilities))
        return {"class": top, "label": self.classes[top], "probabilities": [float(p) for p in probabilities]}

    def page(self) -> bytes:
        """The drawing page, given the checkpoint's class names and a heading as JSON in a data block."""
        digits = self.classes == [str(digit) for digit in range(10)]
        owner = "the model's" if self.dataset == ARRAYS else f"{self.dataset}'s"  # fit on arrays: no dataset name
        heading = "xpcnn: draw a digit" if digits else f"xpcnn: draw one of {owner} classes"
        data = json.dumps({"heading": heading, "classes": self.classes})
        for character in "<>&":  # JSON escapes, so no class name can end the script block: it stays data
            data = data.replace(character, f"\\u{ord(character):04x}")
        template = resources.files("xpcnn.apps").joinpath("static/index.html").read_text(encoding="utf-8")
        return template.replace("__MODEL__", data).encode()


class DeadlineReader(io.RawIOBase):
    """A socket's input that raises TimeoutError once ``deadline`` (``time.monotonic()`` seconds) has passed.

    A socket timeout alone bounds each wait, so a client that sends a byte now and then would keep a thread
    forever; the deadline bounds a whole phase of a request (its request line and headers, or its body).
    """

    def __init__(self, connection: socket.socket, timeout: float):
        self.connection, self.timeout = connection, timeout
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.timeout if self.deadline is None else self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the deadline passed")
        self.connection.settimeout(left)
        try:
            return self.connection.recv_into(buffer)
        finally:
            self.connection.settimeout(self.timeout)  # answers are written with the plain timeout


class Handler(BaseHTTPRequestHandler):
    """GET / (the page), POST /predict; JSON errors for everything else, each with a status line.

    Each request's line and headers must arrive within the server's ``body_timeout`` of the request's
    start (idle time on a kept-alive connection included), and its body within as long again.
    """

    server_version = "xpcnn"
    protocol_version = "HTTP/1.1"  # keep-alive, so the page's requests reuse one connection
    default_request_version = "HTTP/1.0"  # never answer without a status line (HTTP/0.9), even a garbled request
    server: DigitServer

    def setup(self):
        self.timeout = self.server.body_timeout  # the socket's timeout: a client that goes quiet frees its thread
        super().setup()
        self.reader = DeadlineReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self):
        self.reader.deadline = time.monotonic() + self.timeout  # for the request line and the headers
        super().handle_one_request()

    def parse_request(self) -> bool:
        try:
            return super().parse_request() and self._host_allowed()
        except TimeoutError:
            self._send_json_error(
                HTTPStatus.REQUEST_TIMEOUT, f"the request's headers did not arrive within {self.timeout:g} s"
            )
            return False

    def _host_allowed(self) -> bool:
        """Whether the request names this server in its Host header; else answer 400 (more than one) or 403.

        A server on a loopback address answers only requests for an IP address, ``localhost``, the name it
        was given and the ``allowed_hosts`` (a leading dot: that domain and its subdomains): a web page whose own
        name an attacker points at 127.0.0.1 (DNS rebinding) is refused.  A server on another address
        (``--host 0.0.0.0``) was opened to the network, under any name.
        """
        hosts = self.headers.get_all("Host") or []
        if len(hosts) > 1:
            self._send_json_error(HTTPStatus.BAD_REQUEST, "more than one Host header")
            return False
        if not hosts or not self.server.loopback:
            return True
        try:
            name = (urlsplit(f"//{hosts[0]}").hostname or "").rstrip(".")
        except ValueError:
            name = None
        if name is not None and (_ip_address(name) or self.server.answers_to(name.lower())):
            return True
        self._send_json_error(
            HTTPStatus.FORBIDDEN,
            f"Host {hosts[0][:200]!r} is not this server: ask for localhost or its address (or start it with "
            "--allow-host NAME)",
        )
        return False

    def handle_expect_100(self) -> bool:
        """Send ``100 Continue`` only for a body that will be read: a POST to /predict whose headers pass."""
        if not self._host_allowed():
            return False
        if self.command != "POST" or self._path() != "/predict":
            return True  # the final answer (404, 405) comes instead
        try:
            self._declared_length()
        except RequestError as exc:
            self._send_json_error(exc.status, str(exc))
            return False
        return super().handle_expect_100()

    def do_GET(self):
        if self._route_allows("GET"):
            # A body a GET or HEAD came with is not read: left on the connection, it would be taken for the next
            # request (one a proxy in front never saw).
            framed = "Transfer-Encoding" in self.headers or any(
                length.strip() != "0" for length in self.headers.get_all("Content-Length", [])
            )
            self.close_connection = self.close_connection or framed
            headers = {"Connection": "close"} if framed else {}
            self._send(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8", headers)

    def do_POST(self):
        if not self._route_allows("POST"):
            return
        try:
            answer = self.server.reader.read(self._read_body())
        except RequestError as exc:
            self._send_json_error(exc.status, str(exc))
            return
        except Exception:  # a bug: the client gets a 500, the console the traceback, the server goes on
            traceback.print_exc()
            self._send_json_error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error in xpcnn (see the server's log)")
            return
        self._send(HTTPStatus.OK, json.dumps(answer).encode(), "application/json")

    def do_OTHER(self):
        self._route_allows(None)

    do_HEAD = do_GET
    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_OTHER

    def _path(self) -> str | None:
        """The path of the request's target, None where it is not a URL (``http://[bad/``)."""
        try:
            return urlsplit(self.path).path
        except ValueError:
            return None

    def _route_allows(self, method: str | None) -> bool:
        """True if the path takes this method; else answer 400 (not a URL), 404 (no such path) or 405 (another
        method) and False."""
        path = self._path()
        if path is None:
            self._send_json_error(HTTPStatus.BAD_REQUEST, f"not a valid request target: {self.path[:200]!r}")
            return False
        allowed = ROUTES.get(path)
        if allowed is None:
            self._send_json_error(HTTPStatus.NOT_FOUND, f"no such page: {path}")
        elif method != allowed:
            self._send_json_error(
                HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not allowed on {path}", {"Allow": allowed}
            )
        return allowed is not None and method == allowed

    def _read_body(self) -> bytes:
        """The request body, checked before it is read (:meth:`_declared_length`).

        The whole body must arrive within the server's ``body_timeout``, so a client that sends less than it
        announced (or trickles it) cannot hold a thread.
        """
        length = self._declared_length()
        self.reader.deadline = time.monotonic() + self.timeout
        chunks, received = [], 0
        try:
            while received < length:
                chunk = self.rfile.read1(length - received)
                if not chunk:
                    break
                chunks.append(chunk)
                received += len(chunk)
        except TimeoutError:
            raise RequestError(
                HTTPStatus.REQUEST_TIMEOUT, f"only {received:,} of {length:,} bytes arrived in {self.timeout:g} s"
            ) from None
        if received < length:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"the body ended after {received:,} of {length:,} bytes")
        return b"".join(chunks)

    def _declared_length(self) -> int:
        """The body's length, from headers checked first: a Content-Length within MAX_BODY_BYTES, an image type."""
        if "Transfer-Encoding" in self.headers or "Content-Length" not in self.headers:
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
        declared = self.headers.get_all("Content-Length")
        if len(declared) != 1 or not (declared[0].strip().isascii() and declared[0].strip().isdigit()):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"invalid Content-Length: {', '.join(declared)!r}")
        length = int(declared[0])
        if length > MAX_BODY_BYTES:
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the body is {length:,} bytes, over the limit of {MAX_BODY_BYTES:,}",
            )
        kind = self.headers.get_content_type() if "Content-Type" in self.headers else None
        if kind is not None and not (kind.startswith("image/") or kind == "application/octet-stream"):
            raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"expected a PNG image, got Content-Type {kind}")
        if length == 0:
            raise RequestError(HTTPStatus.BAD_REQUEST, "the body is empty: expected a PNG image")
        return length

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a bad request line, an unknown method...) as JSON too, with a status line:
        a malformed request gets a 4xx (an HTTP/2 request line 400: HTTP/2 has none), an unknown method 501."""
        status = HTTPStatus(code)
        if status == HTTPStatus.HTTP_VERSION_NOT_SUPPORTED:
            status, message = HTTPStatus.BAD_REQUEST, f"{message}: xpcnn serves HTTP/1.1"
        self._send_json_error(status, message or status.phrase)

    def _send_json_error(self, status: HTTPStatus, message: str, headers: dict | None = None):
        # An error may leave an unread body on the connection, which would be taken for the next request.
        self.close_connection = True
        body = json.dumps({"error": message}).encode()
        self._send(status, body, "application/json", {"Connection": "close", **(headers or {})})

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        if not self.server.quiet:
            # The log is written before the answer: a console gone (stderr closed, its pipe's reader gone, a
            # full disk) loses the log, never the answer.
            with contextlib.suppress(OSError, ValueError, AttributeError):
                super().log_message(format, *args)


class DigitServer(ThreadingHTTPServer):
    """A thread per connection (daemon threads: Ctrl-C does not wait for idle keep-alive clients)."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog; socketserver's 5 makes a burst of clients see resets

    def __init__(
        self,
        address: tuple[str, int],
        reader: DigitReader,
        quiet: bool,
        body_timeout: float,
        allowed_hosts: Sequence[str] = (),
    ):
        if ":" in address[0]:  # an IPv6 address such as ::1
            self.address_family = socket.AF_INET6
        self.reader = reader
        self.body_timeout = body_timeout
        self.page = reader.page()
        self.quiet = quiet
        self.closing = False  # once True, a connection's socket errors are the close's, not bugs
        # "": a request that names no host; then the address as given (a name, or an address).
        names = ["", address[0], "localhost", ".localhost", *allowed_hosts]
        self.host_names = {name.lower().rstrip(".") for name in names}
        super().__init__(address, Handler)
        bound = _ip_address(self.server_address[0])
        bound = getattr(bound, "ipv4_mapped", None) or bound  # ::ffff:127.0.0.1 is loopback too
        self.loopback = bound is not None and bound.is_loopback

    def answers_to(self, name: str) -> bool:
        """Whether ``name`` (lower case, no trailing dot; "" where a request named none) is one of this server's
        names, or lies under a domain given with a leading dot (``.localhost``: every ``*.localhost``)."""
        return name in self.host_names or any(
            allowed.startswith(".") and (name.endswith(allowed) or name == allowed[1:]) for allowed in self.host_names
        )

    @property
    def url(self) -> str:
        """The page's address, e.g. http://127.0.0.1:8000/ (IPv6 hosts in brackets)."""
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def server_close(self):
        self.closing = True
        super().server_close()
        self.reader.close()

    def handle_error(self, request, client_address):
        """A client that hangs up mid-answer is normal, as is a connection's socket error once the server closes;
        anything else is a bug worth its traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError) or (self.closing and isinstance(error, OSError)):
            return
        super().handle_error(request, client_address)


def _ip_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``text`` as an IP address (an IPv6 one with or without its zone), None where it is a name."""
    try:
        return ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None


def _host_name(host: str) -> bool:
    """Whether the socket module can encode ``host`` (no NUL; a non-ASCII name through IDNA) and it names one:
    an empty one (``--host "$UNSET"``) would listen on every interface, which only 0.0.0.0 asks for."""
    if "\0" in host or not host.strip():
        return False
    try:
        host.encode("ascii" if host.isascii() else "idna")
    except UnicodeError:
        return False
    return True


def make_server(
    checkpoint: Checkpoint,
    backend: Backend,
    host: str = "127.0.0.1",
    port: int = 8000,
    quiet: bool = False,
    body_timeout: float = BODY_TIMEOUT_S,
    allowed_hosts: Sequence[str] = (),
) -> DigitServer:
    """A server bound to host:port (port 0: a free one, see ``server.url``), not yet serving.

    ``quiet`` turns off the access log; ``body_timeout`` (seconds) is how long a request's body may take to
    arrive, and how long a connection may idle between requests.  On a loopback address the server answers
    requests for IP addresses, localhost, ``host`` and the ``allowed_hosts`` only (a name with a leading dot
    allows that domain and its subdomains), as a guard against DNS rebinding.

    XpcnnError (one line) where the address cannot be bound, e.g. a port already in use.
    """
    if not _host_name(host):  # the socket would raise TypeError, not the OSError of an address it cannot bind
        raise XpcnnError(f"cannot listen on {host!r}: not a host name or address")
    for name in allowed_hosts:
        if not ALLOWED_HOST.fullmatch(name):
            raise XpcnnError(
                f"cannot allow host {name!r}: not a host name (such as example.com, or .example.com for it and "
                "its subdomains)"
            )
    reader = DigitReader(checkpoint, backend)
    try:
        return DigitServer((host, port), reader, quiet, body_timeout, allowed_hosts)
    except OSError as exc:
        raise XpcnnError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
