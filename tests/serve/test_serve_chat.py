"""POST /v1/chat/completions through the official `openai` client, against a live server on 127.0.0.1: the answer is
offline generation from the rendered conversation (gptwo.chat.prompt_ids; transformers' apply_chat_template for
continue_final_message), streamed or whole; and the template rule (a model without one gets a 400)."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest
import torch
from serve_testing import LiveServer, serve_in_thread, tiny_model
from test_serve_api import assert_openai_error, get, post

from gptwo import Tokenizer
from gptwo.chat import CHAT_TEMPLATE, prompt_ids
from gptwo.errors import GptwoError
from gptwo.generate import generate
from gptwo.serve import BatchEngine, create_app
from gptwo.serve.app import served_chat_template
from gptwo.weights import load_model, save_pretrained

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there, how are you?"}]
EOT_PULL = 3.5  # how far the final layer norm leans towards <|endoftext|>: the greedy answer to MESSAGES ends early


def chat_model():
    """The tiny random GPT-2, leaning towards <|endoftext|> so that greedy answers end with it."""
    model = tiny_model()
    with torch.no_grad():
        eot = model.transformer.wte.weight[Tokenizer.gpt2().eot_token]
        model.transformer.ln_f.bias += EOT_PULL * eot / eot.norm()
    return model


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("chat"))
    save_pretrained(chat_model(), directory, tokenizer=Tokenizer.gpt2(), chat_template=CHAT_TEMPLATE)
    return directory


@pytest.fixture(scope="module")
def live(chat_dir):
    server, engine = serve_in_thread(chat_dir, app_kwargs={"chat_template": served_chat_template(chat_dir)})
    yield server, engine
    server.close()


@pytest.fixture(scope="module")
def offline(chat_dir):
    return load_model(chat_dir, device="cpu")


def greedy(offline, ids: list[int], max_tokens: int) -> list[int]:
    """gptwo's generate from `ids`, cut after the first <|endoftext|>."""
    model, tok = offline
    out = generate(model, torch.tensor([ids]), max_tokens, temperature=0)[0, len(ids) :].tolist()
    return out[: out.index(tok.eot_token) + 1] if tok.eot_token in out else out


def test_greedy_answer_is_offline_generation_from_the_rendered_conversation(client, offline):
    _, tok = offline
    ids = prompt_ids(tok, MESSAGES, CHAT_TEMPLATE)
    expected = greedy(offline, ids, 40)
    assert expected[-1] == tok.eot_token and len(expected) > 2  # the answer ends with end-of-text, not at the limit
    result = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=40)
    assert result.object == "chat.completion" and result.id.startswith("chatcmpl-") and len(result.choices) == 1
    choice = result.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == tok.decode(expected[:-1])
    assert choice.finish_reason == "stop"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(ids), len(expected))
    assert result.usage.total_tokens == len(ids) + len(expected)
    # max_completion_tokens (OpenAI's newer name) cuts it: finish_reason length
    cut = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_completion_tokens=2)
    assert cut.choices[0].message.content == tok.decode(expected[:2]) and cut.choices[0].finish_reason == "length"
    assert cut.usage.completion_tokens == 2


def test_stream_sends_a_role_then_content_deltas_that_add_up_to_the_plain_answer(live, client):
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=40)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            temperature=0,
            max_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    deltas = [c.choices[0] for c in chunks if c.choices]
    assert (deltas[0].delta.role, deltas[0].delta.content) == ("assistant", "")
    assert len(deltas) > 3 and "".join(d.delta.content or "" for d in deltas) == plain.choices[0].message.content
    assert [d.finish_reason for d in deltas] == [None] * (len(deltas) - 1) + ["stop"]
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()
    # on the wire: server-sent events ending with [DONE]
    body = json.dumps({"model": "tiny", "messages": MESSAGES, "max_tokens": 3, "stream": True}).encode()
    request = urllib.request.Request(live[0].url + "/v1/chat/completions", data=body, method="POST")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in response.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])
    assert "usage" not in json.loads(events[0][len("data: ") :])  # without include_usage, as OpenAI's


