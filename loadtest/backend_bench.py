"""What the embedded vLLM's CPU settings cost: weight dtype x LoRA slots, one request vs one n=8 request.

    flock /tmp/sharpen-heavy.lock .venv/bin/python loadtest/backend_bench.py
        [--model qwen2.5-coder-0.5b-instruct] [--dtypes bfloat16,float32] [--lora off,on]
        [--isa native,avx2] [--reps 3] [--tokens 128] [--n 8] [--prefill-mix ROUNDS] [--out loadtest/results]

For every combination it starts vLLM (``server.backend.vllm_process.VLLMProcess`` with the
dtype and LoRA choice forced in ``BackendSettings``; everything else as the backend picks it
here), warms it up, then ``--reps`` times: one request of ``--tokens`` generated tokens
(``ignore_eos``, so every run generates exactly that many) and one request with ``n=--n``.
Straight against vLLM's OpenAI API: no proxy in between. Reports tokens/s (completion tokens /
wall time), medians and ranges, with the 1-minute load average beside each figure (the machine
may be shared) and the CPU model and flags on top.

``--isa avx2`` emulates a CPU without AVX-512/AMX on this one: oneDNN's documented ISA cap
(``ONEDNN_MAX_CPU_ISA=AVX2``), ATen's (``ATEN_CPU_CAPABILITY=avx2``), and torch's CPU feature
probes patched to say "no AVX-512, no AVX-512 BF16, no AMX" in every vLLM process (a
``sitecustomize`` module), so vLLM loads its AVX2 kernel library and its non-AMX attention.
Caches, clock and memory bandwidth stay this machine's: the figures are an emulation, not a
measurement of an AVX2 CPU.

Raw rows go to ``<out>/backend_bench-<model>-<time>.jsonl``; the table prints as Markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.backend.cpu import CpuInfo  # noqa: E402
from server.backend.vllm_process import VLLMProcess  # noqa: E402
from server.backend.weights import PreparedModel, prepare_model  # noqa: E402
from server.settings import BackendSettings, Settings  # noqa: E402

PROMPT = "Write a detailed story about a lighthouse keeper who finds a message in a bottle."

# Runs in every Python process of the emulated vLLM (PYTHONPATH), before vLLM probes the CPU.
SITECUSTOMIZE = """
import os, sys
if os.environ.get("SHARPEN_BENCH_EMULATE_AVX2") == "1":
    import torch.cpu as _cpu
    for _name in ("_is_avx512_supported", "_is_avx512_bf16_supported", "_is_avx512_vnni_supported",
                  "_is_vnni_supported", "_is_amx_tile_supported", "_is_amx_fp16_supported"):
        if hasattr(_cpu, _name):
            setattr(_cpu, _name, lambda: False)
    print(f"backend_bench: AVX2 emulation active in pid {os.getpid()}", file=sys.stderr, flush=True)
"""


class EmulatedAVX2(VLLMProcess):
    """vLLM with oneDNN, ATen and torch's feature probes capped at AVX2 (see the module docstring)."""

    site_dir: Path

    def environ(self) -> dict[str, str]:
        env = super().environ()
        env.update(ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2", SHARPEN_BENCH_EMULATE_AVX2="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.site_dir), env.get("PYTHONPATH")) if p)
        return env


def read_log(path: Path) -> str:
    return path.read_text(errors="replace")


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


_TICK = os.sysconf("SC_CLK_TCK")


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of a process group: vLLM's
    server, engine and worker. Less sensitive than wall time to other jobs sharing the cores."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2 :].split()
        if fields[2] == str(pgid):
            total += int(fields[11]) + int(fields[12])
    return total / _TICK


async def generate(
    client: httpx.AsyncClient, base: str, model: str, n: int, tokens: int, seed: int, pgid: int
) -> dict[str, Any]:
    body = {
        "model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens,
        "temperature": 0.8, "n": n, "seed": seed, "ignore_eos": True,
    }  # fmt: skip
    load = load1()
    cpu0 = await asyncio.to_thread(group_cpu_s, pgid)
    t0 = time.perf_counter()
    r = await client.post(f"{base}/chat/completions", json=body)
    wall = time.perf_counter() - t0
    cpu = await asyncio.to_thread(group_cpu_s, pgid) - cpu0
    r.raise_for_status()
    done = int(r.json()["usage"]["completion_tokens"])
    return {
        "n": n,
        "wall_s": wall,
        "completion_tokens": done,
        "tok_s": done / wall,
        "cpu_s": cpu,
        "tok_per_cpu_s": done / cpu if cpu > 0 else None,
        "load1_before": load,
    }


