"""Offline selection: keep a band of documents by their scores (`gptwo select filter`), or resample
a corpus toward a target sample with hashed n-gram importance weights (`gptwo select dsir`).

Both write the kept documents, in input order, as `{"text": ...}` lines in a .jsonl.zst file that
`gptwo prepare` reads. Document ids are positions in the input stream, as `gptwo select score` writes.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from gptwo.errors import GptwoError

BANDS = ("low", "middle", "high")
# low loss: drop what the model finds noisy; high reducible: RHO-LOSS
DEFAULT_BAND = {"loss": "low", "reducible": "high"}


def read_scores(path: str, by: str) -> dict[int, float]:
    """id → score (`loss` or `reducible`) from a `gptwo select score` output file. A NaN or infinite score
    (a model that overflowed) is kept as NaN here: `finite_scores` drops those, and callers say how many."""
    from gptwo.fileio import read_json_lines

    if by not in DEFAULT_BAND:
        raise GptwoError(f"--by {by!r} is unknown", "use --by loss or --by reducible")
    hint = "score with --reference R to get 'reducible'" if by == "reducible" else "re-run 'gptwo select score'"
    scores: dict[int, float] = {}
    if not os.path.isfile(path) and not os.path.isdir(path):
        raise GptwoError(f"scores file {path} not found", "run 'gptwo select score' first")
    for number, row in read_json_lines(path, hint):
        doc_id, score = row.get("id"), row.get(by)
        numeric = isinstance(score, (int, float)) and not isinstance(score, bool)
        if isinstance(doc_id, bool) or not isinstance(doc_id, int) or doc_id < 0 or not numeric:
            raise GptwoError(f"{path}:{number} has no numeric '{by}' with an 'id'", hint)
        if doc_id in scores:
            raise GptwoError(f"{path}:{number} scores document {doc_id} a second time", "re-run 'gptwo select score'")
        scores[doc_id] = float(score) if math.isfinite(score) else math.nan
    if not scores:
        raise GptwoError(f"scores file {path} is empty", "run 'gptwo select score' on the same inputs first")
    return scores


def finite_scores(scores: dict[int, float], path: str, by: str) -> dict[int, float]:
    """The scores that are numbers (NaN and infinities left out: such documents are never kept); all of them
    non-finite is an error (nothing to rank)."""
    finite = {i: v for i, v in scores.items() if math.isfinite(v)}
    if not finite:
        raise GptwoError(
            f"every {by} in {path} is NaN or infinite, so there is nothing to rank",
            "score with a model whose losses are finite (check it with 'gptwo eval ppl')",
        )
    return finite


def kept_ids(scores: dict[int, float], keep: float, band: str) -> set[int]:
    """The ids of the `keep` fraction of documents in the low, middle or high band of scores."""
    if not 0.0 < keep <= 1.0:
        raise GptwoError(f"--keep {keep} is outside (0, 1]", "give the fraction of documents to keep, e.g. --keep 0.5")
    if band not in BANDS:
        raise GptwoError(f"--band {band!r} is unknown", "use --band low, middle or high")
    ranked = sorted(scores, key=lambda i: (scores[i], i))
    count = max(1, round(keep * len(ranked)))
    start = {"low": 0, "middle": (len(ranked) - count) // 2, "high": len(ranked) - count}[band]
    return set(ranked[start : start + count])


def _nonempty_documents(inputs: Sequence[str], text_field: str) -> Iterator[tuple[int, str]]:
    """(id, text) of each non-empty input document, ids counted over all documents as `select score` counts them."""
    from gptwo.data.sources import iter_documents

    for doc_id, text in enumerate(iter_documents(inputs, text_field)):
        if text.strip():
            yield doc_id, text


def filter_documents(
    inputs: Sequence[str],
    scores_path: str,
    out: str,
    by: str = "loss",
    keep: float = 0.5,
    band: str | None = None,
    text_field: str = "text",
    overwrite: bool = False,
) -> dict:
    """Write the documents of `inputs` whose score falls in the kept band to `out`; returns counts."""
    check_output_name(out)
    check_not_an_input(out, [*inputs, scores_path])
    check_replaceable(out, overwrite)
    scores = read_scores(scores_path, by)
    finite = finite_scores(scores, scores_path, by)
    band = band or DEFAULT_BAND[by]
    keep_set = kept_ids(finite, keep, band)
    seen: list[int] = []

    def kept() -> Iterator[str]:
        for doc_id, text in _nonempty_documents(inputs, text_field):
            if doc_id not in scores:
                raise GptwoError(
                    f"document {doc_id} of the inputs has no score in {scores_path}",
                    "score the same inputs (rerun 'gptwo select score' to finish an interrupted run)",
                )
            seen.append(doc_id)
            if doc_id in keep_set:
                yield text
        if len(seen) != len(scores):  # raised inside the writer, so no output file is left behind
            raise GptwoError(
                f"{scores_path} scores {len(scores)} documents but the inputs hold {len(seen)}", "score the same inputs"
            )

    written = write_documents(out, kept())
    return {"documents": len(seen), "kept": written, "band": band, "by": by, "not_finite": len(scores) - len(finite)}


def check_not_an_input(out: str, inputs: Sequence[str]) -> None:
    """Refuse an output that is one of the inputs (by resolved path or same file) or lies inside an input folder:
    writing it would replace an input, or feed the output back in as one."""
    target = os.path.realpath(out)
    for path in inputs:
        if not os.path.exists(path):
            continue  # builtin, hf:NAME
        source = os.path.realpath(path)
        same = target == source or (os.path.exists(out) and os.path.samefile(out, path))
        if same or (os.path.isdir(source) and os.path.commonpath([source, target]) == source):
            where = "is" if same else "lies inside"
            raise GptwoError(f"--out {out} {where} the input {path}", "write the output somewhere outside the inputs")


def check_replaceable(out: str, overwrite: bool) -> None:
    """An existing `out` is replaced only when it is a document file this command writes (zstandard JSON lines of
    `{"text": ...}`), or with `overwrite`; anything else there is the user's and is refused before any work."""
    if overwrite or not os.path.lexists(out):
        return
    if os.path.isdir(out):
        raise GptwoError(f"--out {out} is a folder", "name a .jsonl.zst file")
    try:
        import zstandard

        with open(out, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as reader:
            first = reader.read(1 << 16).split(b"\n", 1)[0]
        ours = first == b"" or set(json.loads(first)) == {"text"}
    except Exception:  # noqa: BLE001 - not zstandard, not JSON, not an object: not a file of ours
        ours = False
    if not ours:
        raise GptwoError(
            f"--out {out} exists and is not a document file written by gptwo select",
            "choose a new file, or pass --overwrite to replace it",
        )


def check_output_name(out: str) -> None:
    """Outputs are .jsonl.zst (checked before any work is done)."""
    if not out.endswith(".jsonl.zst"):
        raise GptwoError(f"--out {out} does not end in .jsonl.zst", "name the output like kept.jsonl.zst")


def write_documents(out: str, texts: Iterable[str]) -> int:
    """Stream `{"text": ...}` lines into a zstandard file, atomically (temporary file, then rename);
    returns the count."""
    try:
        import zstandard
    except ModuleNotFoundError:
        raise GptwoError("writing .jsonl.zst needs the zstandard package", "pip install 'gptwo[data]'") from None
    check_output_name(out)
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(out))
    count = 0
    try:
        with os.fdopen(fd, "wb") as raw:
            with zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False) as writer:
                for text in texts:
                    writer.write((json.dumps({"text": text}) + "\n").encode("utf-8"))
                    count += 1
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return count


