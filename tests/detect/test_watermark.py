"""The green-list watermark against transformers (the oracle): the same green lists, the same bias, each side's
detector finding the other's watermark; `gptwo detect --watermark` and `gptwo generate --watermark`."""

from __future__ import annotations

import json
import os

import pytest
import torch
from cli_testing import assert_one_line_error, run, write_file
from detect_testing import save_tiny, tiny_model
from transformers import GPT2LMHeadModel, WatermarkDetector, WatermarkingConfig
from transformers.generation.logits_process import WatermarkLogitsProcessor

from gptwo import Tokenizer
from gptwo.data.builtin import builtin_documents
from gptwo.errors import GptwoError
from gptwo.sampling import generate
from gptwo.watermark import Watermark, WatermarkSettings, settings_from_options, watermark_for, watermark_logits
from gptwo.weights import save_pretrained

KEYS = (15485863, 1, 2**62 + 12345)
VOCAB = 50257
NEW = 80  # tokens sampled per text


def oracle(settings: WatermarkSettings, vocab: int = VOCAB) -> WatermarkLogitsProcessor:
    return WatermarkLogitsProcessor(vocab, "cpu", **settings.transformers_config())


def test_defaults_are_transformers_watermarking_config():
    assert WatermarkSettings().transformers_config() == {
        k: v for k, v in WatermarkingConfig().to_dict().items() if k != "watermarking_type"
    }


@pytest.mark.parametrize("scheme", ["lefthash", "selfhash"])
@pytest.mark.parametrize("width", [1, 3])
def test_green_lists_equal_transformers(scheme, width):
    for key in KEYS:
        settings = WatermarkSettings(key=key, scheme=scheme, context_width=width, gamma=0.3)
        ours, theirs = Watermark(settings, VOCAB), oracle(settings)
        for context in ([5, 7, 50256], [1000, 2, 3], [0, 0, 49999]):
            assert torch.equal(ours.green_ids(context), theirs._get_greenlist_ids(torch.tensor(context)))


@pytest.mark.parametrize("scheme", ["lefthash", "selfhash"])
def test_the_bias_equals_transformers_processor(scheme):
    settings = WatermarkSettings(key=KEYS[2], scheme=scheme, context_width=2)
    scores = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0)) * 3
    contexts = [[1, 2, 3], [999, 4], [7, 7, 7]]  # one row each: rows of a batch have contexts of their own
    mark = Watermark(settings, 1000)
    biased = watermark_logits(scores, [mark, None, mark], contexts)
    for row in (0, 2):
        expected = oracle(settings, 1000)(torch.tensor([contexts[row]]), scores[row : row + 1])
        assert torch.equal(biased[row : row + 1], expected)
    assert torch.equal(biased[1], scores[1])  # no mark, no bias
    assert ((biased - scores) > 0).sum() == (
        2 * 250 if scheme == "lefthash" else (biased[[0, 2]] > scores[[0, 2]]).sum()
    )
    assert watermark_logits(scores[:1], [mark], [[5]]).equal(scores[:1])  # a context shorter than the seed: no bias


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 512-token BPE trained on the built-in corpus (small vocabularies keep the green lists cheap), and some
    held-out human text of that corpus."""
    root = tmp_path_factory.mktemp("bpe")
    docs = [d for d in builtin_documents() if len(d) > 3000]
    for i, doc in enumerate(docs[:8]):
        write_file(str(root / "corpus" / f"{i}.txt"), doc)
    return Tokenizer.train([str(root / "corpus")], vocab_size=512), [d[:3000] for d in docs[8:14]]


@pytest.fixture(scope="module")
def hf_model(small, tmp_path_factory):
    """A tiny saved GPT-2 with broad next-token distributions, and transformers' copy of it."""
    directory = save_tiny(str(tmp_path_factory.mktemp("wm") / "tiny"), tokenizer=small[0], block_size=128, std=0.1)
    return directory, GPT2LMHeadModel.from_pretrained(directory).eval()


def ours(directory: str):
    from gptwo.weights import load_model

    return load_model(directory, device="cpu")


