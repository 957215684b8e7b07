"""GPT-2's zero-shot tasks, scored as lm-evaluation-harness scores them.

- LAMBADA (OpenAI's version, `lambada_openai`): the passage's last word is the continuation of
  the rest; accuracy = greedy decoding reproduces every token of it, perplexity = exp of the mean
  negative log-likelihood of the last word.
- HellaSwag: four endings per context; `acc` picks the most likely ending, `acc_norm` the most
  likely per character.
- WikiText-2 / WikiText-103 (raw): each article, detokenized, scored with the strided window;
  word perplexity and bits per byte are counted on the original text.

Data come from a local file in the published format (`--data`) or are downloaded with the
`datasets` library from the Hugging Face hub on a networked machine.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gptwo.errors import GptwoError
from gptwo.eval.catalog import TASK_INFO, TaskInfo
from gptwo.eval.perplexity import score_texts, total
from gptwo.eval.scoring import encode_pair, score_pairs
from gptwo.tokenizer import Tokenizer


# ---------------------------------------------------------------- reading task files
def read_rows(path: str) -> list[dict]:
    """Rows of a JSON-lines, JSON-array or Parquet file."""
    if not os.path.isfile(path):
        raise GptwoError(f"data file {path} not found", "check the --data path")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        rows = _parse_json_rows(text, path)
    if not rows:
        raise GptwoError(f"{path} is empty", "give a file with at least one item")
    return rows


def _parse_json_rows(text: str, path: str) -> list[dict]:
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise GptwoError(
                f"{path} is not valid JSON ({err})", "give one JSON object per line, or a JSON array"
            ) from None
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise GptwoError(
                        f"line {number} of {path} is not valid JSON ({err.msg})", "give one JSON object per line"
                    ) from None
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise GptwoError(f"item {number} of {path} is not a JSON object", "give one JSON object per line")
    return rows


def require_fields(rows: Sequence[dict], fields: Sequence[str], source: str) -> None:
    """Every row has every field, or the first gap is named with the item's number."""
    for number, row in enumerate(rows, 1):
        missing = [f for f in fields if f not in row]
        if missing:
            raise GptwoError(
                f"item {number} of {source} has no field '{missing[0]}'",
                f"each item needs the fields {', '.join(fields)}",
            )


def download_rows(info: TaskInfo) -> list[dict]:
    """Rows of the task's Hugging Face hub dataset split (needs the network and the `datasets` package)."""
    path, name, split = info.hub_dataset, info.hub_config, info.hub_split
    try:
        import datasets
    except ImportError:
        raise GptwoError(
            "downloading task data needs the 'datasets' package", "pip install 'gptwo[eval]', or pass --data FILE"
        ) from None
    try:
        dataset = datasets.load_dataset(path, name, split=split)
    except Exception as err:  # network, hub and format errors all mean the same to the user
        raise GptwoError(
            f"could not download {path}{'/' + name if name else ''} ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]})",
            f"check the network, or pass --data FILE: {info.data_help}",
        ) from None
    return [dict(row) for row in dataset]


# ---------------------------------------------------------------- LAMBADA
def lambada_split(passage: str) -> tuple[str, str]:
    """(context, continuation): the last space-separated word, with its space, follows the rest."""
    head, _, last = passage.rpartition(" ")
    if not head or not last:
        raise GptwoError(
            f"LAMBADA passage {passage[:40]!r} has no last word after a space", "each passage needs several words"
        )
    return head, " " + last


def load_lambada(data: str | None) -> list[str]:
    """Passages: a JSON-lines/Parquet file with 'text' (OpenAI's lambada_test.jsonl), a .txt file with one per line, or
    the hub."""
    if data is None:
        rows = download_rows(TASK_INFO["lambada"])
    elif data.endswith(".txt"):
        with open(_existing(data), encoding="utf-8") as f:
            rows = [{"text": line.rstrip("\n")} for line in f if line.strip()]
        if not rows:
            raise GptwoError(f"{data} is empty", "give one passage per line")
    else:
        rows = read_rows(data)
    require_fields(rows, ["text"], data or TASK_INFO["lambada"].hub_dataset)
    return [str(row["text"]) for row in rows]


def score_lambada(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    passages: Sequence[str],
    *,
    batch_size: int = 8,
    progress: str | None = None,
    **_,
) -> dict:
    """Accuracy (greedy last word) and perplexity of the last word."""
    scores = score_pairs(model, [encode_pair(tokenizer, *lambada_split(p)) for p in passages], batch_size, progress)
    return {
        "acc": sum(s.greedy for s in scores) / len(scores),
        "perplexity": math.exp(-sum(s.logprob for s in scores) / len(scores)),
        "items": len(scores),
    }


