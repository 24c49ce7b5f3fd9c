"""Converts a GGUF file into a bf16 Hugging Face folder that vLLM and peft can load.

Run as ``python -m server.backend.convert GGUF_FILE OUT_DIR``; ``server.backend.weights`` starts
it as a subprocess so that torch and transformers never load into the proxy itself (they cost
seconds and gigabytes, and the conversion's peak memory is returned to the system when it exits).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _gguf_chat_template(gguf_file: Path) -> str | None:
    """The ``tokenizer.chat_template`` string stored in the GGUF header, if any."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_file))
    field = reader.fields.get("tokenizer.chat_template")
    if field is None or not field.data:
        return None
    raw = field.parts[field.data[0]]
    return bytes(raw).decode("utf-8")


def convert(gguf_file: Path, out_dir: Path) -> None:
    """Dequantizes ``gguf_file`` to bf16 and saves model, tokenizer and chat template in ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer: Any = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model: Any = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=name, dequantize=True),
    )
    # transformers refuses to save a model that still carries its GGUF quantizer, although the
    # weights are already dequantized; dropping the quantization config makes it a plain model.
    if getattr(model, "hf_quantizer", None):
        model.hf_quantizer.remove_quantization_config(model)

    # vLLM's chat endpoint needs the template; take it from the GGUF header when the tokenizer
    # loader did not carry it over.
    if not getattr(tokenizer, "chat_template", None):
        template = _gguf_chat_template(gguf_file)
        if template is None:
            raise SystemExit(f"{gguf_file} has no chat template")
        tokenizer.chat_template = template

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("gguf_file", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    convert(args.gguf_file, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