# ---------------------------------------------------------------- DSIR (Xie et al. 2023)
_WORD = re.compile(r"\w+|[^\w\s]+")  # words, and runs of other symbols
SMOOTHING = 0.01  # pseudo-count per bucket: small, so a small target sample is not flattened toward uniform


# Each bucket costs three float64 arrays (target counts, raw counts, log ratio); beyond this a count is a typo.
MAX_BUCKETS = 1 << 24
BUCKET_ARRAYS = 3


def check_buckets(buckets: int) -> None:
    """A bucket count that is a positive integer within MAX_BUCKETS (its memory estimated in the error)."""
    if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
        raise GptwoError(f"--buckets {buckets!r} must be a positive integer", "use e.g. --buckets 10000")
    if buckets > MAX_BUCKETS:
        need = buckets * 8 * BUCKET_ARRAYS / 2**30
        raise GptwoError(
            f"--buckets {buckets:,} would need about {need:,.1f} GiB of memory "
            f"({BUCKET_ARRAYS} arrays of 8 bytes a bucket)",
            f"use at most {MAX_BUCKETS:,} buckets (DSIR uses 10,000)",
        )


def bucket_ids(text: str, buckets: int) -> np.ndarray:
    """The buckets of the text's lower-cased word (and symbol-run) unigrams and bigrams, one per n-gram
    (DSIR's features)."""
    words = _WORD.findall(text.lower())
    grams = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
    return np.fromiter((zlib.crc32(g.encode()) % buckets for g in grams), dtype=np.int64, count=len(grams))


