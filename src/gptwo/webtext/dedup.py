"""Stage 4 — remove exact and near duplicates across the whole collection.

Near duplicates are found as OpenWebText2 did: MinHash signatures of word n-gram shingles
(5-grams by default) indexed in a MinHash LSH (datasketch) at a Jaccard threshold (0.5 by
default). Candidates the index returns are confirmed on their signatures before a document is
dropped. Signatures are computed in parallel by the extract workers; the index itself is one
process, in memory (about 1 KB per kept document with 128 permutations).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np
import regex

from gptwo.errors import GptwoError
from gptwo.webtext.records import JsonlWriter, StageReport, read_jsonl

WORDS = regex.compile(r"\w+")
MINHASH_SEED = 1
MINHASH_SCHEME = "affine32"


def shingles(text: str, size: int = 5) -> set[str]:
    """The word `size`-grams of `text`, lowercased; a shorter text is one shingle."""
    words = WORDS.findall(text.lower())
    if len(words) <= size:
        return {" ".join(words)}
    return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}


@lru_cache(maxsize=4)
def _permutations(num_perm: int):
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=MINHASH_SEED).permutations


def _minhash(num_perm: int, hashvalues=None):
    from datasketch import MinHash

    return MinHash(
        num_perm=num_perm,
        seed=MINHASH_SEED,
        hashvalues=hashvalues,
        permutations=_permutations(num_perm),
        scheme=MINHASH_SCHEME,
    )


def signature(text: str, shingle_size: int = 5, num_perm: int = 128) -> np.ndarray:
    """MinHash signature (uint32[num_perm]) of `text`'s shingles."""
    minhash = _minhash(num_perm)
    minhash.update_batch([s.encode("utf-8") for s in shingles(text, shingle_size)])
    return minhash.hashvalues.astype(np.uint32)


def exact_key(text: str) -> bytes:
    """Identity of a text up to case, punctuation and whitespace."""
    return hashlib.blake2b(" ".join(WORDS.findall(text.lower())).encode("utf-8"), digest_size=16).digest()


def deduplicate(
    parts: Iterable[tuple[str | os.PathLike, str | os.PathLike]],
    out: str | os.PathLike,
    *,
    threshold: float = 0.5,
    num_perm: int = 128,
) -> StageReport:
    """Write the documents of `parts` (pairs of documents file, signatures file) to `out`,
    keeping the first of every group of exact or near duplicates."""
    from datasketch import MinHashLSH

    report = StageReport("dedup")
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    kept_signatures: list[np.ndarray] = []
    seen_exact: set[bytes] = set()
    with JsonlWriter(out) as writer:
        for docs_path, signatures_path in parts:
            signatures = _load_signatures(signatures_path, num_perm)
            fix = f"delete {docs_path} and rerun: it is extracted again from the crawl"
            for row, doc in enumerate(read_jsonl(docs_path, fix=fix)):
                if row >= len(signatures) or not isinstance(doc.get("text"), str):
                    raise GptwoError(
                        f"{docs_path} does not match its signatures {signatures_path} at line {row + 1}", fix
                    )
                report.seen += 1
                key = exact_key(doc["text"])
                if key in seen_exact:
                    report.drop("exact_duplicate")
                    continue
                sig = signatures[row]
                minhash = _minhash(num_perm, sig)
                if any(np.mean(kept_signatures[c] == sig) >= threshold for c in lsh.query(minhash)):
                    report.drop("near_duplicate")
                    continue
                seen_exact.add(key)
                lsh.insert(len(kept_signatures), minhash, check_duplication=False)
                kept_signatures.append(sig)
                writer.write(doc)
        report.kept = writer.count
    return report


def _load_signatures(path: str | os.PathLike, num_perm: int) -> np.ndarray:
    """The MinHash signatures an extract task wrote; a damaged file is an error saying how to redo it."""
    try:
        signatures = np.load(path)
    except OSError as err:
        signatures, problem = None, err.strerror or str(err)
    except (ValueError, EOFError):
        signatures, problem = None, "not a NumPy array file"
    else:
        problem = f"shape {signatures.shape}, expected (rows, {num_perm})"
    if signatures is None or signatures.ndim != 2 or signatures.shape[1] != num_perm:
        raise GptwoError(
            f"signature file {path} is damaged ({problem})",
            f"delete {path} and rerun: it is computed again from the crawl",
        )
    return signatures


def sidecar_path(docs_path: str | Path, suffix: str) -> Path:
    """A file beside a documents file: `part-00003.ndjson.zst` → `part-00003<suffix>`."""
    docs_path = Path(docs_path)
    return docs_path.with_name(docs_path.name.removesuffix(".zst").rsplit(".", 1)[0] + suffix)


def signature_path(docs_path: str | Path) -> Path:
    """Where the signatures of a documents file live (row i belongs to line i)."""
    return sidecar_path(docs_path, ".minhash.npy")
