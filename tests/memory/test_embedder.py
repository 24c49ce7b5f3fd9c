"""Embedders: the hashing reference (deterministic, unit norm) and the real all-MiniLM-L6-v2."""

from __future__ import annotations

import numpy as np
import pytest

from memory.embedder import HashingEmbedder, MiniLMEmbedder, make_embedder

TEXTS = ["What is the capital of France?", "Sort a list of integers in Python", "", "hello hello hello"]


def test_hashing_is_deterministic_and_unit_norm() -> None:
    a = HashingEmbedder().embed(TEXTS)
    b = HashingEmbedder().embed(TEXTS)  # a fresh instance: no state, no process-dependent hash seed
    assert a.dtype == np.float32 and a.shape == (len(TEXTS), 384)
    assert np.array_equal(a, b)
    norms = np.linalg.norm(a, axis=1)
    assert np.allclose(norms[[0, 1, 3]], 1.0, atol=1e-5)
    assert norms[2] == 0.0  # no words: the zero vector, not NaN
    assert not np.isnan(a).any()


def test_hashing_similar_wording_is_closer() -> None:
    v = HashingEmbedder().embed(["what is the capital of france", "what is the capital of spain",
                                 "bake bread with yeast and flour"])
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.3
    assert float(v[0] @ v[0]) == pytest.approx(1.0, abs=1e-5)


def test_hashing_dimension_and_factory() -> None:
    assert HashingEmbedder(dim=64).embed(["x y z"]).shape == (1, 64)
    assert isinstance(make_embedder("hashing"), HashingEmbedder)
    assert isinstance(make_embedder("minilm"), MiniLMEmbedder)  # lazy: nothing loaded yet
    with pytest.raises(ValueError, match="unknown embedder"):
        make_embedder("word2vec")


@pytest.mark.real
def test_minilm_paraphrases_are_closer_than_unrelated() -> None:
    emb = MiniLMEmbedder()
    v = emb.embed([
        "How do I reverse a list in Python?",
        "What is the way to invert the order of a Python list?",
        "The weather in Lisbon is sunny today.",
        "Which city is the capital of France?",
        "What is France's capital city?",
        "How many legs does a spider have?",
    ])
    assert v.shape == (6, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    sim = v @ v.T
    assert sim[0, 1] > sim[0, 2] + 0.3
    assert sim[3, 4] > sim[3, 5] + 0.3
    assert sim[0, 1] > sim[0, 3] and sim[3, 4] > sim[3, 0]
    # alone or in a (padded) batch: the same vector, up to float rounding
    assert np.allclose(v[:1], emb.embed(["How do I reverse a list in Python?"]), atol=1e-5)
