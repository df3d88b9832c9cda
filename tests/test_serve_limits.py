"""`miniresnet serve` under what a public server meets: large images at once, slow clients, too
many connections, uploads over the cap in every common client, floods, malformed multipart, and
fuzzed uploads. Real server processes listen on 127.0.0.1 only; every wait is bounded."""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server is an optional extra: pip install 'miniresnet[serve]'")

import httpx
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from miniresnet.serve import ServeConfig, create_app
from test_serve import png_bytes, post, server_process

LINUX_PROC = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads a process's memory in /proc")
FIFTY_MB = 50 * 1024 * 1024  # over the default 32 MB cap, under the 4x the server reads and discards


@pytest.fixture(scope="module")
def default_server(model_file) -> Iterator[str]:
    """A server with the default limits."""
    with server_process(str(model_file)) as (url, _, _):
        yield url


@pytest.fixture(scope="module")
def strict_server(model_file) -> Iterator[str]:
    """A server that waits 2 s for an upload and takes 25 connections."""
    with server_process(str(model_file), "--body-timeout-s", "2", "--max-connections", "25") as (url, _, _):
        yield url


def memory_kb(pid: int, field: str) -> int:
    """A line of /proc/PID/status in kB: VmRSS (resident now) or VmHWM (the peak so far)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def large_rgba_png() -> bytes:
    """A 6300x6300 RGBA PNG with stripes: about 170 KB to send, 159 MB once decoded."""
    image = Image.new("RGBA", (6300, 6300), (40, 120, 200, 180))
    draw = ImageDraw.Draw(image)
    for x in range(0, 6300, 700):
        draw.rectangle([x, x, x + 300, 6299], fill=(220, 30, 30, 255))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def healthz_seconds(url: str) -> float:
    """How long /healthz took to answer 200."""
    started = time.monotonic()
    with urllib.request.urlopen(url + "/healthz", timeout=10) as response:
        assert response.status == 200
    return time.monotonic() - started


@LINUX_PROC
def test_six_large_images_at_once_stay_under_1_5_gb_and_healthz_answers_throughout(model_file):
    body = large_rgba_png()
    assert len(body) < 250_000
    with server_process(str(model_file), "--decode-workers", "2") as (url, process, _):
        idle_before = memory_kb(process.pid, "VmRSS")
        answers: list[tuple[int, dict]] = []
        senders = [threading.Thread(target=lambda: answers.append(post(url + "/predict", body))) for _ in range(6)]
        for sender in senders:
            sender.start()
        health, deadline = [], time.monotonic() + 60
        while any(s.is_alive() for s in senders) and time.monotonic() < deadline:
            health.append(healthz_seconds(url))
            time.sleep(0.1)
        for sender in senders:
            sender.join(timeout=30)
        peak_mb = memory_kb(process.pid, "VmHWM") / 1024
        idle_after = memory_kb(process.pid, "VmRSS")
    assert [status for status, _ in answers] == [200] * 6
    assert len({answer["top_k"][0]["class"] for _, answer in answers}) == 1
    assert peak_mb < 1500, f"peak RSS {peak_mb:.0f} MB"
    assert len(health) >= 3 and max(health) < 3, health
    assert idle_after < idle_before + 200 * 1024, f"idle RSS {idle_before} kB before, {idle_after} kB after"


def read_until_closed(connection: socket.socket, deadline: float) -> tuple[bytes, bool]:
    """What the server sent on a connection, and whether it closed the connection by the deadline."""
    data = b""
    while time.monotonic() < deadline:
        connection.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            piece = connection.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return data, True
        if not piece:
            return data, True
        data += piece
    return data, False


def http_answer(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """The status, headers (lower-case names) and body of one HTTP/1.1 answer."""
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def test_slow_clients_get_408_and_their_connections_close_while_healthz_answers(strict_server):
    port = int(strict_server.rsplit(":", 1)[1])
    request = (
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n\x89PNG"
    )
    connections = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
    try:
        for connection in connections:
            connection.sendall(request)  # the headers and 4 of the 100,000 bytes promised
        started = time.monotonic()
        health = []
        while time.monotonic() - started < 2.5:  # past the body timeout
            health.append(healthz_seconds(strict_server))
            time.sleep(0.2)
        answers = [read_until_closed(connection, started + 10) for connection in connections]
        waited = time.monotonic() - started
    finally:
        for connection in connections:
            connection.close()
    assert max(health) < 2, health
    assert all(closed for _, closed in answers), f"{sum(not c for _, c in answers)} connections still open"
    assert waited < 10
    for data, _ in answers:
        status, headers, body = http_answer(data)
        assert status == 408 and headers["connection"] == "close" and headers["content-type"] == "application/json"
        assert json.loads(body) == {"error": "the upload did not arrive whole within 2 s"}


def test_connections_over_the_limit_get_503_and_the_server_recovers(strict_server):
    port = int(strict_server.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(25)]
    try:
        time.sleep(0.3)  # the server has accepted them
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(strict_server + "/healthz", timeout=5)
        assert refused.value.code == 503
    finally:
        for connection in idle:
            connection.close()
    deadline = time.monotonic() + 5
    while True:  # the server notices the closed connections
        try:
            assert healthz_seconds(strict_server) < 2
            break
        except urllib.error.HTTPError:
            assert time.monotonic() < deadline, "the server still refuses connections"
            time.sleep(0.1)


def send_with_urllib(url: str, body: bytes, tmp_path: Path) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "image/png"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def send_with_requests(url: str, body: bytes, tmp_path: Path) -> tuple[int, str]:
    requests = pytest.importorskip("requests")
    response = requests.post(url, data=body, headers={"Content-Type": "image/png"}, timeout=30)
    return response.status_code, response.text


def send_multipart_with_requests(url: str, body: bytes, tmp_path: Path) -> tuple[int, str]:
    requests = pytest.importorskip("requests")
    response = requests.post(url, files={"file": ("big.png", body, "image/png")}, timeout=30)
    return response.status_code, response.text


def send_with_httpx(url: str, body: bytes, tmp_path: Path) -> tuple[int, str]:
    response = httpx.post(url, content=body, headers={"Content-Type": "image/png"}, timeout=30)
    return response.status_code, response.text


def send_multipart_with_httpx(url: str, body: bytes, tmp_path: Path) -> tuple[int, str]:
    response = httpx.post(url, files={"file": ("big.png", body, "image/png")}, timeout=30)
    return response.status_code, response.text


def send_with_curl(url: str, body: bytes, tmp_path: Path, multipart: bool = False) -> tuple[int, str]:
    if shutil.which("curl") is None:
        pytest.skip("no curl on this machine")
    path = tmp_path / "big.png"
    path.write_bytes(body)
    data = ["-F", f"file=@{path};type=image/png"] if multipart else ["-H", "Content-Type: image/png", "--data-binary"]
    command = ["curl", "-sS", "--max-time", "30", "-o", "-", "-w", "\n%{http_code}", *data]
    out = subprocess.run(command + ([] if multipart else [f"@{path}"]) + [url], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text, _, status = out.stdout.rpartition("\n")
    return int(status), text


def send_multipart_with_curl(url: str, body: bytes, tmp_path: Path) -> tuple[int, str]:
    return send_with_curl(url, body, tmp_path, multipart=True)


CLIENTS = [
    send_with_urllib,
    send_with_requests,
    send_multipart_with_requests,
    send_with_httpx,
    send_multipart_with_httpx,
    send_with_curl,
    send_multipart_with_curl,
]


@pytest.mark.parametrize("send", CLIENTS, ids=[c.__name__.removeprefix("send_") for c in CLIENTS])
def test_a_50_mb_upload_gets_its_413_in_every_client_and_the_server_carries_on(default_server, tmp_path, send):
    status, text = send(default_server + "/predict", b"\0" * FIFTY_MB, tmp_path)
    assert status == 413 and json.loads(text) == {"error": "the upload is over the limit of 33,554,432 bytes"}
    assert post(default_server + "/predict", png_bytes())[0] == 200


def chunks(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    """The body in pieces: the client sends it chunked, with no Content-Length to refuse it by."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


