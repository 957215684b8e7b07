"""Building and loading the native kernels: ISA choice, the private cache (refusals, planted and truncated
files), the ABI check, the build's limits, `gptwo kernels info|build`, and the kernels' own C test on
every ISA this CPU runs and, cross-built, on aarch64 under qemu-user."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gptwo.cli import main
from gptwo.errors import GptwoError
from gptwo.infer import native

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ROOT / "src" / "gptwo" / "infer" / "kernels" / "gptwo_kernels.c"
C_TEST = Path(__file__).with_name("kernels_test.c")
HAS_CC = shutil.which(os.environ.get("CC", "cc")) is not None
needs_cc = pytest.mark.skipif(not HAS_CC, reason="no C compiler on this machine")
RUNNABLE_ISAS = [isa for isa, why in native.isa_support().items() if why is None]


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty kernel cache and a loader that has forgotten what it loaded (before and after)."""
    monkeypatch.setenv("GPTWO_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.delenv("GPTWO_KERNEL_ISA", raising=False)
    monkeypatch.delenv("GPTWO_NATIVE", raising=False)
    native.reset()
    yield monkeypatch
    native.reset()


def test_isa_support_reads_the_cpu_flags():
    avx2_only = {"avx", "avx2", "fma", "f16c", "sse4_2"}
    assert native.isa_support(avx2_only, "x86_64") == {
        "avx512": "this CPU lacks avx512f, avx512bw, avx512vl",
        "avx2": None,
        "neon": "not an aarch64 CPU",
        "generic": None,
    }
    assert native.isa_support({"avx512f", "avx512bw", "avx512vl", "avx2", "fma"}, "x86_64")["avx512"] is None
    assert native.isa_support({"sse2"}, "x86_64")["avx2"] == "this CPU lacks avx2, fma"
    arm = native.isa_support({"fp", "asimd"}, "aarch64")
    assert arm["neon"] is None and arm["avx2"] == "not an x86-64 CPU" and arm["generic"] is None


def test_gptwo_kernel_isa_forces_one_and_refuses_what_cannot_run(fresh):
    assert native.chosen_isa() == native.best_isa()
    fresh.setenv("GPTWO_KERNEL_ISA", "generic")
    assert native.chosen_isa() == "generic"
    fresh.setenv("GPTWO_KERNEL_ISA", "sse9")
    with pytest.raises(GptwoError, match="not an instruction set"):
        native.chosen_isa()
    impossible = next((isa for isa, why in native.isa_support().items() if why is not None), None)
    fresh.setenv("GPTWO_KERNEL_ISA", impossible)
    with pytest.raises(GptwoError, match="cannot run here"):
        native.chosen_isa()


@pytest.mark.parametrize("isa", ["avx2", "neon", "generic"])
def test_a_forced_isa_without_bf16_turns_native_bf16_off(monkeypatch, isa):
    """Forcing avx2 on an AVX-512 BF16 machine stands for an AVX2 machine: training and --dtype auto pick fp32."""
    import torch

    import gptwo.runtime as runtime

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.delenv("GPTWO_KERNEL_ISA", raising=False)
    assert runtime.native_bf16()
    monkeypatch.setenv("GPTWO_KERNEL_ISA", isa)
    assert not runtime.native_bf16()
    assert runtime.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setenv("GPTWO_KERNEL_ISA", "avx512")
    assert runtime.native_bf16()


@needs_cc
@pytest.mark.parametrize("isa", RUNNABLE_ISAS)
def test_each_isa_builds_into_its_own_library_and_says_what_it_is(fresh, isa):
    fresh.setenv("GPTWO_KERNEL_ISA", isa)
    lib = native.library()
    assert lib is not None and lib.gptwo_isa().decode() == isa and lib.gptwo_abi() == native.ABI
    assert any(p.name.startswith(f"gptwo_kernels_{isa}_") for p in Path(native.cache_dir()).iterdir())


@needs_cc
def test_the_cache_is_private_and_a_shared_one_is_refused(fresh, capsys):
    assert native.library() is not None
    directory = Path(native.cache_dir())
    assert directory.stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o022 == 0 for p in directory.iterdir())
    native.reset()
    directory.chmod(0o770)  # group-writable: someone else could have put a library there
    assert native.library() is None
    assert "writable by others (mode 770)" in capsys.readouterr().err
    assert main(["kernels", "build"]) == 2
    assert "rm -r" in capsys.readouterr().err


@needs_cc
def test_a_cache_of_another_user_is_refused(fresh, capsys):
    directory = Path(native.cache_dir())
    directory.mkdir(mode=0o700)
    if os.geteuid() != 0:
        pytest.skip("only root can give a folder to another user")
    os.chown(directory, 12345, 12345)
    assert native.library() is None
    assert "belongs to another user (uid 12345)" in capsys.readouterr().err


