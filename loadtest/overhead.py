"""What sharpen adds over its upstream: direct vs through sharpen, interleaved A/B rounds, one run.

    .venv/bin/python loadtest/overhead.py [--clients h1,aiohttp,httpx] [--requests 800] [--concurrency 16]
        [--ttft 0.02] [--rounds 3] [--throughput] [--max-rps]
        [--variant NAME:KEY=VALUE;KEY=VALUE ...] [--floor] [--warm N]

Starts the scripted fake upstream (fixed latency) and one ``sharpen serve --upstream`` per
variant: by default one per upstream HTTP client (``--clients``); with ``--variant``, one per
named set of settings given as ``SHARPEN_*`` environment variables, e.g.
``--variant 'gc-default:SHARPEN_GC_FREEZE=false;SHARPEN_GC_THRESHOLDS=[700,10,10]' --variant tuned:``.
Each round runs the direct requests and then every variant's, so all of them see the same
machine; figures are medians over the rounds. Reported: non-streamed latency (added p50/p99),
streamed time to the first content chunk (added p50/p99) and the requests/s ratio. With
``--throughput`` it also runs the 256-concurrent, 500 ms-upstream round; with ``--max-rps``, the
requests/s one sharpen worker sustains against a zero-latency upstream (64 concurrent). The load
generator is aiohttp (httpx's client cannot load a fast proxy on 2 cores), and it shares the
cores with the proxy and the fake. With ``--floor``, a bare uvicorn + aiohttp relay with no logic
(``loadtest/relay.py``) runs in the same rounds: what any Python relay adds on this host, beside
what sharpen adds. With ``--warm N``, N untimed requests go to each side right before its timed
round: a control for hosts where memory left idle for a second is slow to touch again (the first
line prints that reading), since a proxy idles through the direct round while the direct
upstream is kept busy by the proxies' rounds. The first lines print the CPU, a Python speed
reading and the idle-memory reading, since hosts differ.
Everything runs on 127.0.0.1 with bounded request counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from loadtest.machine import cpu_line, page_cost_line, python_speed  # noqa: E402

BODY = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}


@dataclass
class Variant:
    """One sharpen process: its name, upstream client and extra environment."""

    name: str
    client: str = "aiohttp"
    env: dict[str, str] = field(default_factory=dict)
    relay: bool = False  # the bare relay (loadtest/relay.py) instead of sharpen

    @classmethod
    def parse(cls, spec: str) -> Variant:
        name, _, rest = spec.partition(":")
        env = dict(kv.split("=", 1) for kv in rest.split(";") if kv)
        return cls(name, env.pop("client", "aiohttp"), env)


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


async def ab(direct: str, proxies: list[str], n: int, c: int, rounds: int, stream: bool,
             warm: int = 0) -> list[dict[str, float]]:
    """Interleaved rounds: direct, then each proxy; medians per proxy against the direct medians.
    With ``warm``, each side gets that many untimed requests right before its timed round: every
    side then starts its round as recently used as the direct upstream (which the proxies' rounds
    keep busy), so what stays is the cost of the code, not of the side's idle memory."""
    await load(direct, 100, 8, stream)
    for proxy in proxies:
        await load(proxy, 100, 8, stream)
    d50, d99, rd = [], [], []
    p50: list[list[float]] = [[] for _ in proxies]
    p99: list[list[float]] = [[] for _ in proxies]
    rp: list[list[float]] = [[] for _ in proxies]
    for _ in range(rounds):
        if warm:
            await load(direct, warm, c, stream)
        d, drps = await load(direct, n, c, stream)
        d50.append(pct(d, 50))
        d99.append(pct(d, 99))
        rd.append(drps)
        for i, proxy in enumerate(proxies):
            if warm:
                await load(proxy, warm, c, stream)
            p, prps = await load(proxy, n, c, stream)
            p50[i].append(pct(p, 50))
            p99[i].append(pct(p, 99))
            rp[i].append(prps)
    med = statistics.median
    return [{"direct_p50": med(d50), "proxy_p50": med(p50[i]), "added_p50": med(p50[i]) - med(d50),
             "added_p99": med(p99[i]) - med(d99), "rps_ratio": med(rp[i]) / med(rd), "rps": med(rp[i]),
             "direct_rps": med(rd)} for i in range(len(proxies))]


