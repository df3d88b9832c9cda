"""`miniresnet serve`: a model behind an HTTP API and a drag-and-drop page (FastAPI + uvicorn, the
`serve` extra).

    POST /predict   one image (multipart field `file`, or the raw body with an image/* type);
                    ?top_k=N (default 5, or every class of a model with fewer);
                    JSON {"top_k": [{"class", "probability"}, ...]}, as `predict --json`
    GET  /healthz   200 once the model is loaded
    GET  /metrics   Prometheus: requests by endpoint and status, latency, batch sizes, queue depth
    GET  /          the page; /docs the OpenAPI page FastAPI gives

A request to /predict passes four stages, each bounded, so that no number of clients, fast or
slow, can take the server's memory or stop it answering /healthz:

1. Admission. At most `max_queue` requests are inside /predict at once, from before their body is
   read to their answer; one more is refused at once with 503 and Retry-After. The bodies held,
   the requests waiting for a decode thread and those waiting for the model all count against
   this one bound, so a flood is refused instead of waiting without end.
2. The body, counted against `max_upload_bytes` as it arrives (a multipart body too: it is
   collected under the cap and parsed in memory, never spooled whole before the check). All of it
   must arrive within `body_timeout_s` of the request's start, else 408 and the connection closes.
3. Decoding, on `decode_workers` threads of the server's own (0: the cores available); admitted
   requests wait their turn there. The server does not keep freed memory as training does: each
   decode's is handed back to the OS (glibc's malloc_trim), so the idle server shrinks again.
4. The model: one task takes up to `max_batch` decoded images (waiting at most `max_wait_ms`
   after the first) into one forward pass, on a worker thread, so the event loop runs meanwhile.

A refusal sent before the body has all arrived (413, 415, 422, 503) first reads and discards the
rest of it, up to 4x `max_upload_bytes` (256 MB at most) and within the body timeout: clients such
as urllib and requests read the answer only once they have sent everything, and a connection
closed on unread data is reset, answer and all. Past that bound the answer says Connection: close.

Every answer of the app is JSON, {"error": ...} with its 4xx or 5xx, and counted in /metrics: an
unexpected exception is a 500, logged in one line. Above `max_connections` open connections
uvicorn itself answers 503 (plain text); an idle kept-alive connection closes after `keep_alive_s`.
uvicorn sets no deadline on a request's headers: `max_connections` bounds clients that never finish them.

The server's memory at worst, the sum of what the bounds above allow:

      decode_workers x max_pixels x 4 bytes x 2.5    an RGBA decode and a composite of it, at most
    + (max_queue + 2) x max_upload_bytes             the bodies held, and copies of the one parsed
    + the model and PyTorch                          a few hundred MB

With the defaults on 2 cores: 2 x 0.5 GB + 66 x 32 MiB + ~0.3 GB, about 3.5 GB. Lower
--max-queue, --max-upload-mb, --decode-workers or --max-pixels for a smaller bound.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException
from starlette.types import Receive
from torch import nn

from .checkpoint import load_model
from .errors import MiniResNetError
from .evaluate import classify
from .images import FORMATS_TEXT, IMAGE_SUFFIXES, ImageTooLarge, load_image
from .pretrained import DEFAULT_MODEL
from .runtime import available_cores, log

PAGE = Path(__file__).with_name("serve_page.html")
MULTIPART_ROOM = 64 * 1024  # a multipart body's boundaries and part headers, beyond the file's own bytes
MULTIPART_PARTS = 8  # parts a multipart body may have: a form sends the file and perhaps a field or two
DISCARD_AT_MOST = 256 * 1024 * 1024  # the most of a refused body read and dropped so its client reads the answer


@dataclass
class ServeConfig:
    """The server's settings. Its memory at worst (the module docstring says why):
    decode_workers x max_pixels x 10 bytes + (max_queue + 2) x max_upload_bytes + the model."""

    model: str = DEFAULT_MODEL  # a checkpoint, a safetensors export or a shipped name
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 64  # requests inside /predict at once (receiving, decoding, waiting for the model); more: 503
    max_upload_bytes: int = 32 * 1024 * 1024  # a 48-megapixel phone JPEG at high quality fits
    max_pixels: int = 50_000_000  # width x height, read from the header before decoding: 48 and 50 MP photos fit
    decode_workers: int = 0  # images decoding at once, on the server's own threads; 0: the cores available
    body_timeout_s: float = 30.0  # the whole upload must arrive within this, else 408 and the connection closes
    max_connections: int = 512  # open connections; above it uvicorn answers 503
    keep_alive_s: int = 5  # an idle kept-alive connection closes after this
    threads: int = 0  # PyTorch's threads for the forward pass; 0: the cores available


class RequestError(Exception):
    """A request the server refuses: its HTTP status, the message and any headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class Metrics:
    def __init__(self, max_batch: int) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "miniresnet_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "miniresnet_request_seconds", "time from request to response", ["endpoint"], registry=self.registry
        )
        buckets = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, max_batch})
        self.batch_size = Histogram(
            "miniresnet_batch_size",
            "images per forward pass",
            buckets=[b for b in buckets if b <= max_batch],
            registry=self.registry,
        )
        self.queue_depth = Gauge("miniresnet_queue_depth", "images waiting for the model", registry=self.registry)
        self.in_progress = Gauge(
            "miniresnet_predict_in_progress",
            "requests inside /predict: receiving, decoding or waiting for the model",
            registry=self.registry,
        )