@pytest.mark.parametrize("scheme", ["lefthash", "selfhash"])
def test_greedy_watermarked_text_equals_transformers(scheme, small, tmp_path):
    model = tiny_model(3, block_size=64, vocab_size=512)  # wide weights: clear winners, whatever the rounding
    save_pretrained(model, str(tmp_path), tokenizer=small[0])
    hf = GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    settings = WatermarkSettings(key=7, scheme=scheme, delta=4.0)
    prompt = torch.tensor([[464 % 512, 68, 75]])
    mine = generate(model, prompt, 20, temperature=0, watermark=settings)
    plain = generate(model, prompt, 20, temperature=0)
    theirs = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=20,
        do_sample=False,
        watermarking_config=WatermarkingConfig(**settings.transformers_config()),
        pad_token_id=0,
    )
    assert torch.equal(mine, theirs) and not torch.equal(mine, plain)


SCHEMES = {  # (settings, whether to count repeats once): see test_transformers_watermark_is_found_by_gptwo_detect
    "lefthash": (WatermarkSettings(key=KEYS[1]), False),
    "selfhash": (WatermarkSettings(key=KEYS[2], scheme="selfhash", delta=4.0), True),
}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_gptwo_watermark_is_found_by_transformers_detector(hf_model, scheme):
    directory, hf = hf_model
    model, _ = ours(directory)
    settings, ignore = SCHEMES[scheme]
    prompts = torch.tensor([[46, 68, 75]] * 2)
    marked = generate(model, prompts, NEW, seed=0, watermark=settings)[:, 3:]
    plain = generate(model, prompts, NEW, seed=0)[:, 3:]
    config = WatermarkingConfig(**settings.transformers_config())
    detector = WatermarkDetector(hf.config, "cpu", config, ignore_repeated_ngrams=ignore)
    found = detector(marked, z_threshold=4.0, return_dict=True)
    assert found.prediction.all(), found.z_score
    assert not detector(plain, z_threshold=4.0).any()
    mark = watermark_for(settings, 512)
    for row, z in zip(marked.tolist(), found.z_score):
        assert mark.score(row, ignore).z == pytest.approx(z)
    other_key = WatermarkDetector(hf.config, "cpu", WatermarkingConfig(**{**config.to_dict(), "hashing_key": 3}))
    assert not other_key(marked, z_threshold=4.0).any()  # the key matters


@pytest.mark.parametrize("scheme", SCHEMES)
def test_transformers_watermark_is_found_by_gptwo_detect(small, hf_model, scheme, tmp_path, capsys):
    """Transformers samples with the watermark from the same weights; `gptwo detect` reads the text back.

    selfhash at context width 1 is context-free: a token is green or red wherever it stands, so the repeats of
    human text ("the", ".") pile up (transformers' own detector gives such text z > 10): it counts repeats once."""
    directory, hf = hf_model
    tokenizer = small[0]
    settings, ignore = SCHEMES[scheme]
    torch.manual_seed(0)
    prompt = torch.tensor([tokenizer.encode("The quick brown fox")])
    out = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=NEW,
        do_sample=True,
        watermarking_config=WatermarkingConfig(**settings.transformers_config()),
    )
    marked = write_file(str(tmp_path / "marked.txt"), tokenizer.decode(out[0, prompt.shape[1] :].tolist()))
    human = write_file(str(tmp_path / "human.txt"), small[1][0])
    argv = ["detect", "--model", directory, "--json", "--watermark", "--watermark-key", str(settings.key)]
    argv += ["--watermark-scheme", scheme] + ["--ignore-repeated"] * ignore
    code, stdout, err = run([*argv, marked, human], capsys)
    assert code == 0, err
    found, other = (json.loads(line)["watermark"] for line in stdout.splitlines())
    assert found["detected"] and found["z"] >= 4 and found["tokens_scored"] >= 20, found
    assert set(found) >= {"z", "p_value", "green_fraction", "tokens_scored", "detected"}
    assert not other["detected"] and other["z"] < 4 and other["tokens_scored"] > 200, other
    assert "key" not in found["settings"]


@pytest.mark.parametrize("key", KEYS)
def test_human_text_stays_below_four(small, key):
    """Counting repeated n-grams once: documentation repeats itself (names, markup), and with a small vocabulary
    most token pairs recur, which pushes z up in text no one watermarked (docs/detect.md, Limits)."""
    tokenizer, human = small
    for scheme in ("lefthash", "selfhash"):
        mark = watermark_for(WatermarkSettings(key=key, scheme=scheme), 512)
        for doc in human:
            score = mark.score(tokenizer.encode_ordinary(doc), ignore_repeated=True)
            assert score.z < 4 and score.tokens_scored > 150, score.z


