"""The zero-shot tasks by name: what each measures and where its data come from.

Plain data with no heavy imports, so the command line can list tasks without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskInfo:
    name: str
    summary: str
    hub_dataset: str  # Hugging Face hub dataset id, downloaded when no --data is given
    hub_config: str | None
    hub_split: str
    data_help: str  # the published file format accepted by --data


TASK_INFO: dict[str, TaskInfo] = {
    info.name: info
    for info in [
        TaskInfo(
            "lambada",
            "LAMBADA (OpenAI version): last-word accuracy and perplexity",
            "EleutherAI/lambada_openai",
            "default",
            "test",
            'lambada_test.jsonl ({"text": ...} per line) or a .txt with one passage per line',
        ),
        TaskInfo(
            "hellaswag",
            "HellaSwag (validation): acc and acc_norm by continuation log-likelihood",
            "Rowan/hellaswag",
            None,
            "validation",
            "hellaswag_val.jsonl (fields activity_label, ctx_a, ctx_b, endings, label)",
        ),
        TaskInfo(
            "wikitext2",
            "WikiText-2 (raw, test): word perplexity and bits per byte with the detokenizer",
            "Salesforce/wikitext",
            "wikitext-2-raw-v1",
            "test",
            "wiki.test.raw of wikitext-2-raw-v1, or .jsonl/.parquet rows with 'page' (an article) or 'text' (a line)",
        ),
        TaskInfo(
            "wikitext103",
            "WikiText-103 (raw, test): word perplexity and bits per byte with the detokenizer",
            "Salesforce/wikitext",
            "wikitext-103-raw-v1",
            "test",
            "wiki.test.raw of wikitext-103-raw-v1, or .jsonl/.parquet rows with 'page' (an article) or 'text' (a line)",
        ),
    ]
}
