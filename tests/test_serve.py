"""`miniresnet serve`: the API in process, a real server process on 127.0.0.1, and the page in
headless Chromium."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="the server is an optional extra: pip install 'miniresnet[serve]'")

from fastapi.testclient import TestClient
from PIL import Image

from conftest import export_like
from miniresnet.cli import main
from miniresnet.data import load_cifar10
from miniresnet.images import FORMATS_TEXT, IMAGE_SUFFIXES, accepted_formats
from miniresnet.model import MiniResNet
from miniresnet.pretrained import DEFAULT_MODEL
from miniresnet.serve import Batcher, Metrics, RequestError, ServeConfig, create_app


def png_bytes(size=(50, 40), colour=(200, 30, 30), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def cli_prediction(capsys, model: Path | str, image: Path) -> list[dict]:
    assert main(["predict", str(model), str(image), "--top-k", "5", "--json"]) == 0
    return json.loads(capsys.readouterr().out)["top_k"]


def same_ranking(got: list[dict], expected: list[dict]) -> bool:
    """Same classes in the same order, probabilities equal to the 6 printed decimals (a batch of
    another size may run other kernels, which can move the 7th)."""
    return [g["class"] for g in got] == [e["class"] for e in expected] and all(
        abs(g["probability"] - e["probability"]) <= 2e-6 for g, e in zip(got, expected, strict=True)
    )


def test_predict_answers_as_the_cli_does_for_uploads_and_raw_bodies(model_file, tmp_path, capsys):
    image = tmp_path / "red.png"
    image.write_bytes(png_bytes())
    expected = cli_prediction(capsys, model_file, image)
    with TestClient(create_app(ServeConfig(model=str(model_file)))) as client:
        assert client.get("/healthz").json()["status"] == "ok"
        raw = client.post("/predict", content=image.read_bytes(), headers={"content-type": "image/png"})
        upload = client.post("/predict", files={"file": ("red.png", image.read_bytes(), "image/png")})
        two = client.post(
            "/predict?top_k=2&image=true", content=image.read_bytes(), headers={"content-type": "image/png"}
        )
        heads = [client.head(path).status_code for path in ("/healthz", "/metrics", "/")]
    assert raw.status_code == upload.status_code == two.status_code == 200
    assert heads == [200, 200, 200]  # monitors probe with HEAD
    assert same_ranking(raw.json()["top_k"], expected) and same_ranking(upload.json()["top_k"], expected)
    assert same_ranking(two.json()["top_k"], expected[:2])
    seen = Image.open(io.BytesIO(base64.b64decode(two.json()["image"].split(",")[1])))
    assert seen.size == (32, 32)


def test_a_model_of_fewer_classes_than_the_default_top_k_answers_with_all_of_them(tmp_path, capsys):
    torch.manual_seed(0)
    model = tmp_path / "two.safetensors"
    export_like(MiniResNet(num_classes=2).eval(), model, ["cat", "dog"])
    image = tmp_path / "red.png"
    image.write_bytes(png_bytes())
    assert main(["predict", str(model), str(image), "--json"]) == 0  # the default, 3, is more than 2
    assert [c["class"] for c in json.loads(capsys.readouterr().out)["top_k"]] in (["cat", "dog"], ["dog", "cat"])
    assert main(["predict", str(model), str(image), "--top-k", "3"]) == 1  # asked for: a clear error
    assert "--top-k must be between 1 and 2, got 3" in capsys.readouterr().err
    with TestClient(create_app(ServeConfig(model=str(model)))) as client:
        default = client.post("/predict", content=png_bytes(), headers={"content-type": "image/png"})
        too_many = client.post("/predict?top_k=3", content=png_bytes(), headers={"content-type": "image/png"})
    assert default.status_code == 200 and len(default.json()["top_k"]) == 2
    assert too_many.status_code == 422 and "between 1 and 2" in too_many.json()["error"]


BAD_INPUTS = [
    ("too many pixels", png_bytes((8_000, 8_000), 0, "1"), "image/png", 413, "8000x8000 is 64,000,000 pixels"),
    ("not an image", b"hello, world", "image/png", 400, "not a readable image"),
    ("truncated PNG", png_bytes((300, 300))[:200], "image/png", 400, "not a readable image"),
    ("empty body", b"", "image/png", 400, "empty body"),
    ("over the size cap", b"\0" * (1024 * 1024 + 10), "image/png", 413, "over the limit of 1,048,576 bytes"),
    (
        "decompression bomb",
        png_bytes((20_000, 20_000), 0, "1"),
        "image/png",
        413,
        "over the limit of 50,000,000 pixels",
    ),
    ("wrong content type", b'{"image": 1}', "application/json", 415, "is not an image"),
]


@pytest.mark.parametrize("name, body, content_type, status, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_a_json_error_and_the_server_carries_on(model_file, name, body, content_type, status, message):
    config = ServeConfig(model=str(model_file), max_upload_bytes=1024 * 1024, max_pixels=50_000_000)
    with TestClient(create_app(config)) as client:
        response = client.post("/predict", content=body, headers={"content-type": content_type})
        assert response.status_code == status and message in response.json()["error"], response.json()
        assert client.post("/predict", content=png_bytes(), headers={"content-type": "image/png"}).status_code == 200
        assert (
            client.post("/predict?top_k=11", content=png_bytes(), headers={"content-type": "image/png"}).status_code
            == 422
        )
        metrics = client.get("/metrics").text
    assert f'miniresnet_requests_total{{endpoint="/predict",status="{status}"}} 1.0' in metrics
    assert 'miniresnet_requests_total{endpoint="/predict",status="200"} 1.0' in metrics


def test_concurrent_requests_share_a_forward_pass_and_a_full_queue_is_refused(model_file):
    from miniresnet import load_model
    from miniresnet.evaluate import classify

    model = load_model(model_file)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)

    async def scenario() -> tuple[list, list]:
        metrics = Metrics(max_batch=8)
        batcher = Batcher(model, ServeConfig(max_batch=8, max_wait_ms=200, max_queue=6), metrics)
        futures = [batcher.submit(image) for image in images]  # queued before the batcher runs
        with pytest.raises(RequestError) as refused:
            batcher.submit(images[0])
        assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "1"}
        task = asyncio.create_task(batcher.run())
        results = await asyncio.gather(*futures)
        task.cancel()
        sizes = [s for s in metrics.registry.collect() if s.name == "miniresnet_batch_size"][0].samples
        return results, sizes

    results, sizes = asyncio.run(scenario())
    assert results == classify(model, images, 10)  # one batch of 6: the same pass as done by hand
    assert {s.name: s.value for s in sizes if s.name.endswith(("_count", "_sum"))} == {
        "miniresnet_batch_size_count": 1.0,
        "miniresnet_batch_size_sum": 6.0,
    }


def test_healthz_answers_while_the_model_works(model_file, monkeypatch):
    import miniresnet.serve as serve

    def slow_classify(*args):
        time.sleep(1.5)
        return classify(*args)

    classify = serve.classify
    monkeypatch.setattr(serve, "classify", slow_classify)
    with TestClient(create_app(ServeConfig(model=str(model_file)))) as client:
        worker = threading.Thread(
            target=client.post,
            args=("/predict",),
            kwargs={"content": png_bytes(), "headers": {"content-type": "image/png"}},
        )
        worker.start()
        time.sleep(0.3)  # the request is in the model now
        started = time.perf_counter()
        assert client.get("/healthz").status_code == 200
        assert time.perf_counter() - started < 1.0
        worker.join()


def test_a_failed_forward_pass_is_a_json_500_and_the_server_carries_on(model_file, monkeypatch):
    import miniresnet.serve as serve

    classify, calls = serve.classify, []

    def fails_once(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return classify(*args)

    monkeypatch.setattr(serve, "classify", fails_once)
    with TestClient(create_app(ServeConfig(model=str(model_file)))) as client:
        failed = client.post("/predict", content=png_bytes(), headers={"content-type": "image/png"})
        assert failed.status_code == 500 and "RuntimeError: out of memory" in failed.json()["error"]
        assert client.post("/predict", content=png_bytes(), headers={"content-type": "image/png"}).status_code == 200


def test_an_unexpected_exception_is_a_json_500_logged_in_one_line_and_counted(model_file, monkeypatch, capsys):
    import miniresnet.serve as serve

    def fails(image):
        raise RuntimeError("the PNG encoder broke\nwith a second line")

    monkeypatch.setattr(serve, "prepared_png", fails)
    with TestClient(create_app(ServeConfig(model=str(model_file)))) as client:
        capsys.readouterr()
        failed = client.post("/predict?image=true", content=png_bytes(), headers={"content-type": "image/png"})
        assert client.post("/predict", content=png_bytes(), headers={"content-type": "image/png"}).status_code == 200
        metrics = client.get("/metrics").text
    assert failed.status_code == 500 and failed.headers["content-type"] == "application/json"
    assert failed.json() == {"error": "internal error: RuntimeError: the PNG encoder broke with a second line"}
    assert capsys.readouterr().err.splitlines() == [
        "miniresnet: POST /predict: 500 RuntimeError: the PNG encoder broke with a second line"
    ]
    assert 'miniresnet_requests_total{endpoint="/predict",status="500"} 1.0' in metrics


@pytest.mark.parametrize("exception", [TypeError, NotImplementedError, AttributeError, ValueError])
def test_a_decoder_exception_of_any_type_is_a_400_in_one_log_line(model_file, monkeypatch, capsys, exception):
    """Whatever a Pillow decoder raises on an upload's bytes, the answer is the upload's 400."""
    import miniresnet.serve as serve

    def decoder_fails(data, size, max_pixels):
        raise exception("a decoder's own complaint")

    monkeypatch.setattr(serve, "load_image", decoder_fails)
    with TestClient(create_app(ServeConfig(model=str(model_file)))) as client:
        capsys.readouterr()
        answer = client.post("/predict", content=png_bytes(), headers={"content-type": "image/tiff"})
        metrics = client.get("/metrics").text
    name = exception.__name__
    assert answer.status_code == 400
    assert answer.json() == {"error": f"the upload: not a readable image ({name}: a decoder's own complaint)"}
    assert capsys.readouterr().err.splitlines() == [
        f"miniresnet: POST /predict: 400 from the decoder, {name}: a decoder's own complaint"
    ]
    assert 'miniresnet_requests_total{endpoint="/predict",status="400"} 1.0' in metrics


def test_no_such_path_or_method_is_a_json_error_too(model_file):
    with TestClient(create_app(ServeConfig(model=str(model_file)))) as client:
        missing = client.post("/nowhere", content=b"x" * 100_000)
        wrong_method = client.get("/predict")
        metrics = client.get("/metrics").text
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert wrong_method.json() == {"error": "Method Not Allowed"}
    assert 'miniresnet_requests_total{endpoint="other",status="404"} 1.0' in metrics


def test_the_page_is_served_whole_with_no_outside_assets(model_file):
    with TestClient(create_app(ServeConfig(model=str(model_file)))) as client:
        page = client.get("/")
        assert client.get("/openapi.json").json()["paths"].keys() >= {"/predict", "/healthz", "/metrics"}
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<input id="file"' in page.text and 'fetch("/predict' in page.text
    assert "http://" not in page.text and "https://" not in page.text and "//cdn" not in page.text
    # The chooser and its text name the formats of the one list that decides what is decoded.
    assert f'accept="{",".join(IMAGE_SUFFIXES)}"' in page.text and FORMATS_TEXT in page.text and "{{" not in page.text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(model: str, *flags: str) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """A real `miniresnet serve MODEL FLAGS...` process on 127.0.0.1 at a free port: its base URL, the
    process, and the file its stderr goes to (a file, not a pipe no one reads, which would fill and stall it)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        log = Path(directory) / "stderr.txt"
        with log.open("w") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "miniresnet", "serve", model, "--port", str(port), "--threads", "1", *flags],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                process.wait(timeout=20)
                pytest.fail(f"the server did not come up: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        try:
            yield url, process, log
        finally:
            process.terminate()
            process.wait(timeout=20)


@contextlib.contextmanager
def running_server(model: str, *flags: str) -> Iterator[str]:
    """A real `miniresnet serve MODEL FLAGS...` process on 127.0.0.1 at a free port; yields its base URL."""
    with server_process(model, *flags) as (url, _, _):
        yield url


@pytest.fixture
def server(model_file) -> Iterator[str]:
    with running_server(str(model_file)) as url:
        yield url


def post(url: str, body: bytes, content_type: str = "image/png") -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_real_server_process(server, model_file, tmp_path, capsys):
    image = tmp_path / "red.png"
    image.write_bytes(png_bytes())
    status, answer = post(server + "/predict", image.read_bytes())
    assert status == 200 and same_ranking(answer["top_k"], cli_prediction(capsys, model_file, image))
    assert post(server + "/predict", b"junk")[0] == 400
    with urllib.request.urlopen(server + "/metrics") as response:
        assert b"miniresnet_batch_size_bucket" in response.read()


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium package (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


def test_the_page_in_chromium_shows_the_clis_answer_and_works_by_keyboard(
    browser, server, model_file, tmp_path, capsys
):
    image = tmp_path / "red.png"
    image.write_bytes(png_bytes((64, 48), (30, 160, 200)))
    expected = cli_prediction(capsys, model_file, image)[0]["class"]
    page = browser.new_page(viewport={"width": 375, "height": 740})  # a phone's width
    # Playwright intercepts file choosers from a page's first "filechooser" listener on, set up in
    # the background: a listener made just before the key press can miss the chooser it opens.
    choosers = []
    page.on("filechooser", lambda chooser: choosers.append(chooser))
    page.goto(server + "/")
    for _ in range(5):  # keyboard alone: Tab to the chooser, Space opens it
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "file":
            break
    assert page.evaluate("document.activeElement.id") == "file"
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Space")
    assert len(choosers) == 1
    chooser.value.set_files(str(image))
    page.wait_for_selector("#answer:not([hidden]) #result li")
    assert page.inner_text("#result li .class") == expected
    assert expected in page.inner_text("#status")
    assert page.evaluate("document.getElementById('seen').naturalWidth") == 32
    assert page.evaluate("document.documentElement.scrollWidth") <= 375  # nothing wider than the phone
    page.close()


def test_the_page_classifies_a_real_cifar10_test_image_as_the_cli_does(browser, real_data, tmp_path, capsys):
    """The default shipped model, the server's default too."""
    data = load_cifar10(real_data)
    image = tmp_path / "test-0.png"
    Image.fromarray(data.test_images[0].permute(1, 2, 0).numpy()).save(image)
    expected = cli_prediction(capsys, DEFAULT_MODEL, image)[0]["class"]
    with running_server(DEFAULT_MODEL) as url:
        page = browser.new_page()
        page.goto(url + "/")
        page.set_input_files("#file", str(image))
        page.wait_for_selector("#answer:not([hidden]) #result li")
        assert page.inner_text("#result li .class") == expected
        page.close()


def test_serve_with_an_unknown_model_is_one_error_line(capsys):
    assert main(["serve", "no-such-model"]) == 1
    assert "'no-such-model' is neither a file nor a shipped model" in capsys.readouterr().err


def test_the_page_shows_a_portrait_phone_photo_upright_and_a_heic_as_the_model_saw_it(browser, server, tmp_path):
    """A JPEG stored on its side with EXIF orientation 6: the browser shows it upright, and so is
    what the model saw (the prepared image's top-left is the picture's top-left mark). A HEIC, which
    Chromium cannot show, is still classified, and the page says why it shows no preview."""
    upright = Image.new("RGB", (300, 400), (30, 160, 200))
    upright.paste((250, 250, 20), (0, 0, 150, 100))  # yellow across the top-left
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = tmp_path / "portrait.jpg"
    upright.transpose(Image.Transpose.ROTATE_90).save(photo, quality=95, exif=exif)  # stored on its side
    page = browser.new_page()
    page.goto(server + "/")
    page.set_input_files("#file", str(photo))
    page.wait_for_selector("#answer:not([hidden]) #result li")
    assert page.evaluate("document.getElementById('original').naturalWidth") == 300  # upright in the browser
    seen = page.evaluate("document.getElementById('seen').src")
    prepared = Image.open(io.BytesIO(base64.b64decode(seen.split(",")[1]))).convert("RGB")
    assert prepared.getpixel((1, 1))[2] < 100 and prepared.getpixel((30, 30))[2] > 150  # yellow top-left, blue below
    assert "HEIF" in accepted_formats(), "pillow-heif (the images extra) is installed with the dev extra"
    heic = tmp_path / "photo.heic"
    upright.save(heic, "HEIF")
    page.set_input_files("#file", str(heic))
    page.wait_for_function(
        "document.getElementById('status').textContent.startsWith('Most likely')"
        " && document.getElementById('original').alt.includes('cannot show')"
    )
    page.close()


def test_the_page_says_why_an_upload_over_the_cap_was_refused(browser, model_file, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes((40, 40)) + b"\0" * (2 * 1024 * 1024))  # a valid start, then 2 MB more
    with running_server(str(model_file), "--max-upload-mb", "1") as url:
        page = browser.new_page()
        page.goto(url + "/")
        page.set_input_files("#file", str(big))
        page.wait_for_selector("#error:not([hidden])")
        assert "over the limit of 1,048,576 bytes" in page.inner_text("#error")
        page.close()
