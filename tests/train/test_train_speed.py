"""The speed options of a training run: time budget, compiled steps, bf16 autocast, read-back only at log steps."""

from __future__ import annotations

import pytest
from test_train_errors import one_line_error
from train_fixtures import TINY, cli, tiny_data, train_losses

from gptwo.errors import GptwoError
from gptwo.train.checkpoint import list_checkpoints, read_trainer_state
from gptwo.train.loop import run_training
from gptwo.train.speed import onednn_available

QUIET = [
    "sample_tokens=0",
    "eval_every=1000",
    "checkpoint_every=1000",
    "compile=false",
]  # compile=auto would compile runs of 1,000 steps


def test_max_time_cuts_max_steps_once_warmup_ends_and_resume_keeps_it(tmp_path):
    run = str(tmp_path / "run")
    summary = run_training(
        tiny_data(),
        run,
        overrides=TINY + QUIET + ["max_steps=1000", "warmup_steps=3", "max_time=0.001"],
        progress=False,
    )
    assert summary["step"] == 20  # measured over the first 20 steps, no time left: stop there
    ((step, path),) = list_checkpoints(run)
    assert step == 20
    saved = read_trainer_state(path)["config"]
    assert saved["max_steps"] == 20 and saved["max_time"] == 0.0  # the schedule it trained with, for --resume
    again = run_training(tiny_data(), run, resume=True, progress=False)
    assert again["step"] == 20


def test_ample_max_time_changes_nothing(tmp_path):
    steps = ["max_steps=24", "warmup_steps=2", "seed=3"]
    run_training(tiny_data(), str(tmp_path / "a"), overrides=TINY + QUIET + steps, progress=False)
    run_training(tiny_data(), str(tmp_path / "b"), overrides=TINY + QUIET + steps + ["max_time=3600"], progress=False)
    assert train_losses(str(tmp_path / "a")) == train_losses(str(tmp_path / "b"))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_compiled_cpu_training_follows_eager(tmp_path, optimizer):
    steps = ["max_steps=6", "warmup_steps=2", f"optimizer={optimizer}"]
    run_training(
        tiny_data(), str(tmp_path / "eager"), overrides=TINY + QUIET + steps + ["compile=false"], progress=False
    )
    run_training(
        tiny_data(), str(tmp_path / "compiled"), overrides=TINY + QUIET + steps + ["compile=true"], progress=False
    )
    eager, compiled = train_losses(str(tmp_path / "eager")), train_losses(str(tmp_path / "compiled"))
    assert eager.keys() == compiled.keys()
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], abs=1e-4)


def test_bf16_autocast_on_cpu_learns_like_float32(tmp_path):
    steps = ["max_steps=16", "warmup_steps=2"]
    run_training(tiny_data(), str(tmp_path / "fp32"), overrides=TINY + QUIET + steps, progress=False)
    run_training(
        tiny_data(), str(tmp_path / "bf16"), overrides=TINY + QUIET + steps + ["dtype=bfloat16"], progress=False
    )
    fp32, bf16 = train_losses(str(tmp_path / "fp32")), train_losses(str(tmp_path / "bf16"))
    assert bf16[1] == pytest.approx(fp32[1], abs=0.02)
    assert bf16[16] == pytest.approx(fp32[16], abs=0.1) and bf16[16] < bf16[1] - 0.5


def test_divergence_between_log_steps_names_the_exact_step(tmp_path):
    run = str(tmp_path / "run")
    result = cli(
        "train",
        "--data",
        tiny_data(),
        "--out",
        run,
        *TINY,
        *QUIET,
        "max_steps=12",
        "log_every=5",
        "lr=1e30",
        "warmup_steps=0",
    )
    one_line_error(result, "diverged at step 2", "lower lr")
    assert list_checkpoints(run) == []


def test_max_time_must_not_be_negative():
    with pytest.raises(GptwoError, match="max_time"):
        run_training(tiny_data(), "unused", overrides=TINY + ["max_time=-1"], progress=False)


@pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN")
@pytest.mark.parametrize("compiled", [False, True])
def test_onednn_linears_give_torchs_loss_and_gradients(compiled):
    import torch

    from gptwo.config import GPTConfig, TrainConfig
    from gptwo.model import GPT
    from gptwo.train.loop import loss_fn
    from gptwo.train.speed import compiled_loss, use_onednn_linears

    config = GPTConfig(vocab_size=96, block_size=16, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    plain, fast = GPT(config), GPT(config)
    fast.load_state_dict(plain.state_dict())
    assert use_onednn_linears(fast, TrainConfig(dtype="float32"), torch.device("cpu"))
    assert not use_onednn_linears(
        GPT(config), TrainConfig(dtype="bfloat16"), torch.device("cpu")
    )  # bf16: autocast's own kernels
    tokens = torch.randint(0, 96, (3, 17), generator=torch.Generator().manual_seed(1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    expected = loss_fn(plain, x, y)
    expected.backward()
    got = (compiled_loss(loss_fn, TrainConfig(dtype="float32"), torch.device("cpu")) if compiled else loss_fn)(
        fast, x, y
    )
    got.backward()
    assert got.item() == pytest.approx(expected.item(), abs=1e-5)
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        assert torch.allclose(q.grad, p.grad, rtol=1e-4, atol=1e-6), name
    assert fast.state_dict().keys() == plain.state_dict().keys()
    with torch.no_grad():  # generation's shapes (a KV cache, one position) go through the same linears
        assert torch.allclose(fast(x[:, :5])[:, -1], plain(x[:, :5])[:, -1], atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_cpu_step_gives_the_plain_models_loss_and_gradients(dtype):
    """The compiled CPU step (CpuStepOps: sigmoid-form GELU, gptwo::embedding, bf16 matmul attention) against
    the eager model."""
    import torch

    from gptwo.config import GPTConfig, TrainConfig
    from gptwo.model import GPT
    from gptwo.train.loop import loss_fn
    from gptwo.train.speed import autocast, compiled_loss

    config, device = TrainConfig(dtype=dtype), torch.device("cpu")
    torch.manual_seed(0)
    eager = GPT(GPTConfig(vocab_size=96, block_size=16, n_layer=2, n_head=2, n_embd=32))
    compiled = GPT(eager.config)
    compiled.load_state_dict(eager.state_dict())
    tokens = torch.randint(0, 96, (3, 17), generator=torch.Generator().manual_seed(2))
    x, y = tokens[:, :-1], tokens[:, 1:]
    torch._dynamo.utils.counters.clear()
    with autocast(config, device):
        expected, got = loss_fn(eager, x, y), compiled_loss(loss_fn, config, device)(compiled, x, y)
    assert not torch._dynamo.utils.counters["graph_break"]  # the mode is traced, not a break
    expected.backward()
    got.backward()
    bf16 = dtype == "bfloat16"  # bf16 rounding, differently ordered
    assert got.item() == pytest.approx(expected.item(), abs=0.02 if bf16 else 1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert (
            torch.allclose(q.grad, p.grad, rtol=0.1, atol=2e-3)
            if bf16
            else torch.allclose(q.grad, p.grad, rtol=1e-4, atol=1e-6)
        ), name
    assert compiled.state_dict().keys() == eager.state_dict().keys()


def test_cpu_step_ops_replace_only_the_plain_calls(monkeypatch):
    import torch
    import torch.nn.functional as F

    from gptwo.train import speed

    calls = []
    for name in ("sigmoid_gelu", "embedding", "causal_attention"):
        monkeypatch.setattr(speed, name, (lambda f, n: lambda *a: calls.append(n) or f(*a))(getattr(speed, name), name))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, generator=g) * 4
    q, k, v = (torch.randn(2, 3, 8, 4, generator=g) for _ in range(3))
    table = torch.nn.Embedding(10, 4)
    idx = torch.tensor([[1, 3, 3, 9]])
    with speed.CpuStepOps(attention=True):
        gelu, erf_gelu = F.gelu(x, approximate="tanh"), F.gelu(x)
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(8, 8, dtype=torch.bool).tril())
        rows, padded = table(idx), F.embedding(idx, table.weight, padding_idx=0)
    assert calls == ["sigmoid_gelu", "causal_attention", "embedding"]  # the erf GELU, a mask, padding_idx pass through
    assert torch.allclose(gelu, F.gelu(x, approximate="tanh"), atol=1e-6) and torch.equal(erf_gelu, F.gelu(x))
    assert torch.allclose(attention, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6)
    assert (
        torch.allclose(masked, attention, atol=1e-6)
        and torch.equal(rows, table.weight[idx])
        and torch.equal(padded, rows)
    )
    calls.clear()
    with speed.CpuStepOps(attention=False):
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
        F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.5)
    assert calls == []


def test_embedding_op_gives_torchs_gradient_for_repeated_rows():
    import torch

    from gptwo.train.speed import embedding

    weight = torch.randn(7, 5, requires_grad=True)
    idx = torch.tensor([[0, 2, 2], [6, 2, 0]])
    grad = torch.randn(2, 3, 5)
    embedding(weight, idx).backward(grad)
    ours = weight.grad.clone()
    weight.grad = None
    torch.nn.functional.embedding(idx, weight).backward(grad)
    assert torch.allclose(ours, weight.grad) and ours[2].abs().sum() > 0
    torch.library.opcheck(embedding, (weight, idx))


def test_freed_memory_is_kept_on_linux_cpus():
    import sys

    import torch

    from gptwo.train.speed import keep_freed_memory

    assert keep_freed_memory(torch.device("cpu")) == sys.platform.startswith("linux")
    assert not keep_freed_memory(torch.device("meta"))


def test_time_budget_cuts_again_when_the_machine_slows_down(monkeypatch):
    from gptwo.config import TrainConfig
    from gptwo.train import loop

    clock = [0.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock[0])
    budget = loop._TimeBudget(TrainConfig(max_time=300.0, warmup_steps=20, max_steps=1000), 0, 0.0)
    steps, step = 1000, 0

    def run_to(last: int, seconds_per_step: float) -> None:
        nonlocal steps, step
        while step < min(last, steps):
            step += 1
            clock[0] += seconds_per_step
            if budget.due(step):
                steps = budget.steps_that_fit(step, steps)

    run_to(100, 0.5)  # 2 steps/s at the end of warm-up: 0.9 * 290 s * 2 = 522 more steps
    assert steps == 20 + 522
    run_to(10_000, 1.0)  # half the speed from step 100 on: cut again (never lengthened), and ends in time
    assert step == steps < 542 and clock[0] <= 300.0


def test_time_budget_leaves_evaluations_out_of_the_rate_and_keeps_time_for_the_last(monkeypatch):
    from gptwo.config import TrainConfig
    from gptwo.train import loop

    clock = [0.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock[0])
    budget = loop._TimeBudget(TrainConfig(max_time=300.0, warmup_steps=20, max_steps=10_000), 0, 0.0)
    for step in range(1, 21):
        clock[0] += 0.5
        budget.due(step)
    assert budget.steps_that_fit(20, 10_000) == 20 + 522  # 2 steps/s, 0.9 x 290 s left
    for step in range(21, 71):
        clock[0] += 0.5
        if step == 40:  # a 10 s evaluation inside the window
            clock[0] += 10.0
            budget.pause(10.0)
    assert budget.due(70)
    # still 2 steps/s; the time left less the 10 s a last evaluation takes: 0.9 x (300 - 45 - 10) x 2
    assert budget.steps_that_fit(70, 542) == 70 + int(0.9 * 245 * 2.0)
