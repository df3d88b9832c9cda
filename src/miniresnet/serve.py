"""`miniresnet serve`: a model behind an HTTP API and a drag-and-drop page (FastAPI + uvicorn, the
`serve` extra).

    POST /predict   one image (multipart field `file`, or the raw body with an image/* type);
                    ?top_k=5; JSON {"top_k": [{"class", "probability"}, ...]}, as `predict --json`
    GET  /healthz   200 once the model is loaded
    GET  /metrics   Prometheus: requests by endpoint and status, latency, batch sizes, queue depth
    GET  /          the page; /docs the OpenAPI page FastAPI gives

Concurrent requests wait in a bounded queue; one task takes up to --max-batch of them (waiting at
most --max-wait-ms after the first) into one forward pass, run on a worker thread so that the event
loop keeps accepting requests and answering /healthz meanwhile. A full queue answers 503 with
Retry-After. Bad input is a JSON {"error": ...} with a 4xx status, and the server carries on.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from torch import nn

from .checkpoint import load_model
from .errors import MiniResNetError
from .evaluate import classify
from .images import ImageTooLarge, load_image
from .pretrained import DEFAULT_MODEL
from .runtime import set_threads

PAGE = Path(__file__).with_name("serve_page.html")


@dataclass
class ServeConfig:
    model: str = DEFAULT_MODEL  # a checkpoint, a safetensors export or a shipped name
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256  # requests waiting for the model; more get 503
    max_upload_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 40_000_000  # an image's width x height, read from its header before decoding
    threads: int = 0


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


def prepared_png(image: torch.Tensor) -> str:
    """The image the model saw, as a PNG data URL (for the page)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def read_upload(request: Request, max_bytes: int) -> bytes:
    """The image's bytes from a multipart upload or the raw body, within the size cap."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    declared = request.headers.get("content-length")
    too_big = RequestError(413, f"the upload is over the limit of {max_bytes:,} bytes")
    if declared and declared.isdigit() and int(declared) > max_bytes + 64 * 1024:  # room for multipart headers
        raise too_big
    if content_type == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as e:  # a malformed multipart body
            raise RequestError(400, f"unreadable multipart body: {e}") from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise RequestError(400, "a multipart upload needs the image in a file field named 'file'")
        data = await upload.read()
    elif content_type.startswith("image/") or content_type in ("application/octet-stream", ""):
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > max_bytes:
                raise too_big
        data = bytes(data)
    else:
        raise RequestError(
            415,
            f"content type {content_type!r} is not an image: send multipart/form-data with a 'file' field, "
            "or the image itself as the body with an image/* content type",
        )
    if len(data) > max_bytes:
        raise too_big
    if not data:
        raise RequestError(400, "the request holds no image (empty body)")
    return data


def create_app(config: ServeConfig, model: nn.Module | None = None) -> FastAPI:
    """The app serving `model` (a `load_model` result), or `config.model` loaded at start-up."""
    metrics = Metrics(config.max_batch)
    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        set_threads(config.threads)
        loaded = model if model is not None else await asyncio.to_thread(load_model, config.model)
        state["model"], state["batcher"] = loaded, Batcher(loaded, config, metrics)
        task = asyncio.create_task(state["batcher"].run())
        print(f"miniresnet: {config.model} loaded ({len(loaded.classes)} classes)", file=sys.stderr, flush=True)
        yield
        task.cancel()
        state["batcher"].worker.shutdown(wait=False)

    app = FastAPI(title="miniresnet", description="Mini-ResNet image classification", lifespan=lifespan)

    @app.middleware("http")
    async def count(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        endpoint = request.url.path if request.url.path in ("/", "/predict", "/healthz", "/metrics") else "other"
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError):
        return JSONResponse({"error": error.message}, status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return JSONResponse({"error": problems}, status_code=422)

    @app.post("/predict", summary="Classify one image")
    async def predict(request: Request, top_k: int = 5, image: bool = False) -> dict:
        """The image as a multipart upload (field `file`) or as the raw body (image/* content
        type): PNG, JPEG, BMP or WebP, any size and mode, prepared as `miniresnet predict` prepares
        it. `image=true` adds the prepared image the model saw, as a PNG data URL."""
        model = state["model"]
        if not 1 <= top_k <= len(model.classes):
            raise RequestError(422, f"top_k must be between 1 and {len(model.classes)}, got {top_k}")
        data = await read_upload(request, config.max_upload_bytes)
        try:
            prepared = await asyncio.to_thread(load_image, data, model.image_size, config.max_pixels)
        except ImageTooLarge as e:
            raise RequestError(413, str(e)) from None
        except MiniResNetError as e:
            raise RequestError(400, str(e)) from None
        try:
            ranked = await state["batcher"].submit(prepared)
        except Exception as e:  # the forward pass failed: this request's answer, not the server's end
            raise RequestError(500, f"the model could not classify the image: {type(e).__name__}: {e}") from None
        answer = {"top_k": [{"class": c, "probability": p} for c, p in ranked[:top_k]]}
        if image:
            answer["image"] = prepared_png(prepared)
        return answer

    @app.get("/healthz", summary="200 once the model is loaded")
    async def healthz() -> Response:
        if "model" not in state:
            return JSONResponse({"status": "loading"}, status_code=503)
        model = state["model"]
        return JSONResponse({"status": "ok", "model": config.model, "classes": list(model.classes)})

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text())

    return app


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, model: nn.Module | None = None) -> None:
    import uvicorn

    print(f"miniresnet: serving {config.model} on http://{host}:{port}/ (API docs: /docs)", file=sys.stderr, flush=True)
    uvicorn.run(create_app(config, model), host=host, port=port, log_level="warning")
