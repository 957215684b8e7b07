"""The built-in corpus: over 1.5 MB of English from CPython's docs, the same every time."""

import hashlib

import gptwo.data.builtin as builtin
from gptwo.data.shard_corpus import prepare


def digest(documents):
    return hashlib.sha256("\0".join(documents).encode()).hexdigest()


def test_builtin_corpus_is_large_english_and_deterministic(tmp_path):
    first = builtin.builtin_documents()
    builtin._builtin_documents.cache_clear()
    second = builtin.builtin_documents()
    assert first == second and first is not second
    assert digest(first) == digest(second)
    text = "\n".join(first)
    assert len(text.encode("utf-8")) > 1_500_000
    words = text.split()
    assert sum(w.lower() in {"the", "a", "of", "to", "is", "and"} for w in words) / len(words) > 0.08  # English prose
    assert any(d.startswith('The "if" statement') for d in first)  # a pydoc reference topic
    assert any(d.startswith("json\n\nJSON (JavaScript Object Notation)") for d in first)  # a module's docstrings
    assert not any(d.startswith("test.") for d in first)


def test_prepare_builtin(tmp_path):
    meta = prepare(["builtin"], str(tmp_path / "out"), progress=False)
    assert meta["train_tokens"] > 400_000 and meta["val_tokens"] > 1_000
    assert meta["splits"]["val"]["documents"] >= 1 and meta["val_bytes"] > meta["val_tokens"]
