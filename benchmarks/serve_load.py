"""Load on `miniresnet serve` over loopback: throughput, latency percentiles, errors and the server's
memory, with batching on and off (--max-batch 1), every bad input of the API mixed into the load,
and every good answer checked against the answer the server gave for that image when idle.

    python benchmarks/serve_load.py [--model best] [--requests 5000] [--clients 32] [--data-dir ../shared/cifar10]

Bounded: a fixed number of requests, and a time limit per run. Writes benchmarks/results/serve_load.json.

    python benchmarks/serve_load.py --phone [--requests 200] [--clients 4] [--data-dir ../shared/cifar10]

The phone-photo mix: 12 phone-style 4000x3000 JPEGs (a third stored on their side with EXIF
orientation 6), served one at a time against a 32x32 PNG (median latencies), then under load, with
the reduced decode of large images on and off (a fresh server each). Writes serve_load_phone.json.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from miniresnet.runtime import describe_machine

ROOT = Path(__file__).resolve().parent.parent


def png(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, "PNG")
    return buffer.getvalue()


def bad_inputs() -> list[tuple[str, bytes, str, int]]:
    """(name, body, content type, expected status): the API's refusals (see the serve tests)."""
    bomb = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(bomb, "PNG")
    truncated = png(torch.randint(0, 256, (3, 300, 300), dtype=torch.uint8))[:500]
    return [
        ("not an image", b"hello", "image/png", 400),
        ("truncated PNG", truncated, "image/png", 400),
        ("empty body", b"", "image/png", 400),
        ("over the size cap", b"\0" * (9 * 1024 * 1024), "image/png", 413),
        ("decompression bomb", bomb.getvalue(), "image/png", 413),
        ("wrong content type", b"{}", "application/json", 415),
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def request(connection: http.client.HTTPConnection, body: bytes, content_type: str) -> tuple[int, bytes]:
    connection.request("POST", "/predict", body=body, headers={"Content-Type": content_type})
    response = connection.getresponse()
    return response.status, response.read()


# `miniresnet serve` with the reduced decode of large images switched off (a margin no image reaches).
FULL_DECODE = (
    "import sys, miniresnet.images as i; i.REDUCE_MARGIN = 10**9; from miniresnet.cli import main; sys.exit(main())"
)


def start_server(
    model: str, max_batch: int, full_decode: bool = False, upload_mb: int = 8
) -> tuple[subprocess.Popen, int]:
    """A server on a free port, once /healthz answers. The default 8 MB cap is the one the refused
    9 MB body of the mixed load is over; phone photos need the server's own default, 32."""
    port = free_port()
    launcher = ["-c", FULL_DECODE, "serve"] if full_decode else ["-m", "miniresnet", "serve"]
    command = [sys.executable, *launcher, model, "--port", str(port), "--max-batch", str(max_batch)]
    command += ["--max-upload-mb", str(upload_mb)]
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                return process, port
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not come up")


@dataclass
class Tally:
    """What the clients saw, added up under one lock."""

    latencies: list[float] = field(default_factory=list)
    wrong: int = 0  # good requests answered differently than when the server was idle
    refused_503: int = 0
    bad_sent: int = 0
    unexpected: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def same_answer(top: list[dict], expected: list[dict]) -> bool:
    return [t["class"] for t in top] == [e["class"] for e in expected] and all(
        abs(t["probability"] - e["probability"]) <= 2e-6 for t, e in zip(top, expected, strict=True)
    )


def client(port: int, indices, images: list[bytes], expected: list, bad: list, deadline: float, tally: Tally) -> None:
    """One client: its share of the requests, one at a time on a kept-alive connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for i in indices:
        if time.perf_counter() > deadline:
            return
        if i % 50 == 7:  # 2% of the load: the bad inputs, in turn
            name, body, content_type, status = bad[(i // 50) % len(bad)]
            got, _ = request(connection, body, content_type)
            connection.close()  # the server may close a connection after refusing a large body
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            with tally.lock:
                tally.bad_sent += 1
                if got != status:
                    tally.unexpected.append(f"{name}: {got}")
            continue
        k = i % len(images)
        started = time.perf_counter()
        status, payload = request(connection, images[k], "image/png")
        elapsed = time.perf_counter() - started
        with tally.lock:
            if status == 503:
                tally.refused_503 += 1
            elif status != 200:
                tally.unexpected.append(f"good request: {status}")
            else:
                tally.latencies.append(elapsed)
                tally.wrong += not same_answer(json.loads(payload)["top_k"], expected[k])


def drive(port: int, images: list[bytes], expected: list, n_requests: int, clients: int, limit_s: float) -> tuple:
    """n_requests from `clients` concurrent clients; (tally, wall seconds)."""
    tally, bad, indices = Tally(), bad_inputs(), iter(range(n_requests))  # the shared iterator hands out work
    started = time.perf_counter()
    args = (port, indices, images, expected, bad, started + limit_s, tally)
    threads = [threading.Thread(target=client, args=args) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tally, time.perf_counter() - started


def run_load(model: str, max_batch: int, images: list[bytes], n_requests: int, clients: int, limit_s: float) -> dict:
    process, port = start_server(model, max_batch)
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        expected = [json.loads(request(connection, body, "image/png")[1])["top_k"] for body in images]  # idle answers
        drive(port, images, expected, n_requests // 10, clients, limit_s)  # warm-up: batches of every size
        rss_before = rss_mb(process.pid)
        tally, wall = drive(port, images, expected, n_requests, clients, limit_s)
        rss_after = rss_mb(process.pid)
        batches = [line for line in get(port, "/metrics").splitlines() if line.startswith("miniresnet_batch_size_")]
        count = next(float(line.split()[-1]) for line in batches if line.startswith("miniresnet_batch_size_count"))
        total = next(float(line.split()[-1]) for line in batches if line.startswith("miniresnet_batch_size_sum"))
        q = statistics.quantiles(tally.latencies, n=100)
        return {
            "max_batch": max_batch,
            "good_ok": len(tally.latencies),
            "bad_inputs_sent": tally.bad_sent,
            "wrong_answers": tally.wrong,
            "unexpected_statuses": tally.unexpected[:20],
            "refused_503": tally.refused_503,
            "wall_seconds": round(wall, 2),
            "throughput_per_sec": round(len(tally.latencies) / wall, 1),
            "latency_ms": {"p50": round(1000 * q[49], 1), "p95": round(1000 * q[94], 1), "p99": round(1000 * q[98], 1)},
            "mean_batch_size_incl_warmup": round(total / count, 2),
            "rss_mb_before": round(rss_before, 1),
            "rss_mb_after": round(rss_after, 1),
        }
    finally:
        process.terminate()
        process.wait(timeout=30)


def phone_photo(image: torch.Tensor, seed: int, portrait: bool) -> bytes:
    """A 12-megapixel phone-style JPEG (q90) of a 32x32 image: upscaled to 4000x3000, with sensor-like
    noise so that it weighs what a real photo does (a few MB), stored on its side with EXIF
    orientation 6 when `portrait`, as phones store portrait photos."""
    big = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((4000, 3000), Image.Resampling.BICUBIC)
    noise = torch.randn(3000, 4000, 3, generator=torch.Generator().manual_seed(seed)) * 6
    pixels = (torch.from_numpy(np.array(big)).float() + noise).clamp(0, 255).to(torch.uint8).numpy()
    photo, exif = Image.fromarray(pixels), Image.Exif()
    if portrait:
        photo, exif[0x0112] = photo.transpose(Image.Transpose.ROTATE_90), 6
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=90, exif=exif)
    return buffer.getvalue()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_at_a_time(port: int, photo: bytes, small: bytes, rounds: int) -> dict:
    """Median latency of a phone photo and of a 32x32 PNG, alternating, one request at a time."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    times: dict[str, list[float]] = {"photo": [], "png": []}
    for _ in range(rounds):
        for name, body, kind in (("photo", photo, "image/jpeg"), ("png", small, "image/png")):
            started = time.perf_counter()
            status, _ = request(connection, body, kind)
            times[name].append(time.perf_counter() - started)
            assert status == 200, status
    photo_ms, png_ms = (1000 * statistics.median(times[k]) for k in ("photo", "png"))
    return {"photo_ms": round(photo_ms, 1), "png_ms": round(png_ms, 1), "ratio": round(photo_ms / png_ms, 2)}


def phone_load(port: int, photos: list[bytes], n_requests: int, clients: int) -> dict:
    """n_requests phone photos from `clients` concurrent clients: throughput and latency."""
    latencies, failures, lock, work = [], [], threading.Lock(), iter(range(n_requests))

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for i in work:
            started = time.perf_counter()
            status, _ = request(connection, photos[i % len(photos)], "image/jpeg")
            with lock:
                (latencies.append(time.perf_counter() - started) if status == 200 else failures.append(status))

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100)
    return {
        "ok": len(latencies),
        "failures": failures[:20],
        "throughput_per_sec": round(len(latencies) / wall, 2),
        "latency_ms": {"p50": round(1000 * q[49], 1), "p95": round(1000 * q[94], 1)},
    }


