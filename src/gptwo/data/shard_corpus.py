"""Corpus → token shards: read documents, tokenize them in parallel, split train/val, write shards.

Each document is followed by the end-of-text token. A document goes to val with probability
`val_fraction` (a seeded draw per document, so the split is the same every run); when that leaves
val empty, the last document goes there instead, and a corpus of a single document gives its last
`val_fraction` of tokens to val. The output folder gets `train_NNNNNN.bin`, `val_NNNNNN.bin`,
`tokenizer.json` and, last, `meta.json`; all are built in a temporary folder first, so a failed run
leaves a previously prepared folder as it was.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
import os
import pickle
import random
import shutil
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing

import numpy as np

from gptwo.data import DEFAULT_SHARD_TOKENS, DEFAULT_VAL_FRACTION
from gptwo.data.shards import mask_path, token_dtype, write_mask, write_shard
from gptwo.data.sources import check_inputs, iter_documents
from gptwo.errors import GptwoError
from gptwo.progress import progress_bar
from gptwo.tokenizer import Tokenizer, load_tokenizer

CHUNK_CHARS = 1 << 20  # documents are sent to workers in chunks of about this many characters
IN_PROCESS_CHUNKS = 16  # the first chunks are encoded in this process, before a pool pays off
META_FORMAT = "gptwo-shards"
META_VERSION = 1
SPLITS = ("train", "val")

# An encoded chunk: all its tokens (each document followed by end-of-text), per-document token counts
# and per-document UTF-8 byte counts (the separator counted as one byte).
Encoded = tuple[np.ndarray, np.ndarray, np.ndarray]


def prepare(
    inputs: Sequence[str],
    out_dir: str,
    tokenizer: Tokenizer | str = "gpt2",
    val_fraction: float = DEFAULT_VAL_FRACTION,
    workers: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    seed: int = 0,
    text_field: str = "text",
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Tokenize `inputs` into train/val shards under `out_dir`; returns the meta written to meta.json.

    `out_dir` must be new, empty or a folder of shards prepared before (which the new ones replace);
    `overwrite` allows any other folder (its tokenizer.json and meta.json are then replaced).
    """
    check_arguments(inputs, out_dir, val_fraction, shard_tokens, workers)
    check_output_folder(out_dir, inputs, overwrite)
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    dtype = token_dtype(tok.n_vocab)
    with staging_folder(out_dir) as staging:
        writers = {split: SplitWriter(staging, split, dtype, tok.identity, shard_tokens) for split in SPLITS}
        documents = (text for text in iter_documents(inputs, text_field) if text.strip())
        with progress_bar("tokenizing", unit="char", enabled=progress, unit_scale=True, delay=0.5) as bar:
            with closing(_encode_chunks(_chunks(documents, bar), tok, workers)) as encoded:
                split_documents(_documents(encoded, dtype), writers, tok, val_fraction, seed)
        for writer in writers.values():
            writer.close()
        meta = shards_meta(tok, dtype, writers, inputs, val_fraction, seed, shard_tokens, text_field)
        publish(staging, out_dir, tok, meta)
    return meta