async def run_combo(
    args: argparse.Namespace, prepared: PreparedModel, combo: tuple[str, str, str], site_dir: Path, out: Any
) -> dict[str, Any]:
    isa, dtype, lora = combo
    settings = BackendSettings(  # type: ignore[arg-type]
        model=args.model, dtype=dtype, lora=lora, start_timeout=900, extra_args=args.vllm_arg
    )
    log_path = Path(args.scratch) / f"vllm-{isa}-{dtype}-lora-{lora}-{time.strftime('%H%M%S')}.log"
    cls = EmulatedAVX2 if isa == "avx2" else VLLMProcess
    proc = cls(settings, prepared, log_path, python=sys.executable)
    if isinstance(proc, EmulatedAVX2):
        proc.site_dir = site_dir
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    async with proc:
        start_s = time.perf_counter() - t0
        if isa == "avx2" and "AVX2 emulation active" not in await asyncio.to_thread(read_log, log_path):
            raise SystemExit(f"AVX2 emulation did not take effect; see {log_path}")
        async with httpx.AsyncClient(timeout=900, trust_env=False) as client:
            # Warm-up: first requests pay for graph and allocator set-up.
            pgid = proc.pid
            assert pgid is not None
            await generate(client, proc.base_url, proc.served_name, 1, 16, 0, pgid)
            await generate(client, proc.base_url, proc.served_name, args.n, 16, 0, pgid)
            for rep in range(args.reps):
                for n in (1, args.n):
                    row = await generate(client, proc.base_url, proc.served_name, n, args.tokens, 1000 + rep, pgid)
                    row.update(
                        isa=isa,
                        dtype=dtype,
                        lora=lora,
                        rep=rep,
                        start_s=start_s,
                        tokens=args.tokens,
                        vllm_args=args.vllm_arg,
                    )
                    rows.append(row)
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                    print(
                        f"  {isa} {dtype} lora={lora} n={n} rep {rep}: {row['tok_s']:.1f} tok/s "
                        f"({row['wall_s']:.1f} s; {row['tok_per_cpu_s'] or 0:.1f} tok per CPU-s; "
                        f"load {row['load1_before']:.2f})",
                        flush=True,
                    )
            for rnd in range(args.prefill_mix):
                mix = await prefill_mix(client, proc.base_url, proc.served_name, rnd)
                mix.update(isa=isa, dtype=dtype, lora=lora, round=rnd, load1_before=load1(), vllm_args=args.vllm_arg)
                out.write(json.dumps({"prefill_mix": mix}) + "\n")
                out.flush()
                print(f"  prefill mix ({' '.join(args.vllm_arg) or 'default'}): {mix}", flush=True)
            if args.prefix_probe:
                probe = await prefix_probe(client, proc.origin, proc.served_name)
                probe.update(isa=isa, dtype=dtype, lora=lora, vllm_args=args.vllm_arg)
                out.write(json.dumps({"prefix_probe": probe}) + "\n")
                out.flush()
                print(f"  prefix cache ({' '.join(args.vllm_arg) or 'default block size'}): {probe}", flush=True)
    return rows


async def prefill_mix(client: httpx.AsyncClient, base: str, model: str, rnd: int) -> dict[str, Any]:
    """Prefill-heavy load: 8 concurrent ~940-token prompts that share no prefix block (32 tokens
    generated each), and 0.3 s later a short streamed request. Wall time of the whole batch and
    the short request's time to its first token: what chunked prefill would change."""

    async def long(i: int) -> int:
        content = f"round {rnd} doc {i}: " + "apple " * 900 + "Summarise."
        body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 32,
                "ignore_eos": True}  # fmt: skip
        r = await client.post(f"{base}/chat/completions", json=body)
        r.raise_for_status()
        return int(r.json()["usage"]["prompt_tokens"])

    async def short() -> float:
        await asyncio.sleep(0.3)
        t = time.perf_counter()
        body = {"model": model, "messages": [{"role": "user", "content": f"Hi {rnd}"}], "max_tokens": 8, "stream": True}
        async with client.stream("POST", f"{base}/chat/completions", json=body) as s:
            async for line in s.aiter_lines():
                if '"content"' in line:
                    break
        return time.perf_counter() - t

    t0 = time.perf_counter()
    *prompts, ttft = await asyncio.gather(*(long(i) for i in range(8)), short())
    return {"wall_s": round(time.perf_counter() - t0, 2), "short_ttft_s": round(float(ttft), 2),
            "prompt_tokens": prompts[0]}  # fmt: skip


