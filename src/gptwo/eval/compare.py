"""Several models side by side: the same perplexity and task metrics for each, in one table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from gptwo.errors import GptwoError
from gptwo.eval.perplexity import read_text_file, score_texts, total
from gptwo.eval.tasks import evaluate_task, get_task, load_items

# which task metrics make a column, in order
TASK_COLUMNS = {
    "lambada": ("acc", "perplexity"),
    "hellaswag": ("acc", "acc_norm"),
    "wikitext2": ("word_perplexity", "bits_per_byte"),
    "wikitext103": ("word_perplexity", "bits_per_byte"),
}


def compare_report(
    models: Sequence[str],
    *,
    files: Sequence[str] = (),
    tasks: Sequence[str] = (),
    data: Mapping[str, str] | None = None,
    limit: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    progress: bool = True,
    dtype: str | None = None,
    quantize: str | None = None,
) -> dict:
    """One row per model: perplexity, word perplexity and bits per byte over `files`, then each task's metrics.

    All data are read before the first model loads, so a bad file fails fast.
    """
    from gptwo.weights import load_model

    if not models:
        raise GptwoError("no models to compare", "pass two or more model folders or hub ids")
    if not files and not tasks:
        raise GptwoError(
            "nothing to compare the models on", "pass --files FILE... and/or --tasks lambada,hellaswag,..."
        )
    data = dict(data or {})
    unknown = sorted(set(data) - set(tasks))
    if unknown:
        raise GptwoError(
            f"--data names task '{unknown[0]}' which is not in --tasks", "add it to --tasks or drop its --data"
        )
    texts = [read_text_file(path) for path in files]
    items = {name: load_items(get_task(name).name, data.get(name), limit) for name in tasks}
    rows = []
    for spec in models:
        model, tokenizer = load_model(spec, device=device, dtype=dtype, quantize=quantize)
        row: dict = {"model": spec}
        if texts:
            stats = total(
                score_texts(
                    model,
                    tokenizer,
                    texts,
                    names=list(files),
                    stride=stride,
                    batch_size=batch_size,
                    progress=f"{spec}: files" if progress else None,
                )
            )
            row.update(
                perplexity=stats.perplexity, word_perplexity=stats.word_perplexity, bits_per_byte=stats.bits_per_byte
            )
        for name, task_items in items.items():
            metrics = evaluate_task(
                model, tokenizer, name, task_items, batch_size=batch_size, stride=stride, progress=progress
            )
            row.update({f"{name}.{key}": metrics[key] for key in TASK_COLUMNS[name]})
        rows.append(row)
        del model
    return {"files": list(files), "tasks": list(tasks), "models": rows}