def one_line(text: str) -> str:
    return " ".join(text.split())


class CountAndCatch:
    """ASGI middleware: counts every answer in /metrics by endpoint and status, and turns an unexpected
    exception into a JSON 500 logged in one line. (Starlette's own catch-all sits outside every
    middleware: it answers `500 text/plain`, logs a traceback, and the count never sees it.)"""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, statuses = time.perf_counter(), []

        async def send_noting_the_status(message) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_noting_the_status)
        except Exception as e:
            problem = one_line(f"{type(e).__name__}: {e}")
            log(f"miniresnet: {scope['method']} {scope['path']}: 500 {problem}")
            if not statuses:  # else the answer is under way, and uvicorn closes the connection
                answer = JSONResponse({"error": f"internal error: {problem}"}, status_code=500)
                await answer(scope, receive, send_noting_the_status)
        endpoint = scope["path"] if scope["path"] in ("/", "/predict", "/healthz", "/metrics") else "other"
        self.metrics.requests.labels(endpoint, str(statuses[0]) if statuses else "none").inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


class Admission:
    """How many requests are inside /predict; one more than `limit` is refused with 503."""

    def __init__(self, limit: int, gauge: Gauge) -> None:
        self.limit, self.gauge, self.inside = limit, gauge, 0

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if self.inside >= self.limit:
            raise RequestError(
                503, f"the server is busy ({self.limit} requests in progress); retry shortly", {"Retry-After": "1"}
            )
        self.inside += 1
        self.gauge.set(self.inside)
        try:
            yield
        finally:
            self.inside -= 1
            self.gauge.set(self.inside)


class Batcher:
    """Gathers the images of concurrent requests into batches for one forward pass each."""

    def __init__(self, model: torch.nn.Module, config: ServeConfig, metrics: Metrics) -> None:
        self.model, self.config, self.metrics = model, config, metrics
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=config.max_queue)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    def submit(self, image: torch.Tensor) -> asyncio.Future:
        """A future for the image's ranked classes; a full queue is a 503."""
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((image, future))
        except asyncio.QueueFull:
            raise RequestError(
                503,
                f"the server is busy ({self.config.max_queue} requests waiting); retry shortly",
                {"Retry-After": "1"},
            ) from None
        self.metrics.queue_depth.set(self.queue.qsize())
        return future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.config.max_wait_ms / 1000
            while len(batch) < self.config.max_batch:
                try:
                    batch.append(self.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                if loop.time() >= deadline:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), deadline - loop.time()))
                except asyncio.TimeoutError:
                    break
            self.metrics.queue_depth.set(self.queue.qsize())
            self.metrics.batch_size.observe(len(batch))
            images = torch.stack([image for image, _ in batch])
            try:
                ranked = await loop.run_in_executor(self.worker, classify, self.model, images, len(self.model.classes))
            except Exception as e:  # the requests get a 500; the server carries on
                ranked = [e] * len(batch)
            for (_, future), result in zip(batch, ranked, strict=True):
                if not future.done():  # its client may have gone
                    (future.set_exception if isinstance(result, Exception) else future.set_result)(result)


