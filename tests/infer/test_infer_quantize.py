"""int8 weight-only and bf16 on a small trained model: same greedy tokens mostly, perplexity within 1% of fp32."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from infer_fixtures import perplexity, train_small_model

from gptwo import GPT
from gptwo.cli import main
from gptwo.errors import GptwoError
from gptwo.infer import Decoder, native, prepare_model
from gptwo.infer.linear import Int8Linear, NativeLinear, TransposedLinear, quantize_int8


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("trained"))
    model, tokenizer, held_out = train_small_model(directory)
    ids = torch.tensor(tokenizer.encode(held_out))
    windows = ids[: (len(ids) // 64) * 64].view(-1, 64)
    return directory, model, tokenizer, held_out, windows


def test_the_model_learned_something(trained):
    _, model, tokenizer, _, windows = trained
    assert perplexity(model, windows) < tokenizer.n_vocab / 10  # far below uniform guessing


@pytest.mark.parametrize(
    "options", [{"quantize": "int8"}, {"dtype": "bf16"}, {"dtype": "fp32"}], ids=["int8", "bf16", "fp32-transposed"]
)
def test_held_out_perplexity_within_one_percent_of_fp32(trained, options):
    _, model, _, _, windows = trained
    reference = perplexity(model, windows)
    prepared = prepare_model(copy.deepcopy(model), **options)
    assert abs(perplexity(prepared, windows) / reference - 1) < 0.01


def test_int8_greedy_tokens_equal_fp32_for_most_tokens(trained):
    _, model, tokenizer, held_out, _ = trained
    prompts = [tokenizer.encode(s.strip() + ".")[:6] for s in held_out.split(".")[:8]]
    quantized = prepare_model(copy.deepcopy(model), quantize="int8")
    same = total = 0
    for prompt in prompts:
        idx = torch.tensor([prompt])
        expected = model.generate(idx, 40, temperature=0)[0, len(prompt) :]
        got = Decoder(quantized, max_len=64).generate(idx, 40)[0, len(prompt) :]
        same, total = same + int((expected == got).sum()), total + len(expected)
    assert same / total >= 0.9


def test_quantized_weights_round_trip_within_half_a_step():
    weight = torch.randn(48, 32)
    q, scales = quantize_int8(weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert torch.all((q.float() * scales[:, None] - weight).abs() <= scales[:, None] / 2 + 1e-6)


def test_from_pretrained_quantize_int8_swaps_every_linear_and_keeps_the_head_tied(trained):
    directory, model, _, _, windows = trained
    quantized = GPT.from_pretrained(directory, quantize="int8")
    linears = [
        m
        for m in quantized.modules()
        if isinstance(m, Int8Linear) or (isinstance(m, NativeLinear) and m.w.dtype == torch.int8)
    ]
    assert len(linears) == 4 * model.config.n_layer + 1
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.modules())
    assert quantized.lm_head.weight is quantized.transformer.wte.weight
    expected = prepare_model(copy.deepcopy(model), quantize="int8")(windows[:2])
    torch.testing.assert_close(quantized(windows[:2]), expected)


def test_fp32_preparation_re_lays_the_linears_and_keeps_logits(trained):
    _, model, _, _, windows = trained
    prepared = prepare_model(copy.deepcopy(model), dtype="fp32")
    assert isinstance(prepared.lm_head, NativeLinear if native.library() else TransposedLinear)
    torch.testing.assert_close(prepared(windows[:2]), model(windows[:2]), rtol=1e-4, atol=1e-4)


def test_bad_options_are_refused(trained):
    _, model, _, _, _ = trained
    with pytest.raises(GptwoError, match="int4"):
        prepare_model(copy.deepcopy(model), quantize="int4")
    with pytest.raises(GptwoError, match="fp16"):
        prepare_model(copy.deepcopy(model), dtype="fp16")
    prepared = prepare_model(copy.deepcopy(model), quantize="int8")
    with pytest.raises(GptwoError, match="already prepared"):
        prepare_model(prepared)


def test_cli_eval_and_generate_take_quantize_and_dtype(trained, tmp_path, capsys):
    directory, _, _, held_out, _ = trained
    text = tmp_path / "held_out.txt"
    text.write_text(held_out)
    ppl = {}
    for flags in ([], ["--quantize", "int8"], ["--dtype", "bf16"]):
        assert main(["eval", "ppl", "--model", directory, str(text), "--json", "--quiet", *flags]) == 0
        ppl[" ".join(flags)] = json.loads(capsys.readouterr().out)["perplexity"]
    assert abs(ppl["--quantize int8"] / ppl[""] - 1) < 0.01
    assert abs(ppl["--dtype bf16"] / ppl[""] - 1) < 0.02
    outputs = []
    for flags in ([], ["--quantize", "int8"]):
        assert (
            main(
                [
                    "generate",
                    "--model",
                    directory,
                    "--temperature",
                    "0",
                    "--max-new-tokens",
                    "12",
                    *flags,
                    "the cat sees",
                ]
            )
            == 0
        )
        outputs.append(capsys.readouterr().out)
    assert outputs[0].strip() and outputs[1].split()[:2] == outputs[0].split()[:2]
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", directory, "--quantize", "int4", "x"])
    assert exit_info.value.code == 2 and "int4" in capsys.readouterr().err


def test_a_prepared_model_refuses_to_be_saved(trained, tmp_path):
    _, model, _, _, _ = trained
    with pytest.raises(GptwoError, match="cannot be saved"):
        prepare_model(copy.deepcopy(model), quantize="int8").save_pretrained(str(tmp_path / "out"))
    assert not (tmp_path / "out" / "model.safetensors").exists()
