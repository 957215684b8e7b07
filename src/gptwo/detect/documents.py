"""Where detect's documents come from: a folder of .txt files, or a split of a prepared data folder.

Shared by `detect sample` (pairs.py: human passages) and `detect calibrate` (calibrate.py: the set to
calibrate on, the lexicon's training text).
"""

from __future__ import annotations

import glob
import os

import numpy as np

from gptwo.errors import GptwoError
from gptwo.tokenizer import Tokenizer


def read_folder(folder: str) -> list[tuple[str, str]]:
    """(path, text) of every .txt file in `folder`, sorted by name."""
    from gptwo.eval.perplexity import read_text_file

    if not os.path.isdir(folder):
        raise GptwoError(
            f"folder {folder} not found",
            "pass a folder of .txt files (one document each), e.g. from 'gptwo detect sample'",
        )
    paths = sorted(glob.glob(os.path.join(folder, "*.txt")))
    if not paths:
        raise GptwoError(f"{folder} holds no .txt files", "put one document per .txt file there")
    return [(path, read_text_file(path)) for path in paths]


def split_documents(data_dir: str, tokenizer: Tokenizer, split: str = "val") -> list[list[int]]:
    """The token ids of each document of one split of a prepared data folder (split at <|endoftext|>)."""
    from gptwo.data.loader import read_meta
    from gptwo.data.shards import read_shard

    meta = read_meta(data_dir)
    if meta.get("tokenizer") != tokenizer.identity:
        raise GptwoError(
            f"{data_dir} was prepared with another tokenizer than the model's",
            "sample from the data the model was trained on, or pass .txt files",
        )
    shards = [
        read_shard(os.path.join(data_dir, shard["file"] if isinstance(shard, dict) else shard))
        for shard in meta["splits"][split]["shards"]
    ]
    tokens = np.concatenate(shards) if shards else np.zeros(0, dtype=np.int64)
    documents, start = [], 0
    for end in np.flatnonzero(tokens == tokenizer.eot_token).tolist() + [len(tokens)]:
        if end > start:
            documents.append(tokens[start:end].astype(np.int64).tolist())
        start = end + 1
    return documents