@needs_cc
def test_a_planted_or_truncated_library_is_never_loaded_but_rebuilt(fresh, capsys):
    assert native.library() is not None
    library = next(p for p in Path(native.cache_dir()).glob("*.so"))
    good = library.read_bytes()
    for planted in (b"\x7fELF not ours", good[: len(good) // 2]):  # a planted file, a build cut short
        fake = library.with_suffix(".new")
        fake.write_bytes(planted)
        os.replace(fake, library)  # a new file: the one this process has mapped stays intact
        native.reset()
        lib = native.library()
        assert (
            lib is not None and lib.gptwo_abi() == native.ABI
        )  # it was rebuilt, not loaded (a half ELF would be SIGBUS)
        assert library.read_bytes() == good and "compiling" in capsys.readouterr().err


@needs_cc
def test_a_library_of_another_abi_is_refused(fresh, capsys, tmp_path):
    fresh.setattr(native, "ABI", native.ABI + 1)  # what an older or newer gptwo's library looks like to this one
    assert native.library() is None
    assert f"has ABI {native.ABI - 1}, this gptwo needs {native.ABI}" in capsys.readouterr().err


@needs_cc
def test_a_library_of_this_abi_that_lacks_a_function_is_refused(fresh, capsys):
    """A source that answers the ABI check but has no kernels: a one-line note and torch's path, not a bug line."""
    fresh.setattr(native, "source", lambda: f"int gptwo_abi(void) {{ return {native.ABI}; }}\n".encode())
    assert native.library() is None
    err = capsys.readouterr().err
    assert "lacks a kernel function" in err and "rm " in err and "Traceback" not in err


def test_a_failing_compiler_shows_its_first_error_and_keeps_the_rest_for_debug(fresh, tmp_path, capsys):
    cc = tmp_path / "cc"
    cc.write_text(
        "#!/bin/sh\n"
        "[ \"$1\" = --version ] && { echo 'fake cc 1.0'; exit 0; }\n"
        "echo 'note: first' >&2\n"
        "echo 'k.c:1: error: broken' >&2\n"
        "echo 'more detail' >&2\n"
        "exit 1\n"
    )
    cc.chmod(0o755)
    fresh.setenv("CC", str(cc))
    assert native.library() is None
    assert "the compiler failed: k.c:1: error: broken" in capsys.readouterr().err
    assert main(["kernels", "build"]) == 2
    err = capsys.readouterr().err
    assert "kernels did not build: the compiler failed: k.c:1: error: broken" in err and "more detail" not in err
    with pytest.raises(GptwoError, match="did not build"):  # --debug: the compiler's whole output, then the traceback
        main(["--debug", "kernels", "build"])
    assert "more detail" in capsys.readouterr().err


def test_a_compiler_that_hangs_is_stopped(fresh, tmp_path, capsys):
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo 'slow cc'; exit 0; }\nexec sleep 30\n")
    cc.chmod(0o755)
    fresh.setenv("CC", str(cc))
    fresh.setenv("GPTWO_KERNEL_BUILD_TIMEOUT", "1")
    assert native.library() is None
    assert "the compiler took over 1 s" in capsys.readouterr().err


def test_the_compilers_identity_is_part_of_the_cache_key(fresh, tmp_path):
    source = native.source()
    paths = []
    for version in ("1.0", "2.0"):
        cc = tmp_path / f"cc{version}"
        cc.write_text(f"#!/bin/sh\necho 'fake cc {version}'\n")
        cc.chmod(0o755)
        fresh.setenv("CC", str(cc))
        native.reset()
        paths.append(native.library_path("generic", source))
    assert paths[0] != paths[1]


@needs_cc
def test_kernels_info_and_build(fresh, capsys):
    assert main(["kernels", "info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["isa"] == native.best_isa() and not info["built"] and info["status"].startswith("not built")
    assert set(info["isas"]) == set(native.ISAS) and info["cache"] == native.cache_dir()
    assert main(["kernels", "build"]) == 0
    assert native.cache_dir() in capsys.readouterr().out
    assert main(["kernels", "info"]) == 0
    out = capsys.readouterr().out
    assert "status    on" in out and "fp32      fp32" in out and f"isa       {native.best_isa()}" in out
    fresh.setenv("GPTWO_KERNEL_ISA", "bogus")
    assert main(["kernels", "build"]) == 2
    assert "GPTWO_KERNEL_ISA=bogus" in capsys.readouterr().err


# ---------------------------------------------------------------- the kernels' own C test
def _run_c_test(compiler: str, flags: list[str], tmp_path: Path, runner: list[str] | None = None) -> str:
    binary = tmp_path / "kernels_test"
    subprocess.run(
        [compiler, "-O2", *flags, "-fopenmp", str(C_TEST), str(KERNELS), "-lm", "-o", str(binary)],
        check=True,
        timeout=300,
    )
    done = subprocess.run([*(runner or []), str(binary)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    return done.stdout


@needs_cc
@pytest.mark.parametrize("isa", RUNNABLE_ISAS)
def test_the_c_test_passes_on_each_isa_this_cpu_runs(isa, tmp_path):
    out = _run_c_test(os.environ.get("CC", "cc"), native.ISA_FLAGS[isa], tmp_path)
    assert out.startswith(f"isa {isa}, abi {native.ABI}") and " 0 failed" in out.splitlines()[-1]


AARCH64_CC, QEMU = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")


@pytest.mark.skipif(
    not (AARCH64_CC and QEMU),
    reason="needs Debian's gcc-aarch64-linux-gnu and qemu-user (scripts/setup.sh test installs them)",
)
def test_the_c_test_passes_on_aarch64_neon_under_qemu(tmp_path):
    out = _run_c_test(AARCH64_CC, native.ISA_FLAGS["neon"], tmp_path, [QEMU, "-L", "/usr/aarch64-linux-gnu"])
    assert out.startswith(f"isa neon, abi {native.ABI}") and " 0 failed" in out.splitlines()[-1]
