"""Conversations (JSON lines) → token shards with a loss mask: `gptwo prepare chat`.

Each line is `{"messages": [{"role", "content"}, ...]}` (OpenAI's fine-tuning format, and most chat
datasets') or `{"prompt", "completion"}` (a user turn and the assistant's reply). Each conversation
is rendered with a chat template (gptwo.chat) and tokenized whole; conversations are packed one after
another and split train/val by conversation as `gptwo prepare` splits documents. Beside each shard a
mask marks the tokens the loss counts: the assistant's (its text and the <|endoftext|> that ends its
turn), or every token with `count_all` (then no masks are written).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np

from gptwo.chat import CHAT_TEMPLATE, check_messages, encode_chat, read_chat_template
from gptwo.data import DEFAULT_SHARD_TOKENS, DEFAULT_VAL_FRACTION
from gptwo.data.shard_corpus import (
    SPLITS,
    SplitWriter,
    check_arguments,
    check_output_folder,
    publish,
    shards_meta,
    split_documents,
    staging_folder,
)
from gptwo.data.shards import token_dtype
from gptwo.data.sources import iter_files, iter_json_records, read_text
from gptwo.errors import GptwoError
from gptwo.progress import progress_bar
from gptwo.tokenizer import Tokenizer, load_tokenizer

CHAT_SUFFIXES = (".jsonl", ".jsonl.zst")
_FIX_LINE = (
    'write each line as {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]} '
    'or {"prompt": "...", "completion": "..."}'
)


def prepare_chat(
    inputs: Sequence[str],
    out_dir: str,
    tokenizer: Tokenizer | str = "gpt2",
    chat_template: str | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    seed: int = 0,
    count_all: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Conversations in `inputs` (.jsonl / .jsonl.zst files or folders of them) into shards and loss masks
    under `out_dir`; returns the meta written to meta.json (with `chat_template` and `loss_mask`).

    `chat_template`: the Jinja template's text; by default the tokenizer folder's template
    (`template_for(tokenizer)`), else gptwo's CHAT_TEMPLATE. `out_dir` as in `gptwo prepare`.
    """
    check_arguments(inputs, out_dir, val_fraction, shard_tokens, None)
    check_output_folder(out_dir, inputs, overwrite)
    template = chat_template or (template_for(tokenizer) if isinstance(tokenizer, str) else None) or CHAT_TEMPLATE
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    dtype = token_dtype(tok.n_vocab)
    masked = not count_all
    with staging_folder(out_dir) as staging:
        writers = {
            split: SplitWriter(staging, split, dtype, tok.identity, shard_tokens, masked=masked) for split in SPLITS
        }
        with progress_bar("tokenizing", unit="conversation", enabled=progress, delay=0.5) as bar:
            documents = encode_conversations(read_conversations(inputs), tok, template, count_all, dtype, bar)
            split_documents(documents, writers, tok, val_fraction, seed)
        for writer in writers.values():
            writer.close()
        meta = shards_meta(tok, dtype, writers, inputs, val_fraction, seed, shard_tokens, None)
        del meta["text_field"]
        meta.update(chat_template=template, loss_mask=masked)
        publish(staging, out_dir, tok, meta)
    return meta


def template_for(tokenizer: str) -> str | None:
    """The chat template stored with a tokenizer: in the folder given, or beside the tokenizer file given."""
    if tokenizer in ("", "gpt2"):
        return None
    folder = tokenizer if os.path.isdir(tokenizer) else os.path.dirname(os.path.abspath(tokenizer))
    return read_chat_template(folder)


def read_template_file(path: str) -> str:
    """A chat template file's text (strict UTF-8)."""
    if not os.path.isfile(path):
        raise GptwoError(f"chat template file {path} not found", "check the path given to --chat-template")
    template = read_text(path)
    if not template.strip():
        raise GptwoError(f"chat template file {path} is empty", "give a Jinja chat template")
    return template


def read_conversations(inputs: Sequence[str]) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """(`file:line`, messages) for each conversation of the inputs (files, or folders walked in sorted order)."""
    for path in inputs:
        if os.path.isfile(path) and not path.endswith(CHAT_SUFFIXES):
            raise GptwoError(
                f"{path} is not a .jsonl or .jsonl.zst file", "chat data is JSON lines: one conversation per line"
            )
        for file in iter_files([path]):
            if file.endswith(CHAT_SUFFIXES):  # a folder's other files are not conversations
                for where, record in iter_json_records(file):
                    yield where, conversation(record, where)


def conversation(record: object, where: str) -> list[dict[str, str]]:
    """One line's messages: its `messages`, or a `prompt`/`completion` pair as a user and an assistant turn."""
    if not isinstance(record, dict):
        what = "is not JSON" if record is None else "is not a JSON object"
        raise GptwoError(f"{where} {what}", _FIX_LINE)
    if "messages" in record:
        return check_messages(record["messages"], f"{where}: messages")
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    raise GptwoError(f"{where} has neither 'messages' nor string 'prompt' and 'completion' fields", _FIX_LINE)


def encode_conversations(
    conversations: Iterator[tuple[str, list[dict[str, str]]]],
    tok: Tokenizer,
    template: str,
    count_all: bool,
    dtype: np.dtype,
    bar=None,
) -> Iterator[tuple]:
    """Per conversation: (tokens, UTF-8 bytes), and with a mask (mask, the counted tokens' bytes).

    A conversation's tokens end with <|endoftext|> (the template puts it after each assistant turn; one is
    added, not counted, where the conversation ends otherwise). Bytes count <|endoftext|> as one byte, as
    `gptwo prepare` counts its separator.
    """
    eot = tok.eot_token
    for where, messages in conversations:
        try:
            ids, mask = encode_chat(tok, messages, template, count_all)
        except GptwoError as err:
            raise GptwoError(f"{where}: {err.what}", err.fix) from None
        if not any(mask):
            raise GptwoError(
                f"{where} has no assistant message, so no token of it would be trained on",
                "add the assistant's reply, drop the line, or pass --count-all",
            )
        if not ids or ids[-1] != eot:
            ids, mask = [*ids, eot], [*mask, count_all]
        sizes = np.array([1 if t == eot else len(tok.token_bytes(t)) for t in ids], dtype=np.int64)
        tokens = np.array(ids, dtype=dtype)
        if bar is not None:
            bar.update(1)
        if count_all:
            yield tokens, int(sizes.sum())
        else:
            counted = np.array(mask, dtype=bool)
            yield tokens, int(sizes.sum()), counted, int(sizes[counted].sum())
