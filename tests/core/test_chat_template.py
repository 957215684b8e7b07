"""gptwo's chat template against transformers' apply_chat_template on the same folder."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from gptwo import GPT, GPTConfig, Tokenizer
from gptwo.chat import CHAT_TEMPLATE, encode_chat, prompt_ids, read_chat_template
from gptwo.errors import GptwoError

CONVERSATION = [
    {"role": "system", "content": "  Be brief.\n"},
    {"role": "user", "content": "Hi there, 日本 ☃?"},
    {"role": "assistant", "content": "\n\nHello! 'sup"},
    {"role": "user", "content": "x"},
    {"role": "assistant", "content": "y  "},
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny model folder with GPT-2's tokenizer and gptwo's chat template in tokenizer_config.json."""
    path = tmp_path_factory.mktemp("chat_model")
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=64, vocab_size=50257))
    model.save_pretrained(str(path), tokenizer=Tokenizer.gpt2(), chat_template=CHAT_TEMPLATE)
    return path


def _ids(encoding) -> list[int]:
    return list(encoding["input_ids"] if hasattr(encoding, "keys") else encoding)


def test_transformers_reads_the_template_and_gives_gptwos_ids(folder):
    assert read_chat_template(str(folder)) == CHAT_TEMPLATE
    oracle = AutoTokenizer.from_pretrained(str(folder))
    ids, _ = encode_chat(Tokenizer.gpt2(), CONVERSATION)
    assert ids == _ids(oracle.apply_chat_template(CONVERSATION, tokenize=True))
    cue = _ids(oracle.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, tokenize=True))
    assert prompt_ids(Tokenizer.gpt2(), CONVERSATION[:2]) == cue


def test_mask_counts_the_assistants_text_and_end_marker_only():
    tok = Tokenizer.gpt2()
    ids, mask = encode_chat(tok, CONVERSATION)
    counted = tok.decode([i for i, m in zip(ids, mask) if m])
    assert counted == "Hello! 'sup<|endoftext|>y<|endoftext|>"
    assert all(encode_chat(tok, CONVERSATION, count_all=True)[1])


def test_bad_messages_get_one_clear_error():
    tok = Tokenizer.gpt2()
    with pytest.raises(GptwoError, match="role tool is not one of"):
        encode_chat(tok, [{"role": "tool", "content": "x"}])
    with pytest.raises(GptwoError, match=r"messages\[0\].content is not a string"):
        encode_chat(tok, [{"role": "user", "content": 3}])
    with pytest.raises(GptwoError, match="not a non-empty list"):
        encode_chat(tok, [])


def test_a_template_failing_inside_is_one_clear_error():
    from gptwo.chat import render

    broken = "{{ messages[0]['content'] + 1 }}"  # str + int: a TypeError inside the template
    with pytest.raises(GptwoError, match="chat template failed on these messages .TypeError"):
        render([{"role": "user", "content": "x"}], broken)