def page_html() -> str:
    """The page, naming the accepted formats from the one list that decides what is decoded."""
    return (
        PAGE.read_text(encoding="utf-8")
        .replace("{{FORMATS_TEXT}}", FORMATS_TEXT)
        .replace("{{ACCEPT}}", ",".join(IMAGE_SUFFIXES))
    )


def prepared_png(image: torch.Tensor) -> str:
    """The image the model saw, as a PNG data URL (for the page)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@dataclass
class Upload:
    """A request's body as the server reads it off the connection, piece by piece, so that a refusal
    can still discard what is left of it."""

    receive: Receive  # the request's ASGI channel
    headers: dict[str, str]
    deadline: float  # the event loop's time by which the whole body must have arrived
    timeout_s: float
    received: int = 0  # bytes so far
    asked: bool = False  # whether the body was asked for: a client that expects `100 Continue` sends it only then
    complete: bool = False

    @property
    def declared_length(self) -> int:
        length = self.headers.get("content-length", "")
        return int(length) if length.isdigit() else 0


def upload_of(request: Request, timeout_s: float) -> Upload:
    """The request's Upload, made on first use and kept in its state, where an exception handler finds it."""
    if not hasattr(request.state, "upload"):
        deadline = asyncio.get_running_loop().time() + timeout_s
        request.state.upload = Upload(request.receive, dict(request.headers), deadline, timeout_s)
    return request.state.upload


async def next_piece(upload: Upload) -> bytes:
    """The body's next piece as it arrives; 408 (and the connection closed) once past the deadline."""
    upload.asked = True
    left = max(0.0, upload.deadline - asyncio.get_running_loop().time())
    try:
        message = await asyncio.wait_for(upload.receive(), left)
    except asyncio.TimeoutError:
        raise RequestError(
            408, f"the upload did not arrive whole within {upload.timeout_s:g} s", {"Connection": "close"}
        ) from None
    if message["type"] == "http.disconnect":
        upload.complete = True  # nothing more will come
        raise RequestError(400, "the client closed the connection before its upload arrived whole")
    piece = message.get("body", b"")
    upload.received += len(piece)
    upload.complete = not message.get("more_body", False)
    return piece


async def read_body(upload: Upload, limit: int, too_big: RequestError) -> bytes:
    """The whole body, counted against `limit` as it arrives: `too_big` is raised at the first byte over."""
    if upload.declared_length > limit:
        raise too_big
    pieces, size = [], 0
    while not upload.complete:
        pieces.append(await next_piece(upload))
        size += len(pieces[-1])
        if size > limit:
            raise too_big
    return b"".join(pieces)


async def discard_rest(upload: Upload, limit: int) -> bool:
    """Reads and drops what is left of the body, up to `limit` bytes in all and by the deadline; whether
    it has all arrived (if not, the connection must close after the answer)."""
    if upload.complete:
        return True
    if upload.declared_length > limit:
        return False
    if not upload.asked and upload.headers.get("expect", "").lower() == "100-continue":
        return False  # the client sends its body only once asked: there is nothing to read
    while upload.received <= limit:
        try:
            await next_piece(upload)
        except RequestError:
            return False
        if upload.complete:
            return True
    return False