def start(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                            env={**os.environ, **(env or {})})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", default="h1,aiohttp")
    ap.add_argument("--variant", action="append", default=[], help="NAME:KEY=VALUE;...; replaces --clients")
    ap.add_argument("--requests", type=int, default=800)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ttft", type=float, default=0.02)
    ap.add_argument("--throughput", action="store_true", help="also 256 concurrent against a 500 ms upstream")
    ap.add_argument("--max-rps", action="store_true", help="also req/s against a zero-latency upstream")
    ap.add_argument("--only-max-rps", action="store_true", help="only the zero-latency req/s rounds")
    ap.add_argument("--floor", action="store_true", help="also a bare uvicorn + aiohttp relay, in the same rounds")
    ap.add_argument("--warm", type=int, default=0, metavar="N",
                    help="N untimed requests to each side right before its timed round (idle-memory control)")
    a = ap.parse_args()
    variants = [Variant.parse(v) for v in a.variant] or [Variant(c, c) for c in a.clients.split(",")]
    if a.floor:
        variants.append(Variant("bare-relay", relay=True))
    print(f"CPU: {cpu_line()}; Python speed: {python_speed():.2f} s for 10M additions; {page_cost_line()}")
    sharpen = str(Path(sys.executable).parent / "sharpen")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        fakes = {"fast": a.ttft, "slow": 0.5, "zero": 0.0}
        ports: dict[str, int] = {}
        for key, ttft in fakes.items():
            ports[key] = free_port()
            fake = [sys.executable, "-m", "tests.fakes.upstream", "--port", str(ports[key]), "--ttft", str(ttft)]
            procs.append(start(fake))
            wait_http(f"http://127.0.0.1:{ports[key]}/health", 20)
        print(f"fake upstream: {a.ttft * 1000:.0f} ms to first token; {a.concurrency} concurrent clients; "
              f"{a.requests} requests x {a.rounds} interleaved rounds"
              f"{f', {a.warm} untimed before each side' if a.warm else ''}; load {os.getloadavg()[0]:.2f}")
        print(f"{'variant':12} {'mode':9} {'direct p50':>11} {'added p50':>10} {'added p99':>10} {'rps ratio':>10} "
              f"{'rps':>7}")
        modes = [] if a.only_max_rps else [("fast", "json"), ("fast", "stream")]
        if a.throughput and not a.only_max_rps:
            modes.append(("slow", "256@500ms"))
        if a.max_rps or a.only_max_rps:
            modes.append(("zero", "max-rps"))
        for key, mode in modes:
            upstream = f"http://127.0.0.1:{ports[key]}/v1"
            started = []
            for v in variants:
                port = free_port()
                cmd = ([sys.executable, "-m", "loadtest.relay", "--upstream", upstream, "--port", str(port)]
                       if v.relay else
                       [sharpen, "serve", "--upstream", upstream, "--port", str(port), "--upstream-client", v.client])
                p = start(cmd, v.env)
                procs.append(p)
                started.append((p, f"http://127.0.0.1:{port}/v1"))
            for _, url in started:
                wait_http(url.removesuffix("/v1") + "/health", 60)
            urls = [url for _, url in started]
            if mode == "256@500ms":
                rows = asyncio.run(ab(upstream, urls, 2000, 256, 2, False))
            elif mode == "max-rps":
                rows = asyncio.run(ab(upstream, urls, 4000, 64, a.rounds, False))
            else:
                rows = asyncio.run(ab(upstream, urls, a.requests, a.concurrency, a.rounds, mode == "stream", a.warm))
            for v, r in zip(variants, rows, strict=True):
                print(f"{v.name:12} {mode:9} {r['direct_p50']:9.2f}ms {r['added_p50']:8.2f}ms "
                      f"{r['added_p99']:8.2f}ms {r['rps_ratio']:10.2f} {r['rps']:7.0f}", flush=True)
            for p, _ in started:
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