@contextlib.contextmanager
def staging_folder(out_dir: str) -> Iterator[str]:
    """A hidden temporary folder inside `out_dir` (created if missing) to build a preparation in.

    On an error it is removed (and `out_dir` too if this made it and it is empty); `publish` empties it.
    """
    created = not os.path.exists(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(dir=out_dir, prefix=".tmp-prepare-")
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not os.listdir(out_dir):
            os.rmdir(out_dir)
        raise
    os.rmdir(staging)


def check_arguments(
    inputs: Sequence[str], out_dir: str, val_fraction: float, shard_tokens: int, workers: int | None
) -> None:
    if not inputs:
        raise GptwoError("no inputs given", "pass text files, folders, 'builtin' or hf:NAME")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise GptwoError(
            f"output {out_dir} is a file, not a folder", "choose a folder for --out (it is created if missing)"
        )
    if not 0 <= val_fraction < 1:
        raise GptwoError(f"val fraction {val_fraction} is not in [0, 1)", "use e.g. --val-fraction 0.01")
    if shard_tokens < 1:
        raise GptwoError(f"shard size {shard_tokens} tokens is not positive", "use e.g. --shard-tokens 100000000")
    if workers is not None and workers < 1:
        raise GptwoError(f"{workers} workers is not positive", "use --workers 1 or more")
    check_inputs(inputs)


def is_shard_folder(path: str) -> bool:
    """A folder `gptwo prepare` wrote: its meta.json says format gptwo-shards (or it holds only leftovers)."""
    try:
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        if isinstance(meta, dict) and meta.get("format") == META_FORMAT:
            return True
    except (OSError, ValueError):
        pass
    return all(name.startswith(".tmp-") for name in os.listdir(path))  # empty, or an interrupted first run


def check_output_folder(out_dir: str, inputs: Sequence[str], overwrite: bool = False) -> None:
    """Refuse an --out that is one of the inputs, or an existing folder that is not prepared shards."""
    real = os.path.realpath(out_dir)
    for given in inputs:
        if os.path.exists(given) and os.path.realpath(given) == real:
            raise GptwoError(
                f"--out {out_dir} is also an input ({given})", "choose an output folder apart from the inputs"
            )
    if not os.path.isdir(out_dir) or overwrite or is_shard_folder(out_dir):
        return
    names = sorted(os.listdir(out_dir))
    what = "a saved model" if os.path.isfile(os.path.join(out_dir, "config.json")) else "files"
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    raise GptwoError(
        f"--out {out_dir} already holds {what} that 'gptwo prepare' did not write ({shown}); preparing would "
        "replace its tokenizer.json and meta.json",
        "choose a new or empty folder for --out, or pass --overwrite to prepare into it anyway",
    )


# ------------------------------------------------------------------ reading and encoding
def _chunks(documents: Iterable[str], bar) -> Iterator[list[str]]:
    """Documents grouped into lists of about CHUNK_CHARS characters."""
    chunk, chars = [], 0
    for text in documents:
        chunk.append(text)
        chars += len(text)
        if chars >= CHUNK_CHARS:
            bar.update(chars)
            yield chunk
            chunk, chars = [], 0
    if chunk:
        bar.update(chars)
        yield chunk


def encode_texts(tok: Tokenizer, texts: list[str], num_threads: int = 1) -> Encoded:
    """Encode documents, each followed by end-of-text, as one token array plus per-document counts."""
    dtype = token_dtype(tok.n_vocab)
    ids = tok.encode_batch(texts, num_threads=num_threads)
    counts = np.array([len(doc) + 1 for doc in ids], dtype=np.int64)
    tokens = np.empty(int(counts.sum()), dtype=dtype)
    start = 0
    for doc in ids:
        tokens[start : start + len(doc)] = doc
        tokens[start + len(doc)] = tok.eot_token
        start += len(doc) + 1
    nbytes = np.array([len(text.encode("utf-8")) + 1 for text in texts], dtype=np.int64)
    return tokens, counts, nbytes


_worker_tokenizer: Tokenizer | None = None
_PROBE = "Probe: <|endoftext|> ünïcödé 123"


def _init_worker(recipe: Tokenizer | str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = recipe if isinstance(recipe, Tokenizer) else Tokenizer.from_file_contents(recipe)


def _worker_encode(texts: list[str]) -> Encoded:
    return encode_texts(_worker_tokenizer, texts)


def _worker_recipe(tok: Tokenizer) -> Tokenizer | str | None:
    """What a worker process rebuilds `tok` from (the pickled tokenizer or its JSON), checked to encode alike."""
    expected = tok.encode_ordinary(_PROBE)
    for recipe in (tok, tok.to_json()):
        copy = _rebuilt(recipe)
        if copy is not None and copy.identity == tok.identity and copy.encode_ordinary(_PROBE) == expected:
            return recipe
    return None


def _rebuilt(recipe: Tokenizer | str) -> Tokenizer | None:
    try:
        return (
            pickle.loads(pickle.dumps(recipe))
            if isinstance(recipe, Tokenizer)
            else Tokenizer.from_file_contents(recipe)
        )
    except Exception:  # noqa: BLE001 - not transferable this way; try the next one
        return None


def _encode_chunks(chunks: Iterator[list[str]], tok: Tokenizer, workers: int | None) -> Iterator[Encoded]:
    """Encoded chunks in input order; past the first IN_PROCESS_CHUNKS, `workers` processes share the work."""
    workers = workers or min(os.cpu_count() or 1, 16)
    for chunk in itertools.islice(chunks, IN_PROCESS_CHUNKS):  # small corpora: a pool costs more than it saves
        yield encode_texts(tok, chunk, num_threads=min(workers, 8))
    first = next(chunks, None)
    if first is None:
        return
    chunks = itertools.chain([first], chunks)
    recipe = _worker_recipe(tok) if workers > 1 else None
    if recipe is None:
        for chunk in chunks:
            yield encode_texts(tok, chunk, num_threads=min(workers, 8))
        return
    context = multiprocessing.get_context("spawn")  # fork is unsafe once threads (torch, tokenizers) exist
    with context.Pool(workers, initializer=_init_worker, initargs=(recipe,)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_worker_encode, (chunk,)))
            if len(pending) >= 2 * workers:  # bounded: memory stays flat on corpora of any size
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _documents(encoded: Iterable[Encoded], dtype: np.dtype) -> Iterator[tuple[np.ndarray, int]]:
    """(tokens ending in end-of-text, UTF-8 bytes) per document."""
    for tokens, counts, nbytes in encoded:
        tokens = tokens.astype(dtype, copy=False)
        for piece, size in zip(np.split(tokens, np.cumsum(counts)[:-1]), nbytes):
            yield piece, int(size)


# ------------------------------------------------------------------ splitting and writing
def split_documents(
    documents: Iterable[tuple[np.ndarray, int]], writers: dict, tok: Tokenizer, val_fraction: float, seed: int
) -> None:
    """Send each document to train or val by a seeded draw; with 2+ documents neither split stays empty."""
    rng = random.Random(seed)
    held = None  # (split, document) of the latest document, held back in case a split would stay empty
    count = 0
    for document in documents:
        count += 1
        if held is not None:
            writers[held[0]].add(*held[1])
        held = ("val" if rng.random() < val_fraction else "train", document)
    if held is None:
        raise GptwoError("the corpus has no documents (every input is empty)", "pass inputs that contain text")
    split, document = held
    if count == 1:
        masked = len(document) > 2  # a lone conversation stays whole, in train
        if val_fraction > 0 and not masked and _split_single_document(document, writers, tok, val_fraction):
            return
        split = "train"
    elif val_fraction > 0 and writers["val"].documents == 0:
        split = "val"
    elif writers["train"].documents == 0:
        split = "train"
    writers[split].add(*document)


def _split_single_document(
    document: tuple[np.ndarray, int], writers: dict, tok: Tokenizer, val_fraction: float
) -> bool:
    """Give the last `val_fraction` of a lone document's tokens to val (cut at a token); False if too short."""
    tokens = document[0][:-1]  # without its end-of-text
    if len(tokens) < 2:
        return False
    cut = len(tokens) - min(len(tokens) - 1, max(1, round(len(tokens) * val_fraction)))
    val_bytes = len(tok.decode_bytes(tokens[cut:].tolist()))
    writers["train"].add(tokens[:cut], document[1] - 1 - val_bytes)  # the document's bytes minus its separator
    writers["val"].add(document[0][cut:], val_bytes + 1)
    return True


class SplitWriter:
    """Collects one split's tokens and writes them as shards of `shard_tokens` tokens (the last one shorter).

    `masked`: each document comes with its loss mask (and the UTF-8 bytes of its counted tokens), written
    beside each shard as NAME.mask (gptwo.data.shards).
    """

    def __init__(
        self, folder: str, split: str, dtype: np.dtype, identity: str, shard_tokens: int, masked: bool = False
    ):
        self.folder, self.split, self.dtype, self.identity, self.shard_tokens = (
            folder,
            split,
            dtype,
            identity,
            shard_tokens,
        )
        self.masked = masked
        self.parts: list[np.ndarray] = []
        self.mask_parts: list[np.ndarray] = []
        self.buffered = self.tokens = self.documents = self.bytes = 0
        self.counted_tokens = self.counted_bytes = 0
        self.shards: list[dict] = []

    def add(self, tokens: np.ndarray, nbytes: int, mask: np.ndarray | None = None, counted_bytes: int = 0) -> None:
        self.parts.append(tokens)
        if self.masked:
            self.mask_parts.append(mask)
            self.counted_tokens += int(mask.sum())
            self.counted_bytes += counted_bytes
        self.buffered += len(tokens)
        self.tokens += len(tokens)
        self.documents += 1
        self.bytes += nbytes
        while self.buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def split_meta(self) -> dict:
        """This split's entry in meta.json's `splits`."""
        entry = {"documents": self.documents, "tokens": self.tokens, "bytes": self.bytes, "shards": self.shards}
        if self.masked:
            entry.update(counted_tokens=self.counted_tokens, counted_bytes=self.counted_bytes)
        return entry

    def close(self) -> None:
        if self.buffered:
            self._flush(self.buffered)

    def _flush(self, count: int) -> None:
        joined = np.concatenate(self.parts)
        name = f"{self.split}_{len(self.shards):06d}.bin"
        write_shard(os.path.join(self.folder, name), joined[:count], self.identity, dtype=self.dtype)
        self.shards.append({"file": name, "tokens": count})
        self.parts = [joined[count:]] if count < len(joined) else []
        self.buffered = len(joined) - count
        if self.masked:
            mask = np.concatenate(self.mask_parts)
            self.shards[-1]["mask"] = os.path.basename(mask_path(name))
            write_mask(os.path.join(self.folder, self.shards[-1]["mask"]), mask[:count])
            self.mask_parts = [mask[count:]] if count < len(mask) else []


def shards_meta(
    tok: Tokenizer, dtype: np.dtype, writers: dict, inputs, val_fraction, seed, shard_tokens, text_field
) -> dict:
    """meta.json of a prepared folder whose splits `writers` wrote."""
    splits = {split: w.split_meta() for split, w in writers.items()}
    return {
        "format": META_FORMAT,
        "version": META_VERSION,
        "tokenizer": tok.identity,
        "n_vocab": tok.n_vocab,
        "eot_token": tok.eot_token,
        "dtype": dtype.name,
        "train_tokens": writers["train"].tokens,
        "val_tokens": writers["val"].tokens,
        "train_bytes": writers["train"].bytes,
        "val_bytes": writers["val"].bytes,
        "splits": splits,
        "inputs": list(inputs),
        "text_field": text_field,
        "val_fraction": val_fraction,
        "seed": seed,
        "shard_tokens": shard_tokens,
    }


def write_json(path: str, value: dict) -> None:
    from gptwo.fileio import atomic_write

    atomic_write(path, (json.dumps(value, indent=2) + "\n").encode("utf-8"))


def publish(staging: str, out_dir: str, tok: Tokenizer, meta: dict) -> None:
    """Write the tokenizer and meta.json into `staging`, move the staged files into `out_dir` (meta.json last),
    then drop shards (and masks) only the old meta listed."""
    tok.save(os.path.join(staging, "tokenizer.json"))
    write_json(os.path.join(staging, "meta.json"), meta)
    old_files = _listed_shards(os.path.join(out_dir, "meta.json"))
    new_files = _shard_files(meta)
    for name in [*new_files, "tokenizer.json", "meta.json"]:
        os.chmod(os.path.join(staging, name), 0o644)  # temp files start private; data is for everyone
        os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    for name in sorted(old_files - set(new_files)):
        path = os.path.join(out_dir, name)
        if os.path.isfile(path):
            os.unlink(path)


def _listed_shards(meta_path: str) -> set[str]:
    try:
        with open(meta_path, encoding="utf-8") as f:
            old = json.load(f)
        return {os.path.basename(name) for name in _shard_files(old)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


def _shard_files(meta: dict) -> list[str]:
    """The shard and mask files a meta lists."""
    shards = [shard for split in meta["splits"].values() for shard in split["shards"]]
    return [shard[key] for shard in shards for key in ("file", "mask") if key in shard]
