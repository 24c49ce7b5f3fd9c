"""``sharpen eval`` and ``sharpen calibrate``.

    sharpen eval --dataset gsm_symbolic+basic_arithmetic --strategies passthrough,self_consistency:n=8,\\
        best_of_n:n=8 [--server URL | --upstream URL] [--limit 50] [--seed 0] [--out evals-out]
    sharpen calibrate --results evals-out/results.jsonl

With ``--server`` the items go to a running sharpen; otherwise a sharpen is started in this
process on a loopback port, in front of ``--upstream`` or of the embedded default backend, by the
``LocalServer`` the CLI (the composition root) hands in: evals never import the server.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from evals import datasets, report
from evals.calibrate import calibrate, calibrate_weights
from evals.runner import Runner, parse_strategies

LocalServer = Callable[[str | None, str | None], AbstractContextManager[str]]
"""Starts a sharpen for the eval's duration: ``(config path, upstream URL or None for the
embedded backend) -> context manager yielding its base URL (…/v1)``."""


def add_parsers(sub: Any, local_server: LocalServer) -> None:
    e = sub.add_parser("eval", help="measure strategies on a dataset")
    e.add_argument("--dataset", required=True, help="JSONL path or reasoning-gym names joined by '+' "
                   f"(built in: {', '.join(datasets.BUILTIN)})")
    e.add_argument("--strategies", default="passthrough,self_consistency:n=8,best_of_n:n=8")
    e.add_argument("--server", help="a running sharpen's base URL (…/v1)")
    e.add_argument("--upstream", help="start sharpen in-process in front of this OpenAI-compatible URL")
    e.add_argument("--model", help="model name (default: the server's first base model)")
    e.add_argument("--api-key", default=None)
    e.add_argument("--limit", type=int, default=None)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", default="evals-out")
    e.add_argument("--concurrency", type=int, default=4)
    e.add_argument("--max-tokens", type=int, default=512)
    e.add_argument("--baseline", default=None, help="strategy label to compare against (default: the first)")
    e.add_argument("--config", default=None)
    e.set_defaults(func=functools.partial(run_eval, local_server=local_server))
    c = sub.add_parser("calibrate", help="choose auto's thresholds (or best_of_n's weights) from eval results")
    c.add_argument("--results", required=True)
    c.add_argument("--gain", type=float, default=0.9, help="share of best_of_n's accuracy gain to keep")
    c.add_argument("--greedy", default="passthrough", help="label of the greedy baseline in the results")
    c.add_argument("--weights", action="store_true",
                   help="fit best_of_n's verifier weights and vote temperature from per-candidate verdicts")
    c.add_argument("--strategy", default=None, help="with --weights: the results' strategy label to fit on")
    c.add_argument("--unlabelled", action="store_true", help="with --weights: fit to majority answers, not labels")
    c.add_argument("--write", default=None, help="with --weights: write the config section to this YAML file")
    c.set_defaults(func=run_calibrate)


def run_eval(args: argparse.Namespace, local_server: LocalServer) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    items = datasets.load(args.dataset, limit=args.limit, seed=args.seed)
    specs = parse_strategies(args.strategies)
    out = Path(args.out)
    server = local_server(args.config, args.upstream) if not args.server else _given(args.server)
    with server as base:
        runner = Runner(base, model=args.model, api_key=args.api_key, out=out, concurrency=args.concurrency,
                        max_tokens=args.max_tokens)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn()) as bar:
            task = bar.add_task(f"{len(items)} items x {len(specs)} strategies", total=len(items) * len(specs))
            bar.update(task, completed=len(items) * len(specs) - _todo(out, items, specs))
            results = asyncio.run(runner.run(items, specs, advance=lambda: bar.advance(task)))
    summary = report.write(results, out, args.baseline or specs[0].label, f"sharpen eval: {args.dataset}")
    print(report.table(summary["rows"]))
    print(f"results: {results}\nreport: {summary['report']}")
    return 0


def _todo(out: Path, items: list[datasets.Item], specs: list[Any]) -> int:
    from evals.runner import completed

    done = completed(out / "results.jsonl")
    return sum(1 for s in specs for i in items if (s.label, i.id) not in done)


@contextmanager
def _given(url: str) -> Iterator[str]:
    yield url


def run_calibrate(args: argparse.Namespace) -> int:
    if args.weights:
        result = calibrate_weights(Path(args.results), strategy=args.strategy, labelled=not args.unlabelled)
        if args.write:  # a config file for ``sharpen serve --config`` (checked when the server starts)
            import yaml

            Path(args.write).write_text(yaml.safe_dump(result["config"], sort_keys=False))
        print(json.dumps(result, indent=2))
        return 0
    result = calibrate(Path(args.results), greedy_label=args.greedy, gain=args.gain)
    print(json.dumps({k: v for k, v in result.items() if k != "options"}, indent=2))
    return 0