def multipart(*parts: tuple[str, bytes], boundary: str = "b0undary", closed: bool = True) -> bytes:
    """A multipart/form-data body of (field name, bytes) parts."""
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="x.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data in parts
    )
    return body + (f"--{boundary}--\r\n".encode() if closed else b"")


def test_uploads_over_the_cap_are_refused_as_they_stream_before_any_multipart_parsing(model_file, monkeypatch):
    import miniresnet.serve as serve

    def never(*args):
        raise AssertionError("a body over the cap reached the multipart parser")

    monkeypatch.setattr(serve, "multipart_file", never)
    over = b"\0" * (1024 * 1024 + 1)
    multipart_type = {"content-type": MULTIPART}
    with TestClient(create_app(ServeConfig(model=str(model_file), max_upload_bytes=1024 * 1024))) as client:
        answers = [
            client.post("/predict", content=chunks(over), headers={"content-type": "image/png"}),
            client.post("/predict", content=chunks(multipart(("file", over + over))), headers=multipart_type),
            client.post("/predict", files={"file": ("big.png", over + over, "image/png")}),
        ]
    for answer in answers:
        assert answer.status_code == 413
        assert answer.json() == {"error": "the upload is over the limit of 1,048,576 bytes"}


MULTIPART = "multipart/form-data; boundary=b0undary"
MULTIPARTS = [
    ("no boundary", "multipart/form-data", multipart(("file", b"x")), "its content type names no boundary"),
    ("no file field", MULTIPART, multipart(("image", png_bytes())), "a file field named 'file'"),
    ("not closed", MULTIPART, multipart(("file", png_bytes()), closed=False), "ends before its closing boundary"),
    ("nine parts", MULTIPART, multipart(*[("note", b"x")] * 8, ("file", png_bytes())), "more than 8 parts"),
    ("not multipart", MULTIPART, b"just some bytes", "unreadable multipart body: Expected boundary"),
]