# ---------------------------------------------------------------- HellaSwag
HELLASWAG_FIELDS = ("activity_label", "ctx_a", "ctx_b", "endings", "label")


@dataclass(frozen=True)
class ChoiceItem:
    """A multiple-choice item: the query, its candidate continuations and the index of the right one."""

    query: str
    choices: tuple[str, ...]
    gold: int


def _hellaswag_clean(text: str) -> str:
    """HellaSwag's WikiHow markup out: '[title]' becomes a sentence break, other [tags] go, double spaces shrink."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag_item(row: dict, number: int = 0) -> ChoiceItem:
    """A HellaSwag row (the published jsonl or Rowan/hellaswag) as the harness poses it."""
    endings = row["endings"]
    if not isinstance(endings, list) or len(endings) < 2:
        raise GptwoError(f"HellaSwag item {number} has no list of endings", "'endings' must be a list of 4 strings")
    try:
        gold = int(row["label"])
    except (TypeError, ValueError):
        raise GptwoError(
            f"HellaSwag item {number} has label {row['label']!r}",
            "the label must be the index of the right ending (0-3)",
        ) from None
    if not 0 <= gold < len(endings):
        raise GptwoError(
            f"HellaSwag item {number} has label {gold} but {len(endings)} endings", "the label must index an ending"
        )
    context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return ChoiceItem(
        _hellaswag_clean(row["activity_label"] + ": " + context), tuple(_hellaswag_clean(e) for e in endings), gold
    )


def load_hellaswag(data: str | None) -> list[ChoiceItem]:
    """Items of the validation set: hellaswag_val.jsonl (or any rows with the same fields), or the hub."""
    rows = download_rows(TASK_INFO["hellaswag"]) if data is None else read_rows(data)
    require_fields(rows, HELLASWAG_FIELDS, data or TASK_INFO["hellaswag"].hub_dataset)
    return [hellaswag_item(row, number) for number, row in enumerate(rows, 1)]


def score_choices(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    items: Sequence[ChoiceItem],
    *,
    batch_size: int = 8,
    progress: str | None = None,
    **_,
) -> dict:
    """acc: the most likely choice is right; acc_norm: the most likely per character is right."""
    pairs = [encode_pair(tokenizer, item.query, " " + choice) for item in items for choice in item.choices]
    scores = iter(score_pairs(model, pairs, batch_size, progress))
    right = right_norm = 0
    for item in items:
        logprobs = [next(scores).logprob for _ in item.choices]
        per_char = [lp / len(choice) for lp, choice in zip(logprobs, item.choices)]
        right += _argmax(logprobs) == item.gold
        right_norm += _argmax(per_char) == item.gold
    return {"acc": right / len(items), "acc_norm": right_norm / len(items), "items": len(items)}


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


# ---------------------------------------------------------------- WikiText
_TOP_HEADING = re.compile(r"^ = [^=].* = $")
_WIKITEXT_SPACING = [
    ("s '", "s'"),
    (" @-@ ", "-"),
    (" @,@ ", ","),
    (" @.@ ", "."),
    *((f" {p} ", f"{p} ") for p in ":;.!?,"),
]
_WIKITEXT_PAIRS = ["()", "[]", "{}", '""', "''"]
_WIKITEXT_AFTER = [
    ("= = = =", "===="),
    ("= = =", "==="),
    ("= =", "=="),
    (" \u00b0 ", "\u00b0"),
    (" \n", "\n"),
    ("\n ", "\n"),
    (" N ", " 1 "),
    (" 's", "'s"),
]


def wikitext_detokenize(text: str) -> str:
    """WikiText's tokenized spacing undone (' @-@ ' → '-', ' , ' → ', ', '( x )' → '(x)', ...), as the harness does.

    GPT-2 reads raw text, so the paper scored WikiText through such invertible detokenizers.
    """
    for old, new in _WIKITEXT_SPACING:
        text = text.replace(old, new)
    for left, right in _WIKITEXT_PAIRS:
        inner = re.escape(left) + r"\s*([^" + re.escape(right) + r"]*?)\s*" + re.escape(right)
        text = re.sub(inner, left + r"\1" + right, text)
    for old, new in _WIKITEXT_AFTER:
        text = text.replace(old, new)
    return text


def split_articles(raw: str) -> list[str]:
    """The articles of a WikiText file (wiki.test.raw): each starts at a top-level heading ' = Title = '."""
    articles, current = [], []
    for line in raw.splitlines(keepends=True):
        if _TOP_HEADING.match(line.rstrip("\n")) and any(text.strip() for text in current):
            articles.append("".join(current))
            current = []
        current.append(line)
    if any(text.strip() for text in current):
        articles.append("".join(current))
    return articles


def load_wikitext(data: str | None, info: TaskInfo = TASK_INFO["wikitext2"]) -> list[str]:
    """Articles (not yet detokenized): wiki.test.raw, rows with 'page' (one article each) or 'text' (lines), or the
    hub."""
    if data is None:
        rows = download_rows(info)
    elif data.endswith((".raw", ".txt", ".tokens")):
        with open(_existing(data), encoding="utf-8") as f:
            articles = split_articles(f.read())
        if not articles:
            raise GptwoError(f"{data} is empty", "give the WikiText test file (wiki.test.raw)")
        return articles
    else:
        rows = read_rows(data)
    source = data or info.hub_dataset
    if "page" in rows[0]:
        require_fields(rows, ["page"], source)
        return [str(row["page"]) for row in rows if str(row["page"]).strip()]
    require_fields(rows, ["text"], source)  # one row per line, as Salesforce/wikitext has it
    articles = split_articles("".join(_as_line(str(row["text"])) for row in rows))
    if not articles:
        raise GptwoError(f"{source} has no text", "give the WikiText test split")
    return articles


def _as_line(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


def score_wikitext(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    articles: Sequence[str],
    *,
    batch_size: int = 8,
    progress: str | None = None,
    stride: int | None = None,
    **_,
) -> dict:
    """Word perplexity, byte perplexity and bits per byte over all articles (sums, then ratios)."""
    stats = total(
        score_texts(
            model,
            tokenizer,
            [wikitext_detokenize(a) for a in articles],
            originals=articles,
            stride=stride,
            batch_size=batch_size,
            progress=progress,
        )
    )
    return {
        "word_perplexity": stats.word_perplexity,
        "byte_perplexity": stats.byte_perplexity,
        "bits_per_byte": stats.bits_per_byte,
        "token_perplexity": stats.perplexity,
        "tokens": stats.tokens,
        "items": len(articles),
    }


# ---------------------------------------------------------------- the task table
@dataclass(frozen=True)
class Task:
    """A zero-shot task: its description (`catalog`), how its items load and how they are scored."""

    info: TaskInfo
    load: Callable[[str | None], list]
    score: Callable[..., dict]

    @property
    def name(self) -> str:
        return self.info.name


TASKS: dict[str, Task] = {
    "lambada": Task(TASK_INFO["lambada"], load_lambada, score_lambada),
    "hellaswag": Task(TASK_INFO["hellaswag"], load_hellaswag, score_choices),
    "wikitext2": Task(TASK_INFO["wikitext2"], lambda data: load_wikitext(data, TASK_INFO["wikitext2"]), score_wikitext),
    "wikitext103": Task(
        TASK_INFO["wikitext103"], lambda data: load_wikitext(data, TASK_INFO["wikitext103"]), score_wikitext
    ),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise GptwoError(f"unknown task '{name}'", f"use one of: {', '.join(TASKS)}")
    return TASKS[name]


def load_items(name: str, data: str | None = None, limit: int | None = None) -> list:
    """A task's items from `data` (or the hub): the first `limit` of them."""
    task = get_task(name)
    if limit is not None and limit < 1:
        raise GptwoError(f"--limit {limit} must be at least 1", "leave it out to use every item")
    return task.load(data)[:limit]


def evaluate_task(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    name: str,
    items: Sequence,
    *,
    batch_size: int = 8,
    stride: int | None = None,
    progress: bool = True,
) -> dict:
    """A task's metrics for a loaded model on loaded items."""
    metrics = get_task(name).score(
        model, tokenizer, items, batch_size=batch_size, stride=stride, progress=name if progress else None
    )
    return {"task": name, **metrics}


def task_report(
    name: str,
    model_spec: str,
    *,
    data: str | None = None,
    limit: int | None = None,
    device: str = "auto",
    dtype: str | None = None,
    quantize: str | None = None,
    adapter: str | None = None,
    merge: bool = False,
    **options,
) -> dict:
    """What `gptwo eval TASK` prints: the task's metrics for one model (data are read before the model loads)."""
    from gptwo.weights import load_model

    items = load_items(name, data, limit)
    model, tokenizer = load_model(
        model_spec, device=device, dtype=dtype, quantize=quantize, adapter=adapter, merge=merge
    )
    return {"model": model_spec, **evaluate_task(model, tokenizer, name, items, **options)}


def _existing(path: str) -> str:
    if not os.path.isfile(path):
        raise GptwoError(f"data file {path} not found", "check the --data path")
    return path