QUESTION = (
    "A shop sells pencils in boxes of 12 and erasers in packs of 5. Mia buys 7 boxes of pencils and 4 packs "
    "of erasers, then gives 3 pencils to each of her 9 classmates. How many pencils and erasers does she have left?"
)


def candidate(i: int, nonce: str) -> str:
    """A plausible ~150-token worked answer; each differs from the others from its first line."""
    return (
        f"[{nonce}-{i}] Step 1: Pencils bought: 7 boxes x 12 = 84 pencils. Step 2: Erasers bought: 4 packs x 5 = "
        f"20 erasers. Step 3: Pencils given away: 9 classmates x 3 = 27 pencils. Step 4: Pencils left: 84 - 27 = "
        f"{57 + i % 3} pencils. Step 5: The erasers were not given away, so she still has 20 erasers. Step 6: "
        f"Together she has {77 + i % 3} items left, {57 + i % 3} pencils and 20 erasers. The answer is {77 + i % 3}."
    )


async def prefix_cache_counts(client: httpx.AsyncClient, origin: str) -> tuple[float, float]:
    """vLLM's cumulative prefix-cache hits and queries (tokens), from its Prometheus /metrics."""
    text = (await client.get(f"{origin}/metrics")).text
    hits = queries = 0.0
    for line in text.splitlines():
        if line.startswith("vllm:prefix_cache_hits_total"):
            hits += float(line.rsplit(" ", 1)[1])
        elif line.startswith("vllm:prefix_cache_queries_total"):
            queries += float(line.rsplit(" ", 1)[1])
    return hits, queries


async def prefix_probe(client: httpx.AsyncClient, origin: str, model: str) -> dict[str, Any]:
    """best_of_n's verification of 8 candidates by 4 aspects (32 calls at once, as the strategy
    sends them), in two prompt layouts: the aspect instruction last (the shared system, question
    and candidate first: ``AspectVerifier.prompt``) and first. The prefix-cache hit rate of each
    batch comes from vLLM's counters. Different nonces keep the layouts from sharing blocks."""
    from strategies.base import Candidate
    from strategies.verifiers.aspect import ASPECTS, AspectVerifier

    aspects = ["approval", "math_steps", "logic_steps", "rederive"]
    result: dict[str, Any] = {}
    for layout in ("aspect_first", "aspect_last"):
        nonce = f"{layout}-{time.time_ns()}"
        bodies = []
        for i in range(8):
            cand = Candidate(index=i, content=candidate(i, nonce))
            for aspect in aspects:
                msgs = AspectVerifier(aspect).prompt(QUESTION, cand)
                if layout == "aspect_first":
                    user = msgs[1]["content"]
                    task = user[user.index("Verification task:") :]
                    msgs[1]["content"] = task + "\n\n" + user[: user.index("Verification task:")].rstrip()
                    assert ASPECTS[aspect] in msgs[1]["content"]
                bodies.append({"model": model, "messages": msgs, "max_tokens": 16, "temperature": 0.0})
        h0, q0 = await prefix_cache_counts(client, origin)
        t0 = time.perf_counter()
        replies = await asyncio.gather(*(client.post(f"{origin}/v1/chat/completions", json=b) for b in bodies))
        wall = time.perf_counter() - t0
        prompt_tokens = sum(r.json()["usage"]["prompt_tokens"] for r in replies)
        h1, q1 = await prefix_cache_counts(client, origin)
        result[layout] = {
            "hit_rate": round((h1 - h0) / max(q1 - q0, 1), 3),
            "hits": h1 - h0,
            "queries": q1 - q0,
            "prompt_tokens": prompt_tokens,
            "wall_s": round(wall, 2),
        }
    return result


