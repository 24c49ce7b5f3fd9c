"""The LoRA training process: ``python -m adapt.train_worker JOB.json``.

Runs in its own process (never the server's event loop), with torch held to the job's thread
count. Reads chat examples (JSONL of ``{"messages": [...], "answer": "..."}``), trains a peft
LoRA adapter on the base model's Hugging Face weights with the prompt masked out of the loss,
writes ``progress.json`` as it goes (step, loss, checkpoint), honours a ``cancel`` file, and
saves the adapter (``adapter_config.json`` + safetensors) with ``lineage.json`` beside it.
Exit status 0 on success, 2 when cancelled, 1 on failure (with the error in progress.json).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class Cancelled(Exception):
    pass


def compute_dtype(torch: Any, wanted: str) -> Any:
    """The dtype the forward and backward matmuls run in: ``wanted`` ("float32", "bfloat16") or,
    for "auto", bfloat16 where this CPU does bf16 in hardware (AVX-512 BF16 or AMX) and float32
    elsewhere, where bf16 is emulated and slower. Decided here, in the training process, because
    a Ray job trains on another machine than the server's."""
    if wanted != "auto":
        return getattr(torch, wanted)
    cpu = torch.cpu
    native = any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return torch.bfloat16 if native else torch.float32


def sequence_loss(torch: Any, model: Any, ids: list[int], labels: list[int]) -> Any:
    """Mean cross-entropy over the answer tokens of one sequence, with the vocabulary-wide logits
    computed only where a label is (``logits_to_keep``): the prompt's positions need hidden states
    for attention but no projection onto the ~150k-word vocabulary, which is the largest single
    matmul of a 0.5B model."""
    first = next((i for i, t in enumerate(labels) if t != -100), len(labels))
    keep = len(ids) - first + 1  # the position before the first label predicts it
    if first == 0 or keep < 2:  # nothing to predict from, or a label at position 0: the plain loss
        return model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
    logits = model(input_ids=torch.tensor([ids]), logits_to_keep=keep).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, torch.tensor(labels[first:]), ignore_index=-100)


def train_step(torch: Any, model: Any, opt: Any, batch: list[tuple[list[int], list[int]]], dtype: Any,
               loss_fn: Any = sequence_loss) -> float:
    """One optimizer step over ``batch``; returns the batch's loss.

    One sequence at a time, the batch's gradient accumulated: the activations and the
    vocabulary-wide logits of a whole batch of long rationales (4 x ~450 tokens: 17 GB in fp32)
    ran a 24 GiB machine out of memory beside vLLM. Each sequence's loss is weighted by its share
    of the batch's answer tokens, so the step is the batch's token-mean loss, as one padded
    forward pass would give. ``loss_fn`` is ``sequence_loss`` (``loadtest/train_bench.py``
    swaps in the full-logits loss to compare)."""
    targets = [sum(1 for t in lab[1:] if t != -100) for _, lab in batch]
    total_loss = 0.0
    for (ids, lab), n in zip(batch, targets, strict=True):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_fn(torch, model, ids, lab) * (n / (sum(targets) or 1))
        loss.backward()
        total_loss += float(loss.item())
    opt.step()
    opt.zero_grad()
    return total_loss


def train(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job_dir = Path(job["job_dir"])
    progress = job_dir / "progress.json"
    hp = job["hyper"]
    torch.set_num_threads(int(hp.get("threads", 1)))
    torch.manual_seed(int(hp.get("seed", 0)))
    random.seed(int(hp.get("seed", 0)))
    state: dict[str, Any] = {"status": "loading", "step": 0, "total_steps": 0, "loss": None, "started": time.time()}
    _write(progress, state)

    tok = AutoTokenizer.from_pretrained(job["base_model_path"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # The frozen base in the compute dtype; peft keeps the adapter's own weights float32, and so
    # the optimizer's state. Autocast below runs the matmuls in ``dtype``.
    dtype = compute_dtype(torch, str(hp.get("dtype", "float32")))
    model: Any = AutoModelForCausalLM.from_pretrained(job["base_model_path"], dtype=dtype)
    if job.get("parent_adapter_path"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, job["parent_adapter_path"], is_trainable=True)
    else:
        cfg = LoraConfig(r=int(hp["rank"]), lora_alpha=int(hp["alpha"]), lora_dropout=0.0,
                         target_modules=hp["target_modules"], task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)

    rows = [json.loads(line) for line in Path(job["examples"]).read_text().splitlines() if line.strip()]
    data = []
    max_len = int(hp.get("max_len", 512))
    for r in rows:
        prompt = tok.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tok(r["answer"] + (tok.eos_token or ""), add_special_tokens=False)["input_ids"]
        ids = (p_ids + a_ids)[-max_len:]
        labels = ([-100] * len(p_ids) + a_ids)[-max_len:]  # the prompt is masked out of the loss
        data.append((ids, labels))
    if not data:
        raise ValueError("no training examples")

    bs = int(hp["batch_size"])
    steps_per_epoch = max(1, (len(data) + bs - 1) // bs)
    total = min(int(hp["max_steps"]), steps_per_epoch * int(hp["epochs"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=float(hp["learning_rate"]))
    model.train()
    state.update(status="training", total_steps=total, examples=len(data), dtype=str(dtype).removeprefix("torch."))
    _write(progress, state)
    step = 0
    while step < total:
        if not hp.get("curriculum"):  # curriculum: the examples come easy-to-hard, keep that order
            random.shuffle(data)
        for i in range(0, len(data), bs):
            if step >= total:
                break
            if (job_dir / "cancel").exists():
                raise Cancelled()
            total_loss = train_step(torch, model, opt, data[i : i + bs], dtype)
            step += 1
            state.update(step=step, loss=round(total_loss, 4))
            if step % int(hp.get("checkpoint_every", 20)) == 0 and step < total:
                ck = job_dir / "checkpoint"
                model.save_pretrained(ck)
                state["checkpoint"] = str(ck)
            _write(progress, state)

    out = Path(job["out_dir"])
    model.save_pretrained(out)
    lineage = {"base_model": job["base_model_path"], "parent_adapter": job.get("parent_adapter"),
               "data_hash": job["data_hash"], "hyper": hp, "examples": len(data), "steps": step,
               "final_loss": state["loss"], "compute_dtype": state["dtype"], "finished": time.time()}
    (out / "lineage.json").write_text(json.dumps(lineage, indent=2))
    state.update(status="done", adapter=str(out), finished=time.time())
    _write(progress, state)
    return state


def main() -> int:
    job = json.loads(Path(sys.argv[1]).read_text())
    progress = Path(job["job_dir"]) / "progress.json"
    try:
        train(job)
        return 0
    except Cancelled:
        _write(progress, {"status": "cancelled", "finished": time.time()})
        return 2
    except Exception as exc:
        _write(progress, {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                          "traceback": traceback.format_exc()[-4000:], "finished": time.time()})
        return 1


if __name__ == "__main__":
    sys.exit(main())
