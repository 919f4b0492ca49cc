"""xpcnn serve: the page, POST /predict against `xpcnn predict`, and every bad request as a 4xx JSON error."""

import http.client
import io
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import started_server
from PIL import Image, ImageDraw

from xpcnn.apps import serve as serve_module
from xpcnn.apps.cli import main
from xpcnn.apps.serve import MAX_BODY_BYTES, MAX_PIXELS, DigitReader, make_server
from xpcnn.backends.backend import get_backend
from xpcnn.base.errors import XpcnnError
from xpcnn.data.checkpoint import load_checkpoint

BODY_TIMEOUT = 1.0  # seconds: short, so the slow-client tests are quick
REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(synthetic_dir, tmp_path_factory):
    """A seed model trained for one quick epoch on the synthetic digits."""
    out = tmp_path_factory.mktemp("serve") / "run"
    result = CliRunner().invoke(
        main,
        ["train", "--model", "seed", "--epochs", "1", "--batch-size", "50", "--optimizer", "adam"]
        + ["--lr", "0.005", "--device", "cpu", "--data-dir", str(synthetic_dir), "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def server(run):
    """The server on a free port of 127.0.0.1, serving from a thread."""
    server = make_server(load_checkpoint(run), get_backend("numpy"), port=0, quiet=True, body_timeout=BODY_TIMEOUT)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def request(server, method, path, body=None, headers=None):
    """One request on a fresh connection: (status, headers, JSON or text body)."""
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    kind = response.getheader("Content-Type", "")
    return response.status, response, (json.loads(data) if kind == "application/json" else data.decode())


def raw_exchange(server, data: bytes, then=None) -> tuple[int, dict]:
    """Send raw bytes, optionally call then(sock), read the whole answer: (status, JSON body)."""
    with socket.create_connection(server.server_address[:2], timeout=10) as sock:
        sock.sendall(data)
        if then is not None:
            then(sock)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def drawn_one() -> Image.Image:
    """A white "1" on black, as the page's canvas draws it (RGBA, opaque)."""
    image = Image.new("RGBA", (280, 280), (0, 0, 0, 255))
    ImageDraw.Draw(image).line([(150, 50), (130, 230)], fill=(255, 255, 255, 255), width=22)
    return image


def blank_png(width: int, height: int) -> bytes:
    """A valid black 1-bit grey PNG of any size, built row by row: a few kB that inflate to width*height bits."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then black pixels
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def assert_error(status, body, expected_status, match):
    assert status == expected_status, body
    assert set(body) == {"error"} and match in body["error"], body


def test_the_page_is_served_and_fetches_nothing_from_outside(server):
    for path in ("/", "/index.html"):
        status, response, page = request(server, "GET", path)
        assert status == 200 and response.getheader("Content-Type") == "text/html; charset=utf-8"
        assert 'id="canvas"' in page and 'id="prediction"' in page and "touch-action: none" in page
        assert "://" not in page  # no CDN, no external fetch: the page works offline


def page_data(page: str) -> dict:
    """The JSON the page is given: its heading and the class names."""
    start = page.index('<script type="application/json" id="model">') + len(
        '<script type="application/json" id="model">'
    )
    return json.loads(page[start : page.index("</script>", start)])


def test_the_page_names_the_checkpoints_classes_as_data_never_markup(server, run, tmp_path):
    """A Fashion-MNIST run's page showed the bars 0-9 and "prediction: 2"; a class name is text, whatever it holds."""
    from xpcnn.data.checkpoint import save_checkpoint

    assert page_data(request(server, "GET", "/")[2]) == {
        "heading": "xpcnn: draw a digit",
        "classes": list("0123456789"),
    }
    checkpoint = load_checkpoint(run)
    names = ["</script><script>alert(1)</script>", "a & b", "<!--", *(f"class {i}" for i in range(3, 10))]
    meta = {**checkpoint.meta, "classes": names, "config": {**checkpoint.meta["config"], "dataset": "fashion-mnist"}}
    save_checkpoint(tmp_path / "named.npz", meta, checkpoint.model_state, checkpoint.optimizer_state)
    named = make_server(load_checkpoint(tmp_path / "named.npz"), get_backend("numpy"), port=0, quiet=True)
    thread = threading.Thread(target=named.serve_forever, daemon=True)
    thread.start()
    try:
        page = request(named, "GET", "/")[2]
        status, _, answer = request(named, "POST", "/predict", png_bytes(drawn_one()), {"Content-Type": "image/png"})
    finally:
        named.shutdown()
        named.server_close()
        thread.join()
    assert page.count("</script>") == 2 and "<!--" not in page and "alert(1)" in page  # escaped, still there
    assert page_data(page) == {"heading": "xpcnn: draw one of fashion-mnist's classes", "classes": names}
    assert status == 200 and answer["label"] == names[answer["class"]]
    arrays = {**meta, "config": {**meta["config"], "dataset": "arrays"}}  # xpcnn.fit on arrays: no dataset name
    save_checkpoint(tmp_path / "arrays.npz", arrays, checkpoint.model_state, checkpoint.optimizer_state)
    reader = DigitReader(load_checkpoint(tmp_path / "arrays.npz"), get_backend("numpy"))
    assert page_data(reader.page().decode())["heading"] == "xpcnn: draw one of the model's classes"


def test_predict_agrees_with_the_predict_command(server, run, tmp_path):
    path = tmp_path / "one.png"
    drawn_one().save(path)
    status, response, answer = request(server, "POST", "/predict", path.read_bytes(), {"Content-Type": "image/png"})
    assert status == 200 and response.getheader("Content-Type") == "application/json"
    assert set(answer) == {"class", "label", "probabilities"}
    probabilities = answer["probabilities"]
    assert isinstance(answer["class"], int) and len(probabilities) == 10
    assert sum(probabilities) == pytest.approx(1, abs=1e-5) and answer["class"] == int(np.argmax(probabilities))

    result = CliRunner().invoke(main, ["predict", str(run), str(path), "--top-k", "10", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.output)
    assert answer["class"] == row["class"] and answer["label"] == row["label"]
    assert probabilities == [p for _, p in sorted((t["class"], t["probability"]) for t in row["top"])]


def test_a_body_over_the_limit_is_refused_before_it_is_sent(server):
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    connection.putrequest("POST", "/predict")
    connection.putheader("Content-Type", "image/png")
    connection.putheader("Content-Length", str(MAX_BODY_BYTES + 1))
    connection.endheaders()  # and no body at all: the answer must not wait for it
    response = connection.getresponse()
    assert_error(response.status, json.loads(response.read()), 413, "over the limit")
    assert response.getheader("Connection") == "close"
    connection.close()


@pytest.mark.parametrize(
    "length_headers, expected_status, match",
    [
        ([], 411, "Content-Length is required"),
        (["Transfer-Encoding: chunked"], 411, "Content-Length is required"),
        (["Content-Length: abc"], 400, "invalid Content-Length"),
        (["Content-Length: -5"], 400, "invalid Content-Length"),
        (["Content-Length: 1e3"], 400, "invalid Content-Length"),
        (["Content-Length: \u00b2"], 400, "invalid Content-Length"),  # a digit to str.isdigit, not to int()
        (["Content-Length: 4", "Content-Length: 4"], 400, "invalid Content-Length"),
    ],
)
def test_missing_or_invalid_content_length(server, length_headers, expected_status, match):
    head = "\r\n".join(["POST /predict HTTP/1.1", "Host: localhost", "Content-Type: image/png", *length_headers])
    status, body = raw_exchange(server, (head + "\r\n\r\n").encode("latin-1") + b"abcd")
    assert_error(status, body, expected_status, match)


@pytest.mark.parametrize(
    "body, content_type, expected_status, match",
    [
        (b"", "image/png", 400, "the body is empty"),
        (b"GIF89a garbage \x00\xff" * 10, "image/png", 415, "not a PNG"),
        (b'{"image": [1, 2, 3]}', "application/json", 415, "got Content-Type application/json"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "image/png", 400, "cannot read as an image"),
        (png_bytes(drawn_one())[:300], None, 400, "cannot read as an image"),  # truncated; no Content-Type is fine
        (png_bytes(Image.new("RGBA", (280, 280), (0, 0, 0, 255))), "image/png", 400, "blank"),
    ],
    ids=["empty", "garbage", "json", "png-signature-then-junk", "truncated-png", "blank-canvas"],
)
def test_bodies_that_are_not_a_usable_png(server, body, content_type, expected_status, match):
    status, _, answer = request(
        server, "POST", "/predict", body, {"Content-Type": content_type} if content_type else {}
    )
    assert_error(status, answer, expected_status, match)


@pytest.mark.parametrize("side", [2049, 20_000])  # over MAX_PIXELS; over Pillow's own decompression-bomb limit
def test_a_decompression_bomb_is_refused_from_its_header(server, side):
    bomb = blank_png(side, side)
    assert len(bomb) < MAX_BODY_BYTES and side * side > MAX_PIXELS
    start = time.perf_counter()
    status, _, answer = request(server, "POST", "/predict", bomb, {"Content-Type": "image/png"})
    assert time.perf_counter() - start < 2  # 400 megapixels were not decoded
    assert_error(status, answer, 400, "the PNG: ")
    assert "over the limit" in answer["error"] or "decompression bomb" in answer["error"]


@pytest.mark.parametrize(
    "method, path, expected_status, allowed",
    [
        ("GET", "/predict", 405, "POST"),
        ("PUT", "/predict", 405, "POST"),
        ("DELETE", "/", 405, "GET"),
        ("POST", "/", 405, "GET"),
        ("OPTIONS", "/predict", 405, "POST"),
        ("GET", "/nothing-here", 404, None),
        ("PUT", "/nothing-here", 404, None),
        ("POST", "/predict/", 404, None),
        ("BREW", "/predict", 501, None),
    ],
)
def test_wrong_methods_and_unknown_paths(server, method, path, expected_status, allowed):
    status, response, answer = request(server, method, path, b"", {"Content-Length": "0"})
    assert status == expected_status and set(answer) == {"error"}, answer
    assert response.getheader("Allow") == allowed


def test_a_body_shorter_than_announced_is_refused(server):
    head = b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
    status, body = raw_exchange(server, head + b"\x89PNG", then=lambda sock: sock.shutdown(socket.SHUT_WR))
    assert_error(status, body, 400, "the body ended after 4 of 1,000 bytes")


@pytest.mark.parametrize("trickle", [False, True], ids=["silent", "trickling"])
def test_a_slow_client_is_cut_off_after_the_body_timeout(server, trickle):
    head = b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"

    def send_slowly(sock):  # a byte every 0.2 s, so every read succeeds, until the server answers
        for _ in range(int(8 * BODY_TIMEOUT / 0.2) if trickle else 0):
            if select.select([sock], [], [], 0.2)[0]:
                return
            sock.sendall(b"x")

    start = time.perf_counter()
    status, body = raw_exchange(server, head, then=send_slowly)
    assert status == 408 and "bytes arrived in 1 s" in body["error"], body
    assert time.perf_counter() - start < 3 * BODY_TIMEOUT  # a deadline for the whole body, not per read


def test_many_parallel_clients_get_their_own_answers(server):
    pictures = []
    for angle in range(0, 160, 20):  # eight strokes at different angles
        image = Image.new("L", (140, 140), 0)
        ImageDraw.Draw(image).line([(30, 70), (110, 70)], fill=255, width=12)
        pictures.append(png_bytes(image.rotate(angle)))
    expected = [request(server, "POST", "/predict", picture)[2] for picture in pictures]
    assert len({tuple(answer["probabilities"]) for answer in expected}) == 8  # so a mix-up would show

    def predict(index):
        return index % 8, request(server, "POST", "/predict", pictures[index % 8], {"Content-Type": "image/png"})

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(predict, range(128)))
    for index, (status, _, answer) in results:
        assert status == 200 and answer == expected[index]
    assert request(server, "GET", "/")[0] == 200


def test_keep_alive_connections_are_reused(server):
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    picture = png_bytes(drawn_one())
    for path in ("/predict", "/predict?stroke=2", "/predict"):  # like the page: one connection, a request per stroke
        connection.request("POST", path, body=picture, headers={"Content-Type": "image/png"})
        response = connection.getresponse()
        assert response.status == 200 and len(json.loads(response.read())["probabilities"]) == 10
    connection.close()


def test_a_port_in_use_is_one_line(server, run):
    port = server.server_address[1]
    result = CliRunner().invoke(main, ["serve", str(run), "--port", str(port), "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [f"Error: cannot listen on 127.0.0.1:{port}: Address already in use"]


@pytest.mark.parametrize("host", ["\u00fc..x", "a\x00b", "\udcff", "", " "])
def test_a_host_that_names_no_address_is_one_line(run, host):
    result = CliRunner().invoke(main, ["serve", str(run), "--host", host, "--port", "0", "--device", "cpu"])
    assert result.exit_code == 1, (result.output, result.exception)
    assert result.output.strip().splitlines() == [f"Error: cannot listen on {host!r}: not a host name or address"]


def test_serve_prints_its_address_and_stops_on_ctrl_c(run):
    process = started_server(run)
    try:
        line = process.stdout.readline()
        assert line.startswith("serving ") and "(Ctrl-C stops)" in line, line
        url = line.split(" at ")[1].split()[0]
        host, port = url.removeprefix("http://").rstrip("/").split(":")
        assert host == "127.0.0.1" and int(port) > 0
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        connection.request("GET", "/")
        assert connection.getresponse().status == 200
        connection.close()
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=10)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "stopped"
    assert '"GET / HTTP/1.1" 200' in stderr  # the access log


@pytest.mark.parametrize("attempt", range(4))
def test_a_stop_right_after_the_address_line_is_a_stop(run, attempt):
    """A supervisor that waits for the address and stops the server at once gets exit 0, as for any stop: the
    signal used to land while the line was written, before the server's stop was handled (exit 143)."""
    process = started_server(run, "--quiet")
    try:
        assert process.stdout.readline().startswith("serving ")
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0 and stderr.strip() == "stopped", stderr


def test_a_console_gone_loses_the_log_not_the_answers(run, tmp_path):
    """stdout closed (>&-) and stderr a pipe whose reader is gone (serve 2>&1 | head -1): the server still
    answers; the access log, written before each answer, is what is lost."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = f'exec "{sys.executable}" -m xpcnn serve "{run}" --port {port} --device cpu >&-'
    process = subprocess.Popen(
        ["bash", "-c", command],
        cwd=REPOSITORY,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
    )
    process.stderr.close()  # the log's reader is gone before the first request
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                connection.request("GET", "/")
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline and process.poll() is None, process.returncode
                time.sleep(0.1)
        for _ in range(2):  # the second after the first log line met the closed pipe
            assert connection.getresponse().read().startswith(b"<!doctype html>")
            connection.request("GET", "/")
        connection.close()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0


def whole_answer(server, data: bytes, then=None) -> bytes:
    """Send raw bytes, optionally call then(sock), and read until the server closes (hard 10 s timeout)."""
    with socket.create_connection(server.server_address[:2], timeout=10) as sock:
        sock.sendall(data)
        if then is not None:
            then(sock)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize(
    "line",
    [
        b"GET http://[bad/ HTTP/1.1",
        b"GET / HTTP/2.0",
        b"garbage",
        b"\x00\xff\xfe junk here",
        b"GET / HTTP/1.1 extra",
        b"GET / HTTX/1.1",
        b"GET / HTTP/1.1.1",
        b"POST http://[::1 HTTP/1.1",
    ],
)
def test_every_malformed_request_line_gets_a_4xx_with_a_status_line(server, line):
    answer = whole_answer(server, line + b"\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n")[0]
    assert status_line.startswith(b"HTTP/1.1 4"), answer
    assert b"Content-Type: application/json" in head and set(json.loads(body)) == {"error"}


def test_the_header_phase_has_a_deadline(server):
    def trickle_headers(sock):  # a header line every 0.2 s: each read succeeds, the headers never end
        for number in range(int(8 * BODY_TIMEOUT / 0.2)):
            if select.select([sock], [], [], 0.2)[0]:
                return
            sock.sendall(b"X-%d: y\r\n" % number)

    start = time.perf_counter()
    answer = whole_answer(server, b"GET / HTTP/1.1\r\nHost: localhost\r\n", then=trickle_headers)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert time.perf_counter() - start < 3 * BODY_TIMEOUT


def test_a_trickled_request_line_is_cut_off_too(server):
    def trickle(sock):
        for _ in range(int(8 * BODY_TIMEOUT / 0.2)):
            if select.select([sock], [], [], 0.2)[0]:
                return
            sock.sendall(b"G")

    start = time.perf_counter()
    whole_answer(server, b"", then=trickle)  # closed by the server, not by the client's patience
    assert time.perf_counter() - start < 3 * BODY_TIMEOUT


@pytest.mark.parametrize(
    "headers, status",
    [
        (b"Content-Length: 999999999\r\n", 413),
        (b"Transfer-Encoding: chunked\r\n", 411),
        (b"Content-Length: 10\r\nContent-Type: text/html\r\n", 415),
    ],
)
def test_no_100_continue_before_a_body_that_is_refused(server, headers, status):
    head = b"POST /predict HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n" + headers + b"\r\n"
    answer = whole_answer(server, head)
    assert answer.startswith(b"HTTP/1.1 %d" % status) and b"100 Continue" not in answer, answer


def test_100_continue_for_a_body_that_will_be_read(server):
    png = png_bytes(drawn_one())
    head = b"POST /predict HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\nConnection: close\r\n"
    head += b"Content-Length: %d\r\n\r\n" % len(png)

    def continue_then_send(sock):
        if sock.recv(1024).startswith(b"HTTP/1.1 100 Continue"):
            sock.sendall(png)

    answer = whole_answer(server, head, then=continue_then_send)
    assert answer.startswith(b"HTTP/1.1 200"), answer


@pytest.mark.parametrize(
    "host, expected_status",
    [
        ("localhost", 200),
        ("LOCALHOST:8000", 200),
        ("127.0.0.1:8000", 200),
        ("[::1]:8000", 200),
        ("app.localhost", 200),
        ("attacker.example:8000", 403),  # a page whose name now points at 127.0.0.1: DNS rebinding
        ("127.0.0.1.attacker.example", 403),
        ("[bad", 403),
    ],
)
def test_a_server_on_loopback_answers_only_requests_for_a_local_name(server, host, expected_status):
    status, _, answer = request(server, "GET", "/", headers={"Host": host})
    assert status == expected_status, answer
    if expected_status == 403:
        assert set(answer) == {"error"} and "not this server" in answer["error"]
    head = f"POST /predict HTTP/1.1\r\nHost: {host}\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n"
    if expected_status == 403:  # refused before 100 Continue, so no body is sent
        assert whole_answer(server, head.encode()).split(b"\r\n")[0] == b"HTTP/1.1 403 Forbidden"


@pytest.mark.parametrize(
    "host, expected_status",
    [
        ("ide.example:443", 200),
        ("IDE.Example.", 200),
        ("proxy.example", 200),
        ("8000-a1.proxy.example", 200),  # a leading dot: the domain and its subdomains
        ("localhost", 200),
        ("evilproxy.example", 403),
        ("ide.example.attacker.example", 403),
        ("other.example", 403),
    ],
)
def test_allow_host_adds_names_a_server_on_loopback_answers(run, host, expected_status):
    """Behind a proxy that forwards under its own name (a cloud IDE's port forwarding), --allow-host names it."""
    allowed = ("ide.example", ".proxy.example")
    server = make_server(load_checkpoint(run), get_backend("numpy"), port=0, quiet=True, allowed_hosts=allowed)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        status, _, answer = request(server, "GET", "/", headers={"Host": host})
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert status == expected_status, answer


@pytest.mark.parametrize("name", ["*", "", ".", "example.com:8000", "http://example.com", "a b"])
def test_allow_host_refuses_what_is_not_a_host_name_in_one_line(run, name):
    result = CliRunner().invoke(main, ["serve", str(run), "--allow-host", name, "--port", "0", "--device", "cpu"])
    assert result.exit_code == 1, (result.output, result.exception)
    assert result.output.strip().splitlines() == [
        f"Error: cannot allow host {name!r}: not a host name (such as example.com, or .example.com for it and "
        "its subdomains)"
    ]


def test_a_server_on_an_ipv4_mapped_loopback_address_is_on_loopback(run):
    try:
        server = make_server(load_checkpoint(run), get_backend("numpy"), host="::ffff:127.0.0.1", port=0, quiet=True)
    except XpcnnError as error:
        pytest.skip(f"no IPv6 here: {error}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        status, _, answer = request(server, "GET", "/", headers={"Host": "attacker.example"})
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert server.loopback and status == 403, answer


@pytest.mark.parametrize(
    "framing",
    ["Content-Length: {length}", "Transfer-Encoding: chunked"],
)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_body_sent_with_a_get_is_never_taken_for_the_next_request(server, method, framing):
    """The page is answered and the connection closed: the body, which is not read, would otherwise be parsed as
    a request of its own, one a proxy in front saw as data (request smuggling)."""
    hidden = b"GET /no-such-page HTTP/1.1\r\nHost: localhost\r\n\r\n"
    body = hidden if "Length" in framing else b"%x\r\n%s\r\n0\r\n\r\n" % (len(hidden), hidden)
    head = f"{method} / HTTP/1.1\r\nHost: localhost\r\n{framing.format(length=len(hidden))}\r\n\r\n"
    answer = whole_answer(server, head.encode() + body)
    assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1 ") == 1, answer
    assert b"\r\nConnection: close\r\n" in answer


def test_closing_the_server_waits_for_the_pictures_being_read(run, monkeypatch):
    """Otherwise the interpreter could end while a thread holds a backend's per-thread state, which aborts the
    process (seen on JAX and torch); a request that comes after on an open connection gets a 503."""
    server = make_server(load_checkpoint(run), get_backend("numpy"), port=0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    reading, read, answers = threading.Event(), threading.Event(), []
    predict = serve_module.predict_probabilities

    def slow_predict(*args):
        reading.set()
        time.sleep(0.5)
        read.set()
        return predict(*args)

    monkeypatch.setattr(serve_module, "predict_probabilities", slow_predict)
    picture = png_bytes(drawn_one())
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=10)

    def post():
        connection.request("POST", "/predict", body=picture, headers={"Content-Type": "image/png"})
        response = connection.getresponse()
        answers.append((response.status, json.loads(response.read())))

    client = threading.Thread(target=post)
    client.start()
    assert reading.wait(10)
    server.shutdown()
    server.server_close()
    assert read.is_set()  # the close waited for it
    client.join()
    post()  # the same connection, after the close
    connection.close()
    thread.join()
    assert [status for status, _ in answers] == [200, 503], answers
    assert answers[1][1] == {"error": "the server is stopping"}


def test_a_connection_cut_by_the_close_is_no_bug(run, capsys):
    """Requests in flight when serve stopped printed socketserver's traceback (Bad file descriptor)."""
    server = make_server(load_checkpoint(run), get_backend("numpy"), port=0, quiet=True)

    def fail_with(error):
        try:
            raise error
        except OSError:
            server.handle_error(None, ("127.0.0.1", 1))

    fail_with(OSError(9, "Bad file descriptor"))
    assert "Bad file descriptor" in capsys.readouterr().err  # before the close: a bug, with its traceback
    server.server_close()
    fail_with(OSError(9, "Bad file descriptor"))
    assert capsys.readouterr().err == ""


def test_more_than_one_host_header_is_a_bad_request(server):
    status, body = raw_exchange(server, b"GET / HTTP/1.1\r\nHost: localhost\r\nHost: attacker.example\r\n\r\n")
    assert_error(status, body, 400, "more than one Host")
