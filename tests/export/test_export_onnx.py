"""`gptwo export onnx`: optimum's decoder-with-past interface, run by onnxruntime, against gptwo's own logits."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from gptwo.export.onnx import (
    MODEL_FILE,
    QUANTIZED_FILE,
    empty_past,
    export_onnx,
    greedy,
    input_names,
    output_names,
    session,
    step_feed,
)
from gptwo.weights import load_model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained_dir) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("onnx") / "out")
    return out, export_onnx(trained_dir, out, quantize="int8")


@pytest.fixture(scope="module")
def model(trained_dir):
    return load_model(trained_dir, device="cpu")[0]


def test_folder_and_names_are_optimums(exported, model):
    out, report = exported
    assert {MODEL_FILE, QUANTIZED_FILE, "config.json", "tokenizer.json"} <= set(os.listdir(out))
    sess = session(os.path.join(out, MODEL_FILE))
    n_layer = model.config.n_layer
    assert [i.name for i in sess.get_inputs()] == input_names(n_layer)
    assert [o.name for o in sess.get_outputs()] == output_names(n_layer)
    assert input_names(n_layer)[:4] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key"]
    assert output_names(n_layer)[:3] == ["logits", "present.0.key", "present.0.value"]
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    assert shapes["attention_mask"] == ["batch_size", "past_sequence_length + sequence_length"]
    assert shapes["past_key_values.0.key"][0::2] == ["batch_size", "past_sequence_length"]
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["n_layer"] == n_layer
    assert report["checks"]["fp32"]["prefill_max_diff"] <= 1e-4


def test_logits_at_the_prompt_and_at_steps_with_past(exported, model):
    sess = session(os.path.join(exported[0], MODEL_FILE))
    ids = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).numpy()
    first = sess.run(None, step_feed(ids[:, :9].numpy(), 0, empty_past(model.config, 3)))
    assert np.abs(first[0] - reference[:, :9]).max() <= 1e-4
    assert first[1].shape == (3, model.config.n_head, 9, model.config.n_embd // model.config.n_head)
    second = sess.run(None, step_feed(ids[:, 9:10].numpy(), 9, first[1:]))  # one token with past
    assert np.abs(second[0][:, 0] - reference[:, 9]).max() <= 1e-4
    third = sess.run(None, step_feed(ids[:, 10:].numpy(), 10, second[1:]))  # two tokens with past
    assert np.abs(third[0] - reference[:, 10:]).max() <= 1e-4


def test_attention_mask_hides_left_padding(exported, model):
    """A row padded on the left (mask 0, positions from its first real token) gives the unpadded row's logits."""
    sess = session(os.path.join(exported[0], MODEL_FILE))
    real = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), real], dim=1)
    feed = step_feed(padded.numpy(), 0, empty_past(model.config, 1))
    feed["attention_mask"][:, :3] = 0
    feed["position_ids"] = np.array([[0, 0, 0, 0, 1, 2, 3, 4]], dtype=np.int64)
    logits = sess.run(None, feed)[0]
    with torch.no_grad():
        reference = model(real).numpy()
    assert np.isfinite(logits).all()
    assert np.abs(logits[:, 3:] - reference).max() <= 1e-4


def test_greedy_tokens_match_gptwo(exported, model):
    prompt = torch.randint(0, model.config.vocab_size, (2, 4), generator=torch.Generator().manual_seed(3))
    ours = greedy(session(os.path.join(exported[0], MODEL_FILE)), model.config, prompt.numpy(), 10)
    ids = prompt
    with torch.no_grad():
        for _ in range(10):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert np.array_equal(ours, ids.numpy())


def test_int8_is_close(exported, model):
    out, report = exported
    check = report["checks"]["int8"]
    assert 0 < check["prefill_max_diff"] < 0.2 and check["step_max_diff"] < 0.2  # quantized: close, not equal
    quantized = os.path.getsize(os.path.join(out, QUANTIZED_FILE + ".data"))
    assert quantized < 0.4 * os.path.getsize(os.path.join(out, MODEL_FILE + ".data"))
