"""Weights moved into the huge-page arena by prepare_model: same numbers, ties kept, copies still work."""

import copy

import pytest
import torch

from gptwo import GPT, GPTConfig
from gptwo.infer import arena, native, prepare_model
from gptwo.infer.linear import NativeLinear

needs_arena = pytest.mark.skipif(
    not arena.huge_pages_available() or native.library() is None,
    reason="no transparent huge pages (madvise/always) or no native kernels here",
)


def small_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=300, block_size=64, n_layer=2, n_head=2, n_embd=64)).eval()


def arena_bounds(model: GPT) -> tuple[int, int]:
    ptrs = [m.w.data_ptr() for m in model.modules() if isinstance(m, NativeLinear)]
    return min(ptrs), max(ptrs)


def into_arena(tensors: list[torch.Tensor]) -> list[torch.Tensor] | None:
    views = arena.arena_views(tensors)
    for view, t in zip(views or [], tensors, strict=False):
        view.copy_(t)
    return views


def test_arena_views_copy_in_order_and_align(monkeypatch):
    if not arena.huge_pages_available():
        assert into_arena([torch.ones(3)]) is None
        return
    tensors = [torch.randn(5, 7), torch.arange(11, dtype=torch.int8), torch.randn(3).bfloat16()]
    moved = into_arena(tensors)
    assert moved is not None and moved[0].data_ptr() % arena.HUGE_PAGE == 0
    for old, new in zip(tensors, moved, strict=True):
        assert new.dtype == old.dtype and new.shape == old.shape and torch.equal(new, old)
        assert new.data_ptr() % arena.ALIGN == 0 and new.data_ptr() != old.data_ptr()
    monkeypatch.setenv("GPTWO_HUGE_PAGES", "0")
    assert into_arena(tensors) is None


@needs_arena
@pytest.mark.parametrize("options", [{"dtype": "fp32"}, {"dtype": "bf16"}, {"quantize": "int8"}], ids=str)
def test_prepared_weights_live_in_the_arena_with_the_same_logits_and_ties(options, monkeypatch):
    model = small_model()
    seq = torch.randint(0, 300, (1, 12))
    monkeypatch.setenv("GPTWO_HUGE_PAGES", "0")
    plain = prepare_model(copy.deepcopy(model), **options)
    monkeypatch.setenv("GPTWO_HUGE_PAGES", "1")
    moved = prepare_model(copy.deepcopy(model), **options)
    wte = moved.transformer.wte.weight
    assert moved.lm_head.weight is wte  # the tie readers see
    if "quantize" not in options:
        assert moved.lm_head.w.data_ptr() == wte.data_ptr()  # the head still reads the embedding's storage
    low, high = arena_bounds(moved)
    assert low != arena_bounds(plain)[0] and high - low < 64 << 20  # one mapping, not the old tensors
    with torch.no_grad():
        torch.testing.assert_close(moved(seq), plain(seq), rtol=0, atol=0)
        torch.testing.assert_close(moved.generate(seq, 8, temperature=0), plain.generate(seq, 8, temperature=0))
    twin = copy.deepcopy(moved)  # a copy leaves the arena and keeps working
    with torch.no_grad():
        torch.testing.assert_close(twin(seq), plain(seq), rtol=0, atol=0)