def test_ignore_repeated_counts_each_ngram_once():
    mark = watermark_for(WatermarkSettings(), VOCAB)
    tokens = [10, 20, 30] * 20  # (10, 20), (20, 30), (30, 10) over and over
    every, once = mark.score(tokens), mark.score(tokens, ignore_repeated=True)
    assert every.tokens_scored == 59 and once.tokens_scored == 3  # (10,20) (20,30) (30,10)
    assert once.flags[1] is not None and once.flags[4] is None


def test_generate_cli_watermarks_and_detect_reports_green_tokens(hf_model, tmp_path, capsys):
    directory, _ = hf_model
    argv = ["generate", "--model", directory, "--max-new-tokens", str(NEW), "--seed", "1", "The"]
    code, text, err = run([*argv, "--watermark", "--watermark-key", "99", "--watermark-delta", "3"], capsys)
    assert code == 0, err
    code, plain, err = run(argv, capsys)
    assert code == 0 and plain != text
    path = write_file(str(tmp_path / "gen.txt"), text.replace("\x00", ""))  # a random model writes NULs
    html = str(tmp_path / "report.html")
    detect = ["detect", "--model", directory, "--watermark", "--tokens", path, "--html", html]
    code, stdout, err = run([*detect, "--watermark-key", "99", "--json"], capsys)
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["watermark"]["detected"], doc["watermark"]
    greens = [row["green"] for row in doc["token_stats"]]
    assert greens[0] is None and set(greens[1:]) == {True, False}
    page = open(html, encoding="utf-8").read()
    assert "Watermark" in page and 'class="t wg"' in page and 'class="t wr"' in page
    code, stdout, err = run([*detect, "--watermark-key", "98", "--watermark-z", "3"], capsys)  # the wrong key
    assert code == 0 and "watermark: z" in stdout and "· not detected (z >= 3)" in stdout, stdout


def test_the_key_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("GPTWO_WATERMARK_KEY", " 42 ")
    assert settings_from_options(True).key == 42
    assert settings_from_options(True, key=5).key == 5
    monkeypatch.delenv("GPTWO_WATERMARK_KEY")
    assert settings_from_options(True) == WatermarkSettings() and settings_from_options(False) is None
    with pytest.raises(GptwoError, match="needs a key"):
        settings_from_options(True, require_key=True)


@pytest.mark.parametrize(
    "argv, env, expected",
    [
        (["generate", "--watermark", "--watermark-gamma", "1.5"], None, "--watermark-gamma: 1.5 is not"),
        (["generate", "--watermark", "--watermark-gamma", "0"], None, "--watermark-gamma: 0 is not"),
        (["generate", "--watermark", "--watermark-delta", "-1"], None, "--watermark-delta: -1 is not"),
        (["generate", "--watermark", "--watermark-scheme", "minhash"], None, "invalid choice: 'minhash'"),
        (["generate", "--watermark", "--watermark-key", "-3"], None, "--watermark-key: -3 is less than 0"),
        (["generate", "--watermark-delta", "2"], None, "--watermark-delta is given without --watermark"),
        (["generate", "--watermark"], "abc", "GPTWO_WATERMARK_KEY 'abc' is not a whole number"),
        (["generate", "--watermark"], "", "GPTWO_WATERMARK_KEY is empty"),
        (["detect", "--watermark", "--watermark-gamma", "0.001"], None, "leaves 0 of 512 tokens green"),
        (["detect", "--ignore-repeated"], None, "--ignore-repeated is given without --watermark"),
        (["detect", "--watermark", "--watermark-z", "nan"], None, "--watermark-z: nan is not"),
        (["serve", "--watermark"], None, "--watermark needs a key here"),
        (["serve", "--watermark-gamma", "0.5"], None, "--watermark-gamma is given without --watermark"),
    ],
)
def test_bad_watermark_settings_are_one_line_errors(argv, env, expected, hf_model, tmp_path, capsys, monkeypatch):
    directory, _ = hf_model
    monkeypatch.delenv("GPTWO_WATERMARK_KEY", raising=False)
    if env is not None:
        monkeypatch.setenv("GPTWO_WATERMARK_KEY", env)
    rest = {"generate": ["--model", directory, "hi"], "serve": ["--model", os.path.join(directory, "missing")]}
    text = write_file(str(tmp_path / "t.txt"), "some text to judge")
    code, _, err = run([*argv, *rest.get(argv[0], ["--model", directory, text])], capsys)
    assert_one_line_error(code, err, expected)
