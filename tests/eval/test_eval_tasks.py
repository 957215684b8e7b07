"""Zero-shot task scorers on hand-made items with known answers, task files in their published formats, and errors."""

from __future__ import annotations

import math

import pytest
from eval_fixtures import WIKI_RAW, TableModel, hellaswag_rows, small_tokenizer, write_jsonl, write_text

from gptwo.errors import GptwoError
from gptwo.eval import tasks
from gptwo.eval.scoring import encode_pair
from gptwo.eval.tasks import (
    ChoiceItem,
    hellaswag_item,
    load_hellaswag,
    load_lambada,
    load_wikitext,
    score_choices,
    score_lambada,
    split_articles,
    wikitext_detokenize,
)


def lm_eval_task_module(name: str, filename: str):
    """A helper file of one of lm-eval's task folders (they are not packages)."""
    import importlib.util
    import os

    import lm_eval.tasks

    path = os.path.join(os.path.dirname(lm_eval.tasks.__file__), name, filename)
    spec = importlib.util.spec_from_file_location(f"lm_eval_task_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- LAMBADA
def test_lambada_accuracy_and_perplexity_from_a_model_whose_predictions_we_set():
    tok = small_tokenizer()
    model = TableModel(tok.n_vocab, block_size=64)
    known, unknown = "The fox jumps over the lazy dog", "Rivers run to the sea"
    chains = {}
    for passage in (known, unknown):
        ctx, cont = encode_pair(tok, passage.rsplit(" ", 1)[0], " " + passage.rsplit(" ", 1)[1])
        chains[passage] = (ctx[-1:] + cont, cont)
    # the model predicts the known passage's last word token by token, with logit 10 against 0
    steps = list(zip(chains[known][0], chains[known][0][1:]))
    for prev, nxt in steps:
        model.table.data[prev, nxt] = 10.0
    assert not {p for p, _ in steps} & set(chains[unknown][0][:-1])  # the other passage's rows stay uniform
    result = score_lambada(model, tok, [known, unknown])
    confident = 10.0 - math.log(math.exp(10.0) + tok.n_vocab - 1)
    expected_nll = [-len(chains[known][1]) * confident, len(chains[unknown][1]) * math.log(tok.n_vocab)]
    assert result["acc"] == 0.5
    assert result["perplexity"] == pytest.approx(math.exp(sum(expected_nll) / 2), rel=1e-5)
    assert result["items"] == 2


def test_lambada_splits_the_last_word_as_the_harness_template_does():
    text = 'He said "wait" and then she left the  room'
    context, target = tasks.lambada_split(text)
    assert (context, target) == (" ".join(text.split(" ")[:-1]), " " + text.split(" ")[-1])
    with pytest.raises(GptwoError, match="no last word"):
        tasks.lambada_split("single")


def test_lambada_reads_jsonl_and_txt(tmp_path):
    rows = [{"text": "one two three"}, {"text": "four five six"}]
    assert load_lambada(write_jsonl(str(tmp_path / "lambada_test.jsonl"), rows)) == ["one two three", "four five six"]
    assert load_lambada(write_text(str(tmp_path / "l.txt"), "one two three\n\nfour five six\n")) == [
        "one two three",
        "four five six",
    ]


# ---------------------------------------------------------------- HellaSwag
def test_hellaswag_acc_and_acc_norm_from_a_uniform_model():
    """Uniform logits: a choice's log-likelihood is -tokens*log(V), so acc picks the fewest tokens, acc_norm the fewest
    per character."""
    tok = small_tokenizer()
    items = [
        ChoiceItem("Rivers run to", ("the sea", "qqqqqqqq"), 0),
        ChoiceItem("A cat", ("x", "sleeps in the sun"), 1),
    ]
    counts = [[len(encode_pair(tok, it.query, " " + c)[1]) for c in it.choices] for it in items]
    assert counts == [[2, 9], [2, 9]]  # tokens; characters are [7, 8] and [1, 17]
    result = score_choices(TableModel(tok.n_vocab, block_size=64), tok, items)
    # item 1: both metrics pick 'the sea' (right); item 2: acc picks 'x' (wrong), acc_norm 9/17 < 2/1 picks the right
    # one
    assert (result["acc"], result["acc_norm"], result["items"]) == (0.5, 1.0, 2)


def test_hellaswag_items_match_lm_evals_preprocessing():
    import datasets

    as_hub = [{**r, "label": str(r["label"])} for r in hellaswag_rows()]  # Rowan/hellaswag stores labels as strings
    theirs = lm_eval_task_module("hellaswag", "utils.py").process_docs(datasets.Dataset.from_list(as_hub))
    for number, (row, doc) in enumerate(zip(hellaswag_rows(), theirs), 1):
        item = hellaswag_item(row, number)
        assert (item.query, list(item.choices), item.gold) == (doc["query"], doc["choices"], doc["gold"])
    assert "[" not in hellaswag_item(hellaswag_rows()[1]).query


def test_hellaswag_file_errors_name_the_item_and_field(tmp_path):
    rows = hellaswag_rows()
    assert [it.gold for it in load_hellaswag(write_jsonl(str(tmp_path / "ok.jsonl"), rows))] == [3, 0]
    del rows[1]["endings"]
    with pytest.raises(GptwoError, match="item 2 of .*missing.jsonl has no field 'endings'"):
        load_hellaswag(write_jsonl(str(tmp_path / "missing.jsonl"), rows))
    rows = hellaswag_rows()
    rows[0]["label"] = 7
    with pytest.raises(GptwoError, match="label 7 but 4 endings"):
        load_hellaswag(write_jsonl(str(tmp_path / "label.jsonl"), rows))


# ---------------------------------------------------------------- WikiText
def test_detokenizer_matches_lm_evals():
    theirs = lm_eval_task_module("wikitext", "preprocess_wikitext.py")
    samples = [
        WIKI_RAW,
        *split_articles(WIKI_RAW),
        ' He said " hello there " ( in 1990 ) ; then [ a ] { b } = = = Sub = = = 5 ° C , N times .\n ',
    ]
    for text in samples:
        assert wikitext_detokenize(text) == theirs.wikitext_detokenizer({"page": text})
    assert "guest-starring" in wikitext_detokenize(WIKI_RAW) and "1,000" in wikitext_detokenize(WIKI_RAW)


def test_wikitext_articles_from_raw_file_and_from_rows(tmp_path):
    from_raw = load_wikitext(write_text(str(tmp_path / "wiki.test.raw"), WIKI_RAW))
    assert len(from_raw) == 2
    assert from_raw[0].lstrip().startswith("= Robert Boulter =") and "= = Career = =" in from_raw[0]
    assert from_raw[1].startswith(" = Du Fu = ")
    lines = [{"text": line} for line in WIKI_RAW.splitlines(keepends=True)]  # Salesforce/wikitext: one row per line
    assert load_wikitext(write_jsonl(str(tmp_path / "lines.jsonl"), lines)) == from_raw
    pages = [{"page": a} for a in from_raw]  # EleutherAI/wikitext_document_level: one row per article
    assert load_wikitext(write_jsonl(str(tmp_path / "pages.jsonl"), pages)) == from_raw


def test_wikitext_counts_words_and_bytes_of_the_original_text():
    tok = small_tokenizer()
    articles = split_articles(WIKI_RAW)
    result = tasks.score_wikitext(TableModel(tok.n_vocab, block_size=32), tok, articles, stride=16)
    theirs = lm_eval_task_module("wikitext", "preprocess_wikitext.py")
    counts = [theirs.process_results({"page": a}, [0.0]) for a in articles]
    words, nbytes = sum(c["word_perplexity"][1] for c in counts), sum(c["bits_per_byte"][1] for c in counts)
    nll = result["tokens"] * math.log(tok.n_vocab)  # uniform model
    assert result["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nll / nbytes / math.log(2), rel=1e-5)
    assert result["tokens"] == sum(len(tok.encode_ordinary(wikitext_detokenize(a))) for a in articles)


# ---------------------------------------------------------------- files and downloads
def test_task_file_errors_are_clear(tmp_path):
    with pytest.raises(GptwoError, match="empty"):
        load_lambada(write_text(str(tmp_path / "empty.jsonl"), ""))
    with pytest.raises(GptwoError, match="item 2 of .* has no field 'text'"):
        load_lambada(write_jsonl(str(tmp_path / "l.jsonl"), [{"text": "a b"}, {"passage": "c d"}]))
    with pytest.raises(GptwoError, match="line 2 of .* is not valid JSON"):
        load_lambada(write_text(str(tmp_path / "bad.jsonl"), '{"text": "a b"}\n{"text": \n'))
    with pytest.raises(GptwoError, match="not found"):
        load_lambada(str(tmp_path / "nope.jsonl"))
    with pytest.raises(GptwoError, match="unknown task 'piqa'"):
        tasks.load_items("piqa")
    with pytest.raises(GptwoError, match="--limit 0"):
        tasks.load_items("lambada", write_jsonl(str(tmp_path / "ok.jsonl"), [{"text": "a b"}]), limit=0)


def test_hub_download_asks_for_the_published_dataset(monkeypatch):
    import datasets

    asked = []

    def fake_load_dataset(path, name=None, split=None):
        asked.append((path, name, split))
        if path == "Rowan/hellaswag":
            return datasets.Dataset.from_list([{**r, "label": str(r["label"])} for r in hellaswag_rows()])
        if path == "Salesforce/wikitext":
            return datasets.Dataset.from_list([{"text": line} for line in WIKI_RAW.splitlines(keepends=True)])
        return datasets.Dataset.from_list([{"text": "one two three"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert tasks.load_items("lambada") == ["one two three"]
    assert [it.gold for it in tasks.load_items("hellaswag")] == [3, 0]
    assert len(tasks.load_items("wikitext103")) == 2
    assert asked == [
        ("EleutherAI/lambada_openai", "default", "test"),
        ("Rowan/hellaswag", None, "validation"),
        ("Salesforce/wikitext", "wikitext-103-raw-v1", "test"),
    ]


def test_failed_download_says_to_pass_a_file(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        GptwoError, match=r"could not download Salesforce/wikitext/wikitext-2-raw-v1 .*--data FILE: wiki.test.raw"
    ):
        tasks.load_items("wikitext2")