@pytest.mark.parametrize("name, content_type, body, message", MULTIPARTS, ids=[m[0] for m in MULTIPARTS])
def test_malformed_multipart_is_a_400_and_a_good_one_with_other_fields_is_read(
    model_file, name, content_type, body, message
):
    with TestClient(create_app(ServeConfig(model=str(model_file)))) as client:
        answer = client.post("/predict", content=body, headers={"content-type": content_type})
        good_body = multipart(("note", b"hi"), ("file", png_bytes()))
        good = client.post("/predict", content=good_body, headers={"content-type": MULTIPART})
    assert answer.status_code == 400 and message in answer.json()["error"], answer.json()
    assert good.status_code == 200


def test_a_flood_is_refused_503_while_admitted_uploads_wait_for_the_decode_thread(model_file, monkeypatch):
    """max_queue counts a request from before its body is read: the ones waiting to decode too."""
    import miniresnet.serve as serve

    load_image = serve.load_image

    def slow_load_image(*args):
        time.sleep(1.0)
        return load_image(*args)

    monkeypatch.setattr(serve, "load_image", slow_load_image)
    answers = []
    with TestClient(create_app(ServeConfig(model=str(model_file), max_queue=2, decode_workers=1))) as client:

        def send() -> None:
            answer = client.post("/predict", content=png_bytes(), headers={"content-type": "image/png"})
            answers.append((answer.status_code, answer.json(), answer.headers.get("retry-after")))

        senders = [threading.Thread(target=send) for _ in range(6)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(timeout=20)
        metrics = client.get("/metrics").text
    assert sorted(status for status, _, _ in answers) == [200, 200, 503, 503, 503, 503]
    busy = "the server is busy (2 requests in progress); retry shortly"
    assert all(answer == {"error": busy} and retry == "1" for status, answer, retry in answers if status == 503)
    assert 'miniresnet_requests_total{endpoint="/predict",status="503"} 4.0' in metrics
    assert "miniresnet_predict_in_progress 0.0" in metrics


def sample_images() -> list[bytes]:
    """A small picture in each format the fuzzer starts from, made by Pillow."""
    picture = Image.linear_gradient("L").resize((24, 16)).convert("RGB")
    ImageDraw.Draw(picture).rectangle([4, 4, 12, 10], fill=(200, 30, 30))
    samples = []
    for format, mode in [("PNG", "RGBA"), ("JPEG", "RGB"), ("GIF", "P"), ("BMP", "RGB"), ("WEBP", "RGB")]:
        buffer = io.BytesIO()
        picture.convert(mode).save(buffer, format)
        samples.append(buffer.getvalue())
    return samples


SAMPLES = sample_images()
PRINTABLE = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30)
CONTENT_TYPES = PRINTABLE | st.sampled_from(
    [
        "image/png",
        "image/jpeg",
        "image/gif",
        "image/bmp",
        "image/webp",
        "IMAGE/PNG; charset=binary",
        "image/",
        "application/octet-stream",
        "",
        "text/plain",
        "application/json",
        "multipart/form-data",
        "multipart/form-data; boundary=b0undary",
    ]
)