def _log_distribution(counts: np.ndarray) -> np.ndarray:
    """Log of a bag-of-n-grams distribution, smoothed with a small pseudo-count."""
    smoothed = counts + SMOOTHING
    return np.log(smoothed / smoothed.sum())


def _bucket_counts(texts: Iterable[str], buckets: int) -> np.ndarray:
    counts = np.zeros(buckets, dtype=np.float64)
    for text in texts:
        np.add.at(counts, bucket_ids(text, buckets), 1.0)
    return counts


def dsir_weights(
    inputs: Sequence[str], target: Sequence[str], buckets: int = 10000, text_field: str = "text"
) -> dict[int, float]:
    """id → log importance weight log p_target(x) − log p_raw(x) of every non-empty input document."""
    from gptwo.data.sources import iter_documents

    check_buckets(buckets)
    target_counts = _bucket_counts((t for t in iter_documents(target, text_field) if t.strip()), buckets)
    if not target_counts.any():
        raise GptwoError("the --target sample holds no words", "give target documents with text")
    raw_counts = _bucket_counts((t for _, t in _nonempty_documents(inputs, text_field)), buckets)
    ratio = _log_distribution(target_counts) - _log_distribution(raw_counts)
    del target_counts, raw_counts
    return {
        doc_id: float(ratio[bucket_ids(text, buckets)].sum())
        for doc_id, text in _nonempty_documents(inputs, text_field)
    }


def dsir_resample(
    inputs: Sequence[str],
    target: Sequence[str],
    out: str,
    keep: float = 0.5,
    buckets: int = 10000,
    seed: int = 0,
    text_field: str = "text",
    overwrite: bool = False,
) -> dict:
    """Keep `keep` of the documents, drawn without replacement in proportion to their importance weights
    (Gumbel top-k, as DSIR does), and write them to `out`; returns counts."""
    check_output_name(out)
    check_not_an_input(out, [*inputs, *target])
    check_replaceable(out, overwrite)
    if not 0.0 < keep <= 1.0:
        raise GptwoError(f"--keep {keep} is outside (0, 1]", "give the fraction of documents to keep, e.g. --keep 0.5")
    check_buckets(buckets)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise GptwoError(f"--seed {seed!r} is not a non-negative integer", "use e.g. --seed 0")
    weights = dsir_weights(inputs, target, buckets, text_field)
    if not weights:
        raise GptwoError("the inputs hold no documents", "check the input paths")
    ids = sorted(weights)
    gumbel = np.random.default_rng(seed).gumbel(size=len(ids))
    keys = np.array([weights[i] for i in ids]) + gumbel
    count = max(1, round(keep * len(ids)))
    chosen = {ids[i] for i in np.argsort(-keys, kind="stable")[:count]}
    written = write_documents(
        out, (text for doc_id, text in _nonempty_documents(inputs, text_field) if doc_id in chosen)
    )
    return {
        "documents": len(ids),
        "kept": written,
        "mean_log_weight_kept": float(np.mean([weights[i] for i in chosen])),
    }
