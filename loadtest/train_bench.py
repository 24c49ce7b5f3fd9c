"""What a LoRA training step costs on this CPU: the adaptation trainer's loss and dtype choices.

    flock /tmp/sharpen-heavy.lock .venv/bin/python -m loadtest.train_bench
        [--model qwen2.5-coder-0.5b-instruct] [--examples 16] [--steps 4] [--threads 2]
        [--variants full-float32,answer-float32,answer-bfloat16] [--out loadtest/results]

Builds ``--examples`` chat examples shaped like the adaptation loop's: a reasoning-gym
``letter_counting`` question as the prompt and a spelled-out rationale ending "The answer is N."
as the answer (80-250 answer tokens; only the lengths matter for speed). Then, per variant, a
fresh LoRA (the shipped rank, alpha and target modules, same seed) trains ``--steps`` steps of
batch 4 with ``adapt.train_worker.train_step`` (one sequence at a time, gradients accumulated),
after one untimed warm-up step:

- ``full-float32``: the loss from the model's own ``labels`` path, logits over every position
  (what the worker did before 2026-12-04);
- ``answer-<dtype>``: ``adapt.train_worker.sequence_loss`` (logits only where a label is), with
  the matmuls autocast to ``<dtype>``.

Reports seconds per step (median, range) and the first step's loss per variant: the float32
variants must agree to ~1e-4 (the same loss computed two ways); bf16 shows how far it drifts.
The CPU model and flags and the load average print beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

from adapt.config import AdaptConfig
from adapt.train_worker import compute_dtype, sequence_loss, train_step
from loadtest.machine import cpu_line


def examples(tok: Any, n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    import reasoning_gym

    ds = reasoning_gym.create_dataset("letter_counting", seed=seed, size=n)
    rng = random.Random(seed)
    out = []
    for entry in ds:
        words = [w for w in entry["question"].replace('"', " ").split() if w.isalpha()][-rng.randint(6, 14):]
        steps = "\n".join(f"- {w}: " + ", ".join(w) + f" -> {w.count('e')}" for w in words)
        answer = f"Let's go word by word and count.\n{steps}\nAdding these up gives {entry['answer']}.\n" \
                 f"The answer is {entry['answer']}."
        msgs = [{"role": "user", "content": entry["question"] + "\nEnd with 'The answer is N.'"}]
        prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tok(answer + tok.eos_token, add_special_tokens=False)["input_ids"]
        out.append((p_ids + a_ids, [-100] * len(p_ids) + a_ids))
    return out


def full_loss(torch: Any, model: Any, ids: list[int], labels: list[int]) -> Any:
    """The loss from the model's own ``labels`` path: logits at every position (the worker before)."""
    return model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss


def run_variant(name: str, model_path: str, data: list[tuple[list[int], list[int]]], steps: int) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kind, dtype_name = name.split("-")
    hp = AdaptConfig()
    torch.manual_seed(0)
    # "weights16": the frozen base held in bf16 too (peft keeps the adapter's own weights float32)
    model: Any = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.bfloat16 if kind == "weights16" else torch.float32)
    model = get_peft_model(model, LoraConfig(r=hp.rank, lora_alpha=hp.alpha, lora_dropout=0.0,
                                             target_modules=hp.target_modules, task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    dtype = compute_dtype(torch, dtype_name)
    model.train()
    times, losses = [], []
    loss_fn = full_loss if kind == "full" else sequence_loss
    for step in range(steps + 1):
        batch = data[(step * 4) % len(data):][:4]
        t0 = time.perf_counter()
        total = train_step(torch, model, opt, batch, dtype, loss_fn)
        if step:  # step 0 warms up oneDNN's kernels and the allocator
            times.append(time.perf_counter() - t0)
        losses.append(round(total, 5))
    return {"variant": name, "dtype": str(dtype).removeprefix("torch."), "s_per_step": times,
            "median_s": statistics.median(times), "first_loss": losses[0], "losses": losses,
            "load_avg": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="full-float32,answer-float32,answer-bfloat16")
    ap.add_argument("--out", default="loadtest/results")
    args = ap.parse_args()
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    path = str(Path.home() / ".cache/sharpen/models" / args.model)
    tok = AutoTokenizer.from_pretrained(path)
    data = examples(tok, args.examples, seed=7)
    p_len = [sum(1 for t in lab if t == -100) for _, lab in data]
    a_len = [len(ids) - p for (ids, _), p in zip(data, p_len, strict=True)]
    print(f"# {cpu_line()}; torch {torch.__version__}, {args.threads} threads")
    print(f"# {len(data)} examples: prompt {min(p_len)}-{max(p_len)} tokens, answer {min(a_len)}-{max(a_len)} tokens")
    rows = [run_variant(v, path, data, args.steps) for v in args.variants.split(",")]
    base = rows[0]["median_s"]
    print("\n| variant | compute dtype | s/step (batch 4), median [range] | vs first | first-step loss | load |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        spread = f"{min(r['s_per_step']):.2f}-{max(r['s_per_step']):.2f}"
        print(f"| {r['variant']} | {r['dtype']} | {r['median_s']:.2f} [{spread}] | {base / r['median_s']:.2f}x "
              f"| {r['first_loss']:.5f} | {r['load_avg']:.1f} |")
    out = Path(args.out) / f"train_bench-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({**r, "cpu": cpu_line(), "threads": args.threads}) + "\n" for r in rows))
    print(f"\nrows: {out}")


if __name__ == "__main__":
    main()
