"""optimizer=muon: which parameters Muon takes, Q/K/V orthogonalised apart (against torch's own Muon), exact
resume after SIGKILL, 2 DDP or FSDP processes equal to 1, and one-line errors for what it refuses."""

import signal
import subprocess
import sys
import time

import pytest
import torch
from test_train_distributed import torchrun
from train_fixtures import TINY, tiny_data, train_losses

from gptwo import GPT, GPTConfig
from gptwo.cli import main
from gptwo.config import TrainConfig
from gptwo.train.checkpoint import list_checkpoints
from gptwo.train.loop import run_training
from gptwo.train.optim import MuonWithAdamW, SplitMuon, make_optimizer, optimizer_flops_per_step
from gptwo.weights import load_model

MUON = [*TINY, "optimizer=muon"]


def _tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))


def test_every_parameter_in_exactly_one_group_and_matrices_on_muon():
    model = _tiny_model()
    optimizer = make_optimizer(model, TrainConfig(optimizer="muon"))
    assert isinstance(optimizer, MuonWithAdamW) and list(optimizer) == [optimizer.muon, optimizer.adamw]
    names = {id(p): name for name, p in model.named_parameters()}  # the tied head is the token embedding
    assert model.lm_head.weight is model.transformer.wte.weight
    placed = [
        (part, group.get("split"), names[id(p)])
        for part in optimizer
        for group in part.param_groups
        for p in group["params"]
    ]
    assert sorted(name for _, _, name in placed) == sorted(names.values())  # each parameter once, none left out
    on_muon = {name: split for part, split, name in placed if part is optimizer.muon}
    expected = {
        f"transformer.h.{i}.{layer}.weight": 3 if layer == "attn.c_attn" else 1
        for i in range(2)
        for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert on_muon == expected
    on_adamw = {name for part, _, name in placed if part is optimizer.adamw}
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"} <= on_adamw
    assert all(name.endswith(".bias") or "ln_" in name or "wte" in name or "wpe" in name for name in on_adamw)
    # AdamW decays the embeddings, not biases or norms; Muon decays its matrices
    decay = {names[id(p)] for g in optimizer.adamw.param_groups if g["weight_decay"] for p in g["params"]}
    assert decay == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert all(g["weight_decay"] == 0.1 and g["adjust_lr_fn"] == "match_rms_adamw" for g in optimizer.muon.param_groups)
    # optimizer=adamw: one AdamW over everything, as before
    adamw = make_optimizer(model, TrainConfig())
    assert isinstance(adamw, torch.optim.AdamW)
    assert sorted(names[id(p)] for g in adamw.param_groups for p in g["params"]) == sorted(names.values())
    # Muon's Newton-Schulz FLOPs are counted: per layer c_attn as 3 blocks of 32x32, c_proj 32x32, c_fc and
    # mlp.c_proj 32x128 (5 iterations of 4m²n + 2m³)
    square, wide = 4 * 32**3 + 2 * 32**3, 4 * 32 * 32 * 128 + 2 * 32**3
    assert optimizer_flops_per_step(optimizer) == 2 * 5 * (4 * square + 2 * wide)
    assert optimizer_flops_per_step(adamw) == 0


def test_qkv_blocks_step_as_three_matrices_of_torch_muon():
    """SplitMuon's fused (3C, C) matrix follows torch.optim.Muon on Q, K and V as separate (C, C) parameters."""
    c = 16
    torch.manual_seed(1)
    fused = torch.nn.Parameter(torch.randn(3 * c, c))
    apart = [torch.nn.Parameter(block.detach().clone()) for block in fused.detach().chunk(3)]
    whole = torch.nn.Parameter(fused.detach().clone())
    settings = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    ours = SplitMuon([{"params": [fused], "split": 3}], **settings)
    theirs = torch.optim.Muon(apart, **settings)
    unsplit = torch.optim.Muon([whole], **settings)
    for _ in range(3):  # momentum carries over between steps
        grad = torch.randn(3 * c, c)
        fused.grad, whole.grad = grad.clone(), grad.clone()
        for param, block in zip(apart, grad.chunk(3)):
            param.grad = block.clone()
        for optimizer in (ours, theirs, unsplit):
            optimizer.step()
    torch.testing.assert_close(fused.detach(), torch.cat([p.detach() for p in apart]), rtol=0, atol=1e-6)
    # one momentum buffer of the parameter's own shape, the three blocks' buffers stacked
    buffers = torch.cat([theirs.state[p]["momentum_buffer"] for p in apart])
    torch.testing.assert_close(ours.state[fused]["momentum_buffer"], buffers, rtol=0, atol=0)
    assert (fused - whole).abs().max() > 1e-3  # orthogonalising the fused matrix whole is a different update
    # split=1 is torch's Muon itself
    single, reference = (torch.nn.Parameter(torch.ones(8, 24)) for _ in range(2))
    single.grad = torch.randn(8, 24)
    reference.grad = single.grad.clone()
    SplitMuon([single], **settings).step()
    torch.optim.Muon([reference], **settings).step()
    assert torch.equal(single, reference)


def test_float32_newton_schulz_steps_as_torch_muon_up_to_bf16_rounding():
    """On CPUs without native bf16 the iteration runs in float32 (emulated bf16 made Muon 8x slower than AdamW):
    the same step as torch.optim.Muon's bf16 one, up to bf16's rounding, and the same momentum exactly."""
    from gptwo.train.optim import newton_schulz_dtype

    assert newton_schulz_dtype(torch.device("cuda")) == torch.bfloat16
    torch.manual_seed(2)
    start = torch.randn(3 * 16, 16) * 0.1
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    settings = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    fp32 = SplitMuon([ours], ns_dtype=torch.float32, **settings)
    reference = torch.optim.Muon([theirs], **settings)
    for _ in range(3):
        grad = torch.randn_like(start)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        fp32.step()
        reference.step()
    moved = (theirs - start).abs().max()
    assert (ours - theirs).abs().max() < 0.05 * moved  # bf16 keeps ~3 significant digits of each update
    assert not torch.equal(ours, theirs)  # it did not run torch's bf16 iteration
    torch.testing.assert_close(fp32.state[ours]["momentum_buffer"], reference.state[theirs]["momentum_buffer"])


def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path):
    data = tiny_data()
    settings = [*MUON, "max_steps=60", "checkpoint_every=5", "eval_every=1000", "sample_tokens=0"]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    run_training(data, straight, overrides=settings, progress=False)
    process = subprocess.Popen(
        [sys.executable, "-m", "gptwo.cli", "train", "--data", data, "--out", killed, *settings],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list_checkpoints(killed) and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = list_checkpoints(killed)
    assert done and done[-1][0] < 60
    run_training(data, killed, resume=True, progress=False)  # the run's saved config: optimizer=muon
    a, b = train_losses(straight), train_losses(killed)
    assert sorted(b) == list(range(1, 61))
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-6
    # an optimizer, not an architecture: the run folder is a GPT-2 model folder of the same shapes
    model, _ = load_model(killed, device="cpu")
    shapes = {k: v.shape for k, v in GPT(model.config).state_dict().items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes


@pytest.fixture(scope="module")
def muon_single_process(tmp_path_factory) -> str:
    one = str(tmp_path_factory.mktemp("muon") / "one")
    run_training(tiny_data(), one, overrides=[*MUON, *DISTRIBUTED_STEPS, "grad_accum=2"], progress=False)
    return one


DISTRIBUTED_STEPS = ["max_steps=6", "eval_every=3", "checkpoint_every=3", "sample_tokens=0"]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_with_grad_accum(tmp_path, muon_single_process, parallel):
    """DDP (whole matrices on every rank) and FSDP (each rank's rows; the update gathered for Newton-Schulz)."""
    one, two = muon_single_process, str(tmp_path / "two")
    result = torchrun(
        "train", "--data", tiny_data(), "--out", two, *MUON, *DISTRIBUTED_STEPS, "grad_accum=1", f"parallel={parallel}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = train_losses(one), train_losses(two)
    assert sorted(b) == list(range(1, 7))
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-5
    x, _ = load_model(one, device="cpu")
    y, _ = load_model(two, device="cpu")
    # DDP's mean gradient is bit-equal to grad_accum=2's, and so are the weights (measured: 0.0). FSDP's
    # reduce-scatter rounds differently by an ulp, which torch's bf16 Newton-Schulz amplifies: measured 1.6e-4
    # after 6 steps, where every matrix moved at least 6e-3 from its init (a wrong row slice would be that far)
    tolerance = 1e-4 if parallel == "ddp" else 5e-4
    for name, tensor in x.state_dict().items():
        assert (tensor - y.state_dict()[name]).abs().max() < tolerance, name
    if parallel == "fsdp":  # the sharded momentum buffers come back from the checkpoint, on every rank
        result = torchrun("train", "--data", tiny_data(), "--out", two, "--resume", "max_steps=8", "parallel=fsdp")
        assert result.returncode == 0, result.stderr[-3000:]
        assert sorted(train_losses(two)) == list(range(1, 9))


@pytest.mark.parametrize(
    "extra, names",
    [
        (["optimizer=sgd"], ["optimizer='sgd' is unknown", "optimizer=adamw or optimizer=muon"]),
    ],
    ids=["unknown-optimizer"],
)
def test_refused_settings_give_one_line(tmp_path, capsys, extra, names):
    assert main(["train", "--data", tiny_data(), "--out", str(tmp_path / "run"), *TINY, "max_steps=2", *extra]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and all(n in lines[0] for n in names), lines
    assert not (tmp_path / "run").exists() or not list_checkpoints(str(tmp_path / "run"))


def test_resume_cannot_change_the_optimizer(tmp_path, capsys):
    run = str(tmp_path / "run")
    run_training(tiny_data(), run, overrides=[*TINY, "max_steps=4", "sample_tokens=0"], progress=False)
    capsys.readouterr()
    assert main(["train", "--data", tiny_data(), "--out", run, "--resume", "max_steps=8", "optimizer=muon"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--resume cannot change optimizer" in lines[0] and "'adamw'" in lines[0], lines


def test_time_to_loss_bench_interleaves_runs_and_counts_training_seconds():
    from gptwo.bench.train import LossRun, loss_curve, loss_runs

    runs = loss_runs({"adamw": (1e-3, 2e-3, 4e-3), "muon": (3e-3,)}, {"muon": (300, 200)})
    assert runs == [
        LossRun("adamw", 1e-3, 3000),
        LossRun("muon", 3e-3, 300),
        LossRun("adamw", 2e-3, 3000),
        LossRun("muon", 3e-3, 200),
        LossRun("adamw", 4e-3, 3000),
    ]
    # two log windows of 10 steps at 100 and 50 steps/s (2 tokens a step), an evaluation after each
    rows = [
        {"step": 10, "loss": 5.0, "tokens_per_s": 200.0, "flops": 1e9},
        {"step": 10, "val_loss": 4.5, "val_bpb": 2.0},
        {"step": 20, "loss": 4.0, "tokens_per_s": 100.0, "flops": 2e9},
        {"step": 20, "val_loss": 4.0, "val_bpb": 1.8},
    ]
    curve = loss_curve(rows, tokens_per_step=2)
    assert [(r["step"], r["tokens"], r["flops"]) for r in curve] == [(10, 20, 1e9), (20, 40, 2e9)]
    assert [r["seconds"] for r in curve] == pytest.approx([0.1, 0.3])


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--batch-size", "4"], ["--batch-size does not apply to --to-loss"]),
        (["--lrs", "sgd=1e-3"], ["'sgd=1e-3' is not OPTIMIZER=V1,V2"]),
        (["--lrs", "adamw="], ["--to-loss adamw needs AdamW runs"]),
    ],
    ids=["speed-option", "unknown-optimizer", "no-adamw-runs"],
)
def test_time_to_loss_bench_refuses_bad_options_in_one_line(tmp_path, capsys, argv, names):
    try:
        code = main(["bench", "train", "--to-loss", "adamw", "--out", str(tmp_path / "bench"), *argv])
    except SystemExit as exit:  # argparse's usage errors
        code = exit.code
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and all(n in lines[0] for n in names), lines
    assert not (tmp_path / "bench").exists()  # refused before anything is prepared or trained
