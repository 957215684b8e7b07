"""`gptwo prepare chat`: shards and loss masks of conversations, read back from the files; the loader's -1 targets."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from cli_testing import assert_one_line_error, run, write_file

from gptwo import Tokenizer
from gptwo.chat import CHAT_TEMPLATE, render
from gptwo.data.chat import prepare_chat
from gptwo.data.loader import IGNORE, ShardLoader
from gptwo.data.shards import read_mask, read_shard
from gptwo.select.online import Selector
from gptwo.train.sampling import RandomWindows

CONVERSATIONS = [
    {
        "messages": [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris"},
        ]
    },
    {"prompt": "Add 3 and 4", "completion": " 7"},
    {
        "messages": [
            {"role": "user", "content": "Reverse: abc"},
            {"role": "assistant", "content": "cba"},
            {"role": "user", "content": "Reverse: 日本"},
            {"role": "assistant", "content": [{"type": "text", "text": "本日"}]},
        ]
    },
] * 3


def as_messages(record: dict) -> list[dict]:
    if "messages" not in record:
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    return [
        {"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]}
        for m in record["messages"]
    ]


def write_jsonl(path, records) -> str:
    return write_file(str(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def split_stream(folder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's tokens and mask, read from its shard and mask files as meta.json lists them."""
    meta = json.loads((folder / "meta.json").read_text())
    shards = meta["splits"][split]["shards"]
    tokens = np.concatenate([read_shard(str(folder / s["file"])) for s in shards]).astype(np.int64)
    mask = np.concatenate([read_mask(str(folder / s["mask"])) for s in shards]).astype(bool)
    return tokens, mask


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    source = write_jsonl(root / "chat.jsonl", CONVERSATIONS)
    # small shards: masks are cut with their shards
    meta = prepare_chat([source], str(root / "data"), val_fraction=0.0, shard_tokens=40, progress=False)
    return root / "data", meta


def test_the_mask_on_the_shards_counts_exactly_the_assistants_tokens(chat_data):
    folder, meta = chat_data
    tok = Tokenizer.gpt2()
    assert meta["loss_mask"] is True and meta["chat_template"] == CHAT_TEMPLATE
    assert len(meta["splits"]["train"]["shards"]) > 2 and not meta["splits"]["val"]["shards"]
    tokens, mask = split_stream(folder, "train")
    # the stream is the conversations rendered one after another (each already ends with <|endoftext|>)
    conversations = [as_messages(r) for r in CONVERSATIONS]
    assert tok.decode(tokens.tolist()) == "".join(render(m) for m in conversations)
    # the counted tokens are the assistant's replies (trimmed by the template) and their end markers, in order
    replies = [m["content"].strip() for c in conversations for m in c if m["role"] == "assistant"]
    assert tok.decode(tokens[mask].tolist()) == "".join(f"{r}<|endoftext|>" for r in replies)
    assert int(mask.sum()) == meta["splits"]["train"]["counted_tokens"]
    assert meta["splits"]["train"]["counted_bytes"] == sum(len(r.encode()) + 1 for r in replies)
    assert meta["train_bytes"] == sum(len(render(m).replace("<|endoftext|>", "#").encode()) for m in conversations)


def test_the_loader_targets_are_minus_one_exactly_where_the_mask_leaves_a_token_out(chat_data):
    folder, _ = chat_data
    tokens, mask = split_stream(folder, "train")
    B, T = 2, 16
    loader = ShardLoader(str(folder), batch_size=B, block_size=T)
    for slot in range(3):
        x, y = loader.next_batch()
        start = slot * B * T
        assert x.flatten().tolist() == tokens[start : start + B * T].tolist()
        targets, counted = tokens[start + 1 : start + B * T + 1], mask[start + 1 : start + B * T + 1]
        assert y.flatten().tolist() == np.where(counted, targets, IGNORE).tolist()
    assert (y == IGNORE).any() and (y != IGNORE).any()
    windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], T)
    for x, y in [RandomWindows(loader).next_batch() for _ in range(3)]:  # random windows read the mask too
        for row in range(B):
            places = np.flatnonzero((windows == x[row].numpy()).all(axis=1))
            expected = [np.where(mask[p + 1 : p + T + 1], tokens[p + 1 : p + T + 1], IGNORE).tolist() for p in places]
            assert y[row].tolist() in expected