def multipart_file(body: bytes, content_type: str) -> bytes:
    """The part named `file` of a multipart/form-data body, parsed in memory (the body is already under
    the cap); a body that is not well-formed multipart, or has no such part, is a 400."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise RequestError(400, "unreadable multipart body: its content type names no boundary")
    parts: list[dict] = []  # each part's field name, whether it is the file, its pieces, and whether it ended
    header = {"name": b"", "value": b""}

    def part_begins() -> None:
        if len(parts) == MULTIPART_PARTS:
            raise RequestError(400, f"unreadable multipart body: more than {MULTIPART_PARTS} parts")
        parts.append({"name": None, "pieces": [], "ended": False})

    def header_name(data, start, end) -> None:
        header["name"] += data[start:end]

    def header_value(data, start, end) -> None:
        header["value"] += data[start:end]

    def header_ends() -> None:
        if header["name"].strip().lower() == b"content-disposition":
            parts[-1]["name"] = parse_options_header(header["value"])[1].get(b"name")
        header["name"] = header["value"] = b""

    def part_data(data, start, end) -> None:
        if parts[-1]["name"] == b"file":  # other fields' bytes are not kept
            parts[-1]["pieces"].append(bytes(data[start:end]))

    def part_ends() -> None:
        parts[-1]["ended"] = True

    finished = []
    callbacks = {
        "on_part_begin": part_begins,
        "on_header_field": header_name,
        "on_header_value": header_value,
        "on_header_end": header_ends,
        "on_part_data": part_data,
        "on_part_end": part_ends,
        "on_end": lambda: finished.append(True),
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except RequestError:
        raise
    except Exception as e:  # python-multipart's own errors, whatever their type
        raise RequestError(400, one_line(f"unreadable multipart body: {e}")) from None
    if not finished:
        raise RequestError(400, "unreadable multipart body: it ends before its closing boundary")
    files = [part for part in parts if part["name"] == b"file" and part["ended"]]
    if not files:
        raise RequestError(400, "a multipart upload needs the image in a file field named 'file'")
    return b"".join(files[0]["pieces"])


def malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (musl, macOS, Windows)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):
        return None


MALLOC_TRIM = malloc_trim()


def decode(data: bytes, size: int, max_pixels: int) -> torch.Tensor:
    """`load_image` on a decode thread; then the memory it freed goes back to the OS (a large image's
    decode frees hundreds of MB, which glibc would otherwise keep, and the idle server with it)."""
    try:
        return load_image(data, size, max_pixels)
    finally:
        if MALLOC_TRIM is not None:
            MALLOC_TRIM(0)


IMAGE_TYPES = ("application/octet-stream", "")  # besides image/*: what clients send for a file of unknown type


async def receive_image(upload: Upload, config: ServeConfig, decoder: ThreadPoolExecutor, size: int) -> torch.Tensor:
    """The upload, read under the size cap and decoded on a decode thread: the model's input."""
    content_type = upload.headers.get("content-type", "")
    kind = content_type.split(";")[0].strip().lower()
    if kind != "multipart/form-data" and not (kind.startswith("image/") or kind in IMAGE_TYPES):
        raise RequestError(
            415,
            f"content type {kind!r} is not an image: send multipart/form-data with a 'file' field, "
            "or the image itself as the body with an image/* content type",
        )
    too_big = RequestError(413, f"the upload is over the limit of {config.max_upload_bytes:,} bytes")
    if kind == "multipart/form-data":
        data = multipart_file(await read_body(upload, config.max_upload_bytes + MULTIPART_ROOM, too_big), content_type)
    else:
        data = await read_body(upload, config.max_upload_bytes, too_big)
    if len(data) > config.max_upload_bytes:
        raise too_big
    if not data:
        raise RequestError(400, "the request holds no image (empty body)")
    try:
        return await asyncio.get_running_loop().run_in_executor(decoder, decode, data, size, config.max_pixels)
    except ImageTooLarge as e:
        raise RequestError(413, str(e)) from None
    except MiniResNetError as e:
        raise RequestError(400, str(e)) from None
    except MemoryError:
        raise
    except Exception as e:  # a decoder's exception that images.py does not name: still the upload's bytes
        log(one_line(f"miniresnet: POST /predict: 400 from the decoder, {type(e).__name__}: {e}"))
        raise RequestError(400, one_line(f"the upload: not a readable image ({type(e).__name__}: {e})")) from None


