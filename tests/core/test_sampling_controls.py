"""Logit controls (gptwo.sampling.LogitControls) against transformers' logits processors and OpenAI's
definitions on random logits, and `gptwo generate`'s options for them, in-process."""

from __future__ import annotations

import random

import pytest
import torch
from cli_testing import assert_one_line_error
from sampling_reference import openai_penalties, processors, reference_greedy
from serve_testing import save_tiny_model
from transformers import TopKLogitsWarper

from gptwo import GptwoError
from gptwo.cli import main
from gptwo.sampling import LogitControls, control_logits, filter_logits
from gptwo.weights import load_model

VOCAB, EOS = 300, 299


def histories(seed: int, rows: int):
    rng = random.Random(seed)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randrange(1, 12))] for _ in range(rows)]
    outputs = [[rng.randrange(40) for _ in range(rng.randrange(0, 20))] for _ in range(rows)]  # repeats likely
    return prompts, outputs


CASES = [
    dict(repetition_penalty=1.7),
    dict(repetition_penalty=0.6),
    dict(logit_bias=((3, 5.0), (7, -100.0), (EOS, 2.5))),
    dict(min_tokens=10),
    dict(presence_penalty=1.5, frequency_penalty=-0.5),
    dict(presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=1.3, logit_bias=((5, 3.0),), min_tokens=8),
]


@pytest.mark.parametrize("settings", CASES, ids=lambda s: ",".join(s))
def test_controls_equal_transformers_processors_and_openai_definitions(settings):
    torch.manual_seed(0)
    prompts, outputs = histories(1, 6)
    logits = torch.randn(6, VOCAB) * 4
    controls = LogitControls(**settings)
    got = control_logits(logits, [controls] * 6, prompts, outputs, EOS)
    for row in range(6):
        chain = processors(
            len(prompts[row]),
            EOS,
            settings.get("repetition_penalty", 1.0),
            dict(settings.get("logit_bias", ())),
            settings.get("min_tokens", 0),
        )
        ids = torch.tensor([prompts[row] + outputs[row]])
        want = logits[row : row + 1].clone()
        for processor in chain:
            want = processor(ids, want)
        want = openai_penalties(
            want, outputs[row], settings.get("presence_penalty", 0), settings.get("frequency_penalty", 0)
        )
        torch.testing.assert_close(got[row : row + 1], want, rtol=1e-6, atol=1e-5)
    assert not torch.equal(got, logits)


def test_each_row_gets_its_own_controls_and_untouched_rows_stay():
    prompts, outputs = histories(2, 3)
    logits = torch.randn(3, VOCAB)
    mixed = [LogitControls(repetition_penalty=2.0), None, LogitControls(presence_penalty=1.0)]
    got = control_logits(logits, mixed, prompts, outputs, EOS)
    for row, controls in enumerate(mixed):
        alone = control_logits(logits[row : row + 1], [controls], prompts[row : row + 1], outputs[row : row + 1], EOS)
        assert torch.equal(got[row : row + 1], alone)
    assert torch.equal(got[1], logits[1])
    assert control_logits(logits, [None, LogitControls(), None], prompts, outputs, EOS) is logits  # nothing to do


def test_top_k_equals_transformers_top_k_warper():
    logits = torch.randn(4, VOCAB)
    for k in (1, 5, 40):
        want = TopKLogitsWarper(top_k=k)(None, logits.clone())
        assert torch.equal(filter_logits(logits, top_k=k), want)


def test_bias_is_clipped_and_bad_controls_are_refused():
    assert LogitControls(logit_bias=((1, 500.0), (2, -1e9))).logit_bias == ((1, 100.0), (2, -100.0))
    for bad in (
        dict(presence_penalty=2.5),
        dict(frequency_penalty=float("nan")),
        dict(repetition_penalty=0.0),
        dict(min_tokens=-1),
        dict(logit_bias=((-1, 1.0),)),
    ):
        with pytest.raises(GptwoError):
            LogitControls(**bad)
    with pytest.raises(GptwoError, match="outside the vocabulary"):
        LogitControls(logit_bias=((VOCAB, 1.0),)).check_vocab(VOCAB)


# ---- gptwo generate
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("model"))
    save_tiny_model(folder)  # wide random weights: clear winners, greedy text is no tie-break
    return folder


def generate(capsys, model_dir, *options) -> tuple[int, str, str]:
    argv = ["generate", "--model", model_dir, "--device", "cpu", "--temperature", "0", "--max-new-tokens", "12"]
    code = main([*argv, *options, "The cat sat on the mat"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_options_give_the_reference_text(capsys, model_dir):
    model, tok = load_model(model_dir, device="cpu")
    prompt = tok.encode("The cat sat on the mat")
    options = ["--repetition-penalty", "3", "--frequency-penalty", "1", "--presence-penalty", "0.5"]
    options += ["--logit-bias", "11=8", "--logit-bias", "13=6"]
    want = reference_greedy(
        model, prompt, 12, tok.eot_token, repetition=3.0, frequency=1.0, presence=0.5, bias={11: 8.0, 13: 6.0}
    )
    assert want != reference_greedy(model, prompt, 12, tok.eot_token)
    code, out, _ = generate(capsys, model_dir, *options)
    assert code == 0 and out == tok.decode([t for t in want if t != tok.eot_token])


def test_generate_min_tokens_and_ignore_eos(capsys, model_dir):
    end = ["--logit-bias", "50256=100"]
    assert generate(capsys, model_dir, *end)[1] == ""  # end-of-text at once
    code, out, _ = generate(capsys, model_dir, *end, "--ignore-eos")
    assert code == 0 and out == "<|endoftext|>" * 12
    model, tok = load_model(model_dir, device="cpu")
    want = reference_greedy(
        model, tok.encode("The cat sat on the mat"), 12, tok.eot_token, bias={50256: 100}, min_tokens=4
    )
    assert len(want) == 5 and want[-1] == tok.eot_token
    assert generate(capsys, model_dir, *end, "--min-tokens", "4")[1] == tok.decode(want[:-1])


@pytest.mark.parametrize(
    "options, words",
    [
        (["--logit-bias", "11"], "is not ID=BIAS"),
        (["--logit-bias", "x=1"], "is not ID=BIAS"),
        (["--logit-bias", "11=inf"], "is not ID=BIAS"),
        (["--logit-bias", "60000=1"], "outside the vocabulary"),
        (["--presence-penalty", "3"], "[-2, 2]"),
        (["--repetition-penalty", "0"], "(0, inf)"),
        (["--min-tokens", "-1"], "less than 0"),
        (["--repetition-penalty", "1.2", "--speculate", "ngram"], "do not combine with speculative decoding"),
    ],
)
def test_generate_bad_control_options_are_one_line(capsys, model_dir, options, words):
    try:
        code = main(["generate", "--model", model_dir, "--device", "cpu", *options, "hi"])
    except SystemExit as exit:  # argparse's usage errors
        code = exit.code
    assert_one_line_error(code, capsys.readouterr().err, words)