def run_phone(model: str, source: torch.Tensor, n_requests: int, clients: int, rounds: int) -> dict:
    """The phone-photo mix with the reduced decode on, then off (each its own fresh server)."""
    photos = [phone_photo(image, k, portrait=k % 3 == 0) for k, image in enumerate(source[:12])]
    small = png(source[0])
    record = {"photos": len(photos), "photo_mb": round(statistics.mean(map(len, photos)) / 2**20, 2)}
    for name, full in (("reduced_decode", False), ("full_decode", True)):
        process, port = start_server(model, 32, full_decode=full, upload_mb=32)
        try:
            result = {"one_at_a_time": one_at_a_time(port, photos[1], small, rounds)}
            result["load"] = phone_load(port, photos, n_requests, clients)
            result["rss_mb_after"], result["peak_rss_mb"] = round(rss_mb(process.pid), 1), peak_rss_mb(process.pid)
        finally:
            process.terminate()
            process.wait(timeout=30)
        record[name] = result
        print(json.dumps({name: result}), flush=True)
    return record


def get(port: int, path: str) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", path)
    text = connection.getresponse().read().decode()
    connection.close()
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="best")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--data-dir", help="CIFAR-10, whose first 200 test images are the good requests")
    parser.add_argument("--limit-s", type=float, default=300, help="stop each run after this long")
    parser.add_argument("--phone", action="store_true", help="the phone-photo mix instead (reduced decode on, off)")
    parser.add_argument("--rounds", type=int, default=15, help="--phone: one-at-a-time requests of each kind")
    args = parser.parse_args()
    if args.data_dir:
        from miniresnet.data import load_cifar10

        source = load_cifar10(args.data_dir).test_images[:200]
    else:
        source = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    record = {"machine": describe_machine(torch.device("cpu")), "clients": args.clients, "model": args.model}
    if args.phone:
        record |= run_phone(args.model, source, args.requests, args.clients, args.rounds)
        (ROOT / "benchmarks" / "results" / "serve_load_phone.json").write_text(json.dumps(record, indent=1) + "\n")
        return
    images = [png(image) for image in source]
    for max_batch in (32, 1):
        record[f"max_batch_{max_batch}"] = run_load(
            args.model, max_batch, images, args.requests, args.clients, args.limit_s
        )
        print(json.dumps(record[f"max_batch_{max_batch}"]), flush=True)
    record["batching_speedup"] = round(
        record["max_batch_32"]["throughput_per_sec"] / record["max_batch_1"]["throughput_per_sec"], 2
    )
    out = ROOT / "benchmarks" / "results" / "serve_load.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({"batching_speedup": record["batching_speedup"]}))


if __name__ == "__main__":
    main()