def create_app(config: ServeConfig, model: nn.Module | None = None) -> FastAPI:
    """The app serving `model` (a `load_model` result), or `config.model` loaded at start-up."""
    metrics = Metrics(config.max_batch)
    admission = Admission(config.max_queue, metrics.in_progress)
    discard_limit = min(4 * config.max_upload_bytes, DISCARD_AT_MOST)
    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # Not runtime.set_threads: its malloc setting keeps freed memory for training's next step,
        # which here would keep every large decode's peak for good.
        torch.set_num_threads(config.threads or available_cores())
        loaded = model if model is not None else await asyncio.to_thread(load_model, config.model)
        state["model"], state["batcher"] = loaded, Batcher(loaded, config, metrics)
        state["decoder"] = ThreadPoolExecutor(config.decode_workers or available_cores(), thread_name_prefix="decode")
        task = asyncio.create_task(state["batcher"].run())
        log(f"miniresnet: {config.model} loaded ({len(loaded.classes)} classes)")
        yield
        task.cancel()
        state["batcher"].worker.shutdown(wait=False)
        state["decoder"].shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="miniresnet", description="Mini-ResNet image classification", lifespan=lifespan)
    app.add_middleware(CountAndCatch, metrics=metrics)

    async def refusal(request: Request, error: RequestError) -> JSONResponse:
        """The JSON answer to a refused request, once the rest of its body is read (see the docstring)."""
        headers = dict(error.headers)
        if not await discard_rest(upload_of(request, config.body_timeout_s), discard_limit):
            headers["Connection"] = "close"
        return JSONResponse({"error": error.message}, status_code=error.status, headers=headers)

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError):
        return await refusal(request, error)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return await refusal(request, RequestError(422, problems))

    @app.exception_handler(HTTPException)
    async def routing(request: Request, error: HTTPException):  # no such path (404), or method (405)
        return await refusal(request, RequestError(error.status_code, str(error.detail), error.headers))

    @app.post("/predict", summary="Classify one image")
    async def predict(request: Request, top_k: int | None = None, image: bool = False) -> dict:
        """The image as a multipart upload (field `file`) or as the raw body (image/* content
        type): PNG, JPEG, HEIC/HEIF, AVIF, WebP, GIF, TIFF or BMP, any size and mode, prepared as
        `miniresnet predict` prepares it. `image=true` adds the prepared image the model saw, as a
        PNG data URL. Without `top_k`: the 5 most likely classes, or all of a model with fewer."""
        model = state["model"]
        top_k = min(5, len(model.classes)) if top_k is None else top_k
        if not 1 <= top_k <= len(model.classes):
            raise RequestError(422, f"top_k must be between 1 and {len(model.classes)}, got {top_k}")
        with admission.slot():
            upload = upload_of(request, config.body_timeout_s)
            prepared = await receive_image(upload, config, state["decoder"], model.image_size)
            try:
                ranked = await state["batcher"].submit(prepared)
            except Exception as e:  # the forward pass failed: this request's answer, not the server's end
                log(one_line(f"miniresnet: POST /predict: 500 from the model, {type(e).__name__}: {e}"))
                raise RequestError(500, f"the model could not classify the image: {type(e).__name__}: {e}") from None
        answer = {"top_k": [{"class": c, "probability": p} for c, p in ranked[:top_k]]}
        if image:
            answer["image"] = prepared_png(prepared)
        return answer

    # HEAD as well as GET: monitors probe with HEAD (FastAPI's @app.get answers it 405)
    @app.api_route("/healthz", methods=["GET", "HEAD"], summary="200 once the model is loaded")
    async def healthz() -> Response:
        if "model" not in state:
            return JSONResponse({"status": "loading"}, status_code=503)
        model = state["model"]
        return JSONResponse({"status": "ok", "model": config.model, "classes": list(model.classes)})

    @app.api_route("/metrics", methods=["GET", "HEAD"], summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(page_html())

    return app


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, model: nn.Module | None = None) -> None:
    import uvicorn

    log(f"miniresnet: serving {config.model} on http://{host}:{port}/ (API docs: /docs)")
    uvicorn.run(
        create_app(config, model),
        host=host,
        port=port,
        log_level="warning",
        limit_concurrency=config.max_connections,
        timeout_keep_alive=config.keep_alive_s,
    )