def summarize(rows: list[dict[str, Any]], n_many: int) -> list[dict[str, Any]]:
    """Medians and ranges per (ISA, dtype, LoRA), in the order the combinations were run."""
    combos = list(dict.fromkeys((r["isa"], r["dtype"], r["lora"]) for r in rows))
    out = []
    for isa, dtype, lora in combos:
        mine = [r for r in rows if (r["isa"], r["dtype"], r["lora"]) == (isa, dtype, lora)]
        summary: dict[str, Any] = {"isa": isa, "dtype": dtype, "lora": lora, "reps": len(mine) // 2}
        for n in (1, n_many):
            rates = [r["tok_s"] for r in mine if r["n"] == n]
            per_cpu = [r["tok_per_cpu_s"] for r in mine if r["n"] == n and r.get("tok_per_cpu_s")]
            if not rates:
                return out
            summary[f"n{n}"] = {
                "median": statistics.median(rates),
                "min": min(rates),
                "max": max(rates),
                "per_cpu_s": statistics.median(per_cpu) if per_cpu else None,
                "load_max": max(r["load1_before"] for r in mine if r["n"] == n),
            }
        out.append(summary)
    return out


def table(summaries: list[dict[str, Any]], n: int) -> str:
    lines = [
        f"| ISA | dtype | LoRA slots | reps | one request: tok/s (range) | tok per CPU-s | one n={n} request: "
        "tok/s (range) | tok per CPU-s | load (1-min, max) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        a, b = s["n1"], s[f"n{n}"]
        isa = "AVX2 (emulated)" if s["isa"] == "avx2" else "native"
        a_cpu = f"{a['per_cpu_s']:.1f}" if a["per_cpu_s"] else "-"
        b_cpu = f"{b['per_cpu_s']:.1f}" if b["per_cpu_s"] else "-"
        lines.append(
            f"| {isa} | {s['dtype']} | {s['lora']} | {s['reps']} | {a['median']:.1f} ({a['min']:.1f}-{a['max']:.1f}) "
            f"| {a_cpu} | {b['median']:.1f} ({b['min']:.1f}-{b['max']:.1f}) | {b_cpu} "
            f"| {max(a['load_max'], b['load_max']):.2f} |"
        )
    return "\n".join(lines)


def read_rows(paths: list[str]) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            row = json.loads(line)
            if "tok_s" in row and not row.get("vllm_args"):
                rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--lora", default="off,on")
    p.add_argument("--isa", default="native,avx2")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "loadtest" / "results"))
    p.add_argument("--scratch", default=tempfile.gettempdir())
    p.add_argument("--prefix-probe", action="store_true", help="also measure the verifier prompts' prefix-cache hits")
    p.add_argument("--prefill-mix", type=int, default=0, metavar="ROUNDS",
                   help="also time 8 concurrent ~940-token prompts and a short request's first token")
    p.add_argument("--vllm-arg", action="append", default=[], help="an extra vLLM argument (repeat), e.g. --block-size")
    p.add_argument("--table", nargs="+", metavar="JSONL", help="only print the table of earlier runs' raw rows")
    args = p.parse_args()
    if args.table:
        print(table(summarize(read_rows(args.table), args.n), args.n))
        return

    cpu = CpuInfo.detect()
    print(
        f"CPU: {cpu.summary()}\nflags: {' '.join(sorted(cpu.flags))}\n"
        f"python {platform.python_version()}, model {args.model}, {args.tokens} tokens, {args.reps} reps",
        flush=True,
    )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_path = Path(args.out) / f"backend_bench-{args.model}-{stamp}.jsonl"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    prepared = prepare_model(args.model, Settings().cache_dir, python=sys.executable)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as site, out_path.open("w") as out:
        Path(site, "sitecustomize.py").write_text(SITECUSTOMIZE)
        out.write(
            json.dumps(
                {
                    "cpu": cpu.summary(),
                    "flags": sorted(cpu.flags),
                    "model": args.model,
                    "tokens": args.tokens,
                    "reps": args.reps,
                    "n": args.n,
                }
            )
            + "\n"
        )
        for isa in args.isa.split(","):
            for dtype in args.dtypes.split(","):
                for lora in args.lora.split(","):
                    rows += asyncio.run(run_combo(args, prepared, (isa, dtype, lora), Path(site), out))
    print(f"\nCPU: {cpu.summary()}\n\n{table(summarize(rows, args.n), args.n)}\n\nraw: {out_path}")


if __name__ == "__main__":
    main()
