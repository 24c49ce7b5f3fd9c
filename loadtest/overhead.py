"""What sharpen adds over its upstream: direct vs through sharpen, interleaved A/B rounds, one run.

    .venv/bin/python loadtest/overhead.py [--clients aiohttp,httpx] [--requests 800] [--concurrency 16]
        [--ttft 0.02] [--rounds 3] [--throughput]

Starts the scripted fake upstream (fixed latency) and ``sharpen serve --upstream`` once per
upstream HTTP client, then for each: non-streamed latency (added p50/p99), streamed time to
the first content chunk (added p50/p99) and the requests/s ratio. With ``--throughput`` it also
runs the 256-concurrent, 500 ms-upstream round. The load generator is aiohttp (httpx's client
cannot load a fast proxy on 2 cores). Everything runs on 127.0.0.1 with bounded request counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
BODY = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, seconds: float) -> None:
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


async def one(session: aiohttp.ClientSession, url: str, stream: bool) -> float:
    t0 = time.perf_counter()
    async with session.post(url, json=dict(BODY, stream=stream)) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
        if not stream:
            await r.read()
            return time.perf_counter() - t0
        async for raw in r.content:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                d = json.loads(line[6:])
                if d.get("choices") and (d["choices"][0].get("delta") or {}).get("content"):
                    first = time.perf_counter() - t0
                    async for _ in r.content:  # drain, as a real client would
                        pass
                    return first
    raise RuntimeError("no content chunk")


async def load(base: str, n: int, c: int, stream: bool) -> tuple[list[float], float]:
    sem = asyncio.Semaphore(c)
    lat: list[float] = []
    conn = aiohttp.TCPConnector(limit=c)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as s:

        async def task() -> None:
            async with sem:
                lat.append(await one(s, base + "/chat/completions", stream))

        t = time.perf_counter()
        await asyncio.gather(*[task() for _ in range(n)])
        return lat, n / (time.perf_counter() - t)


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))] * 1000


async def ab(direct: str, proxy: str, n: int, c: int, rounds: int, stream: bool) -> dict[str, float]:
    await load(direct, 100, 8, stream)
    await load(proxy, 100, 8, stream)
    d50, d99, p50, p99, rd, rp = [], [], [], [], [], []
    for _ in range(rounds):
        d, drps = await load(direct, n, c, stream)
        p, prps = await load(proxy, n, c, stream)
        d50.append(pct(d, 50)), d99.append(pct(d, 99)), p50.append(pct(p, 50)), p99.append(pct(p, 99))
        rd.append(drps), rp.append(prps)
    med = statistics.median
    return {"direct_p50": med(d50), "proxy_p50": med(p50), "added_p50": med(p50) - med(d50),
            "added_p99": med(p99) - med(d99), "rps_ratio": med(rp) / med(rd)}


def start(cmd: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", default="aiohttp,httpx")
    ap.add_argument("--requests", type=int, default=800)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ttft", type=float, default=0.02)
    ap.add_argument("--throughput", action="store_true", help="also 256 concurrent against a 500 ms upstream")
    a = ap.parse_args()
    sharpen = str(Path(sys.executable).parent / "sharpen")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        fast, slow = free_port(), free_port()
        for port, ttft in ((fast, a.ttft), (slow, 0.5)):
            fake = [sys.executable, "-m", "tests.fakes.upstream", "--port", str(port), "--ttft", str(ttft)]
            procs.append(start(fake))
            wait_http(f"http://127.0.0.1:{port}/health", 20)
        print(f"fake upstream: {a.ttft * 1000:.0f} ms to first token; {a.concurrency} concurrent clients; "
              f"{a.requests} requests x {a.rounds} interleaved rounds")
        print(f"{'client':8} {'mode':7} {'direct p50':>11} {'added p50':>10} {'added p99':>10} {'rps ratio':>10}")
        for client in a.clients.split(","):
            for upstream_port, rows in ((fast, ("json", "stream")), (slow, ("256@500ms",) if a.throughput else ())):
                if not rows:
                    continue
                port = free_port()
                p = start([sharpen, "serve", "--upstream", f"http://127.0.0.1:{upstream_port}/v1", "--port", str(port),
                           "--upstream-client", client])
                procs.append(p)
                wait_http(f"http://127.0.0.1:{port}/health", 60)
                direct, proxy = f"http://127.0.0.1:{upstream_port}/v1", f"http://127.0.0.1:{port}/v1"
                for mode in rows:
                    if mode == "256@500ms":
                        r = asyncio.run(ab(direct, proxy, 2000, 256, 2, False))
                    else:
                        r = asyncio.run(ab(direct, proxy, a.requests, a.concurrency, a.rounds, mode == "stream"))
                    print(f"{client:8} {mode:7} {r['direct_p50']:9.2f}ms {r['added_p50']:8.2f}ms "
                          f"{r['added_p99']:8.2f}ms {r['rps_ratio']:10.2f}", flush=True)
                p.terminate()
                p.wait(10)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