def test_n_choices_with_a_seed_sample_as_seed_plus_j(client):
    asked = {"model": "tiny", "messages": MESSAGES, "temperature": 1.0, "max_tokens": 12}
    both = client.chat.completions.create(n=2, seed=7, **asked)
    assert [c.index for c in both.choices] == [0, 1]
    texts = [c.message.content for c in both.choices]
    assert texts[0] != texts[1]
    assert client.chat.completions.create(n=2, seed=7, **asked).model_dump()["choices"] == both.model_dump()["choices"]
    # choice j samples with seed + j, whatever else the request holds
    assert client.chat.completions.create(seed=8, **asked).choices[0].message.content == texts[1]
    assert both.usage.completion_tokens == sum(
        client.chat.completions.create(seed=seed, **asked).usage.completion_tokens for seed in (7, 8)
    )


def test_stop_strings_end_the_answer_before_them(client, offline):
    _, tok = offline
    text = tok.decode(greedy(offline, prompt_ids(tok, MESSAGES), 40)[:-1])
    stop = text.split()[2]  # a word inside the answer
    result = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=40, stop=[stop])
    assert result.choices[0].message.content == text[: text.index(stop)]
    assert result.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        model="tiny", messages=MESSAGES, temperature=0, max_tokens=40, stop=stop, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[: text.index(stop)]


def test_logprobs_are_the_models_in_openais_chat_shape(client, offline):
    model, tok = offline
    result = client.chat.completions.create(
        model="tiny", messages=MESSAGES, temperature=0, max_tokens=4, logprobs=True, top_logprobs=3
    )
    content = result.choices[0].logprobs.content
    ids = prompt_ids(tok, MESSAGES)
    answer = greedy(offline, ids, 4)
    assert len(content) == result.usage.completion_tokens == len(answer)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids + answer]))[0, len(ids) - 1 : -1].float(), dim=-1)
    for entry, token, row in zip(content, answer, logprobs):
        assert entry.token == tok.decode([token]) and bytes(entry.bytes) == tok.token_bytes(token)
        assert entry.logprob == pytest.approx(row[token].item(), abs=1e-4)
        best = torch.topk(row, 3)
        assert [t.token for t in entry.top_logprobs] == [tok.decode([i]) for i in best.indices.tolist()]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
    streamed = client.chat.completions.create(
        model="tiny", messages=MESSAGES, temperature=0, max_tokens=4, logprobs=True, stream=True
    )
    parts = [c.choices[0].logprobs.content for c in streamed if c.choices and c.choices[0].logprobs]
    assert [entry.token for part in parts for entry in part] == [entry.token for entry in content]


def test_the_prompt_follows_the_template_options_as_transformers_renders_them(client, offline, chat_dir):
    from transformers import AutoTokenizer

    _, tok = offline
    oracle = AutoTokenizer.from_pretrained(chat_dir)
    started = [*MESSAGES, {"role": "assistant", "content": "I am"}]
    for messages, options in (
        (started, {"continue_final_message": True, "add_generation_prompt": False}),
        (MESSAGES, {"add_generation_prompt": False}),
    ):
        ids = list(oracle.apply_chat_template(messages, tokenize=True, return_dict=True, **options)["input_ids"])
        result = client.chat.completions.create(
            model="tiny", messages=messages, temperature=0, max_tokens=6, extra_body=options
        )
        assert result.usage.prompt_tokens == len(ids)
        expected = greedy(offline, ids, 6)
        assert result.choices[0].message.content == tok.decode([t for t in expected if t != tok.eot_token])
    # developer is read as system; content parts of type text are joined
    parts = [
        {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
        MESSAGES[1],
    ]
    same = client.chat.completions.create(model="tiny", messages=parts, temperature=0, max_tokens=6)
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=6)
    assert same.choices[0].message.content == plain.choices[0].message.content
    assert same.usage.prompt_tokens == plain.usage.prompt_tokens