def test_online_selection_scores_rows_over_their_counted_targets(chat_data):
    from gptwo import GPT, GPTConfig

    folder, _ = chat_data
    loader = ShardLoader(str(folder), batch_size=2, block_size=16)
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=16, vocab_size=50257))
    selector = Selector(loader, "loss", pool=2)
    x, y = selector.next_batch(model)
    assert x.shape == (2, 16) and (y == IGNORE).any()
    scores = selector.scores(model, x, y, 2)
    with torch.no_grad():
        logp = torch.log_softmax(model(x).float(), dim=-1)
    for row in range(2):
        keep = y[row] != IGNORE
        expected = -logp[row][keep].gather(1, y[row][keep][:, None]).mean()
        assert float(scores[row]) == pytest.approx(float(expected), rel=1e-5)


def test_count_all_writes_no_masks_and_every_target_counts(tmp_path, capsys):
    source = write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS)
    code, _, err = run(["prepare", "chat", source, "--out", str(tmp_path / "d"), "--count-all", "--quiet"], capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["loss_mask"] is False and meta["chat_template"] == CHAT_TEMPLATE
    assert not [n for n in os.listdir(tmp_path / "d") if n.endswith(".mask")]
    x, y = ShardLoader(str(tmp_path / "d"), split="train", batch_size=2, block_size=8).next_batch()
    assert torch.equal(y[:, :-1], x[:, 1:]) and (y != IGNORE).all()


def test_a_chat_template_file_and_the_tokenizer_folders_template(tmp_path, capsys):
    source = write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS[:2])
    template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    write_file(str(tmp_path / "t.jinja"), template)
    out = ["--out", str(tmp_path / "d"), "--val-fraction", "0"]
    code, _, err = run(["prepare", "chat", source, *out, "--chat-template", str(tmp_path / "t.jinja")], capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["chat_template"] == template
    tokens, mask = split_stream(tmp_path / "d", "train")
    assert Tokenizer.gpt2().decode(tokens[mask].tolist()) == "Paris<|endoftext|> 7<|endoftext|>"
    # a model folder's template is the default when --tokenizer names it
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    Tokenizer.gpt2().save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    meta = prepare_chat([source], str(tmp_path / "d2"), tokenizer=str(model_dir), progress=False)
    assert meta["chat_template"] == template


@pytest.mark.parametrize(
    "line, expected",
    [
        ("not json", "chat.jsonl:2 is not JSON"),
        ("[1, 2]", "chat.jsonl:2 is not a JSON object"),
        ('{"text": "hi"}', "chat.jsonl:2 has neither 'messages' nor string 'prompt' and 'completion'"),
        ('{"prompt": "hi"}', "chat.jsonl:2 has neither"),
        ('{"messages": [{"role": "user", "content": 3}]}', "chat.jsonl:2: messages[0].content is not a string"),
        ('{"messages": [{"role": "tool", "content": "x"}]}', "chat.jsonl:2: the chat template rejects"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "chat.jsonl:2 has no assistant message"),
        ('{"messages": []}', "chat.jsonl:2: messages is not a non-empty list"),
    ],
)
def test_a_bad_line_is_one_error_naming_file_and_line(tmp_path, capsys, line, expected):
    source = write_file(str(tmp_path / "chat.jsonl"), json.dumps(CONVERSATIONS[1]) + "\n" + line + "\n")
    code, _, err = run(["prepare", "chat", source, "--out", str(tmp_path / "d"), "--quiet"], capsys)
    assert_one_line_error(code, err, expected)
    assert not (tmp_path / "d").exists()  # nothing half-written


def test_bad_inputs_and_options(tmp_path, capsys):
    text = write_file(str(tmp_path / "notes.txt"), "hello")
    code, _, err = run(["prepare", "chat", text, "--out", str(tmp_path / "d")], capsys)
    assert_one_line_error(code, err, "notes.txt is not a .jsonl or .jsonl.zst file")
    source, out = write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS[:2]), ["--out", str(tmp_path / "d")]
    code, _, err = run(["prepare", "chat", source, *out, "--chat-template", "nope.jinja"], capsys)
    assert_one_line_error(code, err, "chat template file nope.jinja not found")
    write_file(str(tmp_path / "bad.jinja"), "{% for %}")
    code, _, err = run(["prepare", "chat", source, *out, "--chat-template", str(tmp_path / "bad.jinja")], capsys)
    assert_one_line_error(code, err, "the chat template does not compile")
    # `gptwo prepare FILE` is unchanged: a .jsonl of text still prepares as documents
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": "one two three"}, {"text": "four five"}])
    code, _, err = run(["prepare", docs, "--out", str(tmp_path / "plain"), "--quiet"], capsys)
    assert code == 0, err
    assert "loss_mask" not in json.loads((tmp_path / "plain" / "meta.json").read_text())