@st.composite
def fuzzed_bytes(draw) -> bytes:
    """Random bytes, or one of the sample images truncated or with some bytes changed."""
    kind = draw(st.sampled_from(["random", "truncated", "mutated"]))
    if kind == "random":
        return draw(st.binary(max_size=4096))
    data = bytearray(draw(st.sampled_from(SAMPLES)))
    if kind == "truncated":
        return bytes(data[: draw(st.integers(0, len(data)))])
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@st.composite
def fuzzed_requests(draw) -> dict:
    """The keyword arguments of one POST /predict: a raw body, a multipart upload with random field and
    file names, or a multipart body with bytes changed; with a random content type and top_k."""
    body = draw(fuzzed_bytes())
    params = {"top_k": draw(st.sampled_from(["5"] * 8 + ["1", "10", "0", "11", "x"]))}  # mostly valid
    kind = draw(st.sampled_from(["raw", "multipart", "broken multipart"]))
    if kind == "raw":
        return {"params": params, "content": body, "headers": {"content-type": draw(CONTENT_TYPES)}}
    if kind == "multipart":
        name, filename = draw(st.just("file") | PRINTABLE), draw(PRINTABLE)
        return {"params": params, "files": {name: (filename, body, draw(CONTENT_TYPES))}}
    data = bytearray(multipart(("file", body)))
    for _ in range(draw(st.integers(1, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return {"params": params, "content": bytes(data), "headers": {"content-type": MULTIPART}}


def test_fuzzed_uploads_get_json_4xx_or_200_never_500_and_a_good_image_still_gets_200(model_file):
    config = ServeConfig(model=str(model_file), max_pixels=1_000_000)  # a mutated header claims no huge image
    with TestClient(create_app(config)) as client:

        @settings(max_examples=150, deadline=None, database=None)
        @given(request=fuzzed_requests())
        def one_request(request: dict) -> None:
            answer = client.post("/predict", **request)
            assert answer.headers["content-type"] == "application/json", answer.text
            if answer.status_code == 200:
                assert len(answer.json()["top_k"]) == int(request["params"]["top_k"])
            else:
                assert 400 <= answer.status_code < 500 and isinstance(answer.json()["error"], str), answer.text

        one_request()
        good = client.post("/predict", content=SAMPLES[0], headers={"content-type": "image/png"})
        assert good.status_code == 200 and len(good.json()["top_k"]) == 5