def chat_error(client: openai.OpenAI, **asked) -> dict:
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**{"model": "tiny", "messages": MESSAGES, "max_tokens": 4, **asked})
    assert_openai_error(caught.value.body if "error" in caught.value.body else {"error": caught.value.body})
    return {"status": caught.value.status_code, **caught.value.body}


@pytest.mark.parametrize(
    ("asked", "param", "says"),
    [
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages.0.role", "serves no tools"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content", "a string or a list of text parts"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages.0.content",
            'type "image_url"',
        ),
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": [{"role": "user", "content": "x", "name": "ann"}]}, "messages.0.name", "no place for it"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "serves no tools"),
        ({"response_format": {"type": "json_object"}}, "response_format", '{"type": "text"}'),
        ({"top_logprobs": 2}, "top_logprobs", "needs logprobs: true"),
        ({"extra_body": {"continue_final_message": True}}, "continue_final_message", "add_generation_prompt: false"),
        ({"extra_body": {"chat_template": "{{ 1 }}"}}, "chat_template", "the server's"),
        ({"extra_body": {"chat_template_kwargs": {"messages": []}}}, "chat_template_kwargs", "may not set messages"),
        ({"extra_body": {"max_token": 3}}, "max_token", "did you mean 'max_tokens'"),
        ({"max_tokens": 600}, "max_tokens", "maximum context length is 512 tokens"),
    ],
)
def test_bad_requests_get_a_400_naming_the_field(client, asked, param, says):
    error = chat_error(client, **asked)
    assert error["status"] == 400 and error["param"] == param and says in error["message"], error


def test_a_conversation_longer_than_the_context_gets_the_context_error(client):
    long = [{"role": "user", "content": "word " * 600}]
    error = chat_error(client, messages=long, max_tokens=None)  # default max_tokens: what the context leaves
    assert error["status"] == 400 and error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "maximum context length is 512 tokens" in error["message"]
    assert chat_error(client, model="other")["status"] == 404


def test_a_model_without_a_chat_template_gets_a_400_saying_how_to_get_one(model_dir, tmp_path):
    assert served_chat_template(model_dir) is None
    model, tok = load_model(model_dir, device="cpu")
    server = LiveServer(create_app(BatchEngine(model, tok), "plain"), lifespan="off")  # refused before the engine
    try:
        body = json.dumps({"model": "plain", "messages": MESSAGES}).encode()
        status, payload, _ = post(server.url + "/v1/chat/completions", body)
        assert status == 400 and payload["error"]["code"] == "no_chat_template"
        assert "plain has no chat template" in payload["error"]["message"]
        assert "--chat-template FILE" in payload["error"]["message"]
        status, schema = get(server.url + "/openapi.json")
        assert status == 200 and "/v1/chat/completions" in schema["paths"]
        assert {"ChatCompletionRequest", "ChatCompletion", "ChatMessage"} <= set(schema["components"]["schemas"])
    finally:
        server.close()


def test_the_served_template_is_the_files_else_the_models(chat_dir, model_dir, tmp_path):
    other = tmp_path / "other.jinja"
    other.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}", encoding="utf-8")
    assert served_chat_template(chat_dir) == CHAT_TEMPLATE
    assert served_chat_template(chat_dir, str(other)) == other.read_text(encoding="utf-8")
    assert served_chat_template(model_dir, str(other)) == other.read_text(encoding="utf-8")
    (tmp_path / "broken.jinja").write_text("{% for %}", encoding="utf-8")
    (tmp_path / "empty.jinja").write_text(" \n", encoding="utf-8")
    for bad, says in (("broken.jinja", "does not compile"), ("missing.jinja", "cannot read"), ("empty.jinja", "empty")):
        with pytest.raises(GptwoError, match=says):
            served_chat_template(chat_dir, str(tmp_path / bad))
