"""`gptwo kernels info|build`: which native CPU kernels this machine runs, and building them ahead of first use."""

from __future__ import annotations

import argparse
import json
import os
import sys

from gptwo.errors import GptwoError


def add_commands(sub) -> None:
    """Register `gptwo kernels` and its subcommands on the root parser's subparsers."""
    kernels = sub.add_parser(
        "kernels",
        help="gptwo's native CPU kernels: what runs here, and building them ahead.",
        description="gptwo's native CPU kernels (one C source, built per instruction set): what this machine runs, "
        "and building them ahead of first use. GPTWO_KERNEL_ISA=avx512|avx2|neon|generic forces an ISA.",
    )
    ksub = kernels.add_subparsers(dest="kernels_command", required=True, parser_class=type(kernels), metavar="ACTION")
    info = ksub.add_parser(
        "info",
        help="print the ISA in use, why others are off, the compiler, the cache and the kernel per precision",
        description="Print the ISA in use, why the others are off, the compiler, the cache folder "
        "and the kernel each precision runs. Builds nothing.",
    )
    info.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    info.set_defaults(func=_cmd_info)
    build = ksub.add_parser(
        "build",
        help="compile the kernels now (as the first decode would), so later starts do not wait",
        description="Compile the kernels now into the private cache, "
        "for the ISA in use or for every ISA this CPU runs.",
    )
    build.add_argument("--all", action="store_true", help="build for every ISA this CPU runs, not only the one in use")
    build.set_defaults(func=_cmd_build)


def kernel_info() -> dict:
    """What `gptwo kernels info` reports, without building anything."""
    from gptwo.infer import native

    support = native.isa_support()
    info: dict = {
        "isa": None,
        "forced": bool(native.forced_isa()),
        "best": native.best_isa(),
        "isas": {isa: "runs here" if why is None else f"off: {why}" for isa, why in support.items()},
        "native": os.environ.get("GPTWO_NATIVE", "1") != "0",
        "cache": native.cache_dir(),
        "compiler": None,
        "compiler_version": None,
        "command": None,
        "library": None,
        "built": False,
        "status": None,
        "kernels": {},
        "torch_native_bf16": native.native_bf16(),
    }
    try:
        info["isa"] = native.chosen_isa()
    except GptwoError as err:
        info["status"] = f"off: {err.what}"
        return info
    try:
        path, version = native.compiler()
        info.update(compiler=path, compiler_version=version, command=" ".join(native.build_command(info["isa"], path)))
        info["library"] = native.library_path(info["isa"], native.source())
        info["built"] = os.path.exists(info["library"])
    except OSError as err:
        info["status"] = f"off: {err}"
        return info
    if not info["native"]:
        info["status"] = "off: GPTWO_NATIVE=0"
    elif not info["built"]:
        info["status"] = "not built yet (the first decode or `gptwo kernels build` compiles it)"
    else:
        lib = native.library()
        info["status"] = "on" if lib is not None else f"off: {native.why_off()}"
        if lib is not None:
            for precision in ("fp32", "bf16", "int8"):
                kind = native.kind_for(precision)
                info["kernels"][precision] = {
                    "kernel": native.KIND_NAMES[kind],
                    "own_instruction": native.has_instruction(kind),
                }
    return info


def _cmd_info(args: argparse.Namespace) -> int:
    info = kernel_info()
    if args.json:
        print(json.dumps(info))
        return 0
    isa = info["isa"] or "none"
    how = "forced by GPTWO_KERNEL_ISA" if info["forced"] else "this CPU's best"
    lines = [
        f"isa       {isa} ({how})",
        *(f"  {name:<8}{state}" for name, state in info["isas"].items()),
        f"status    {info['status']}",
        f"compiler  {info['compiler'] or '-'} ({info['compiler_version'] or 'not found'})",
        f"command   {info['command'] or '-'}",
        f"cache     {info['cache']}",
        f"library   {info['library'] or '-'}",
    ]
    for precision, kernel in info["kernels"].items():
        lines.append(f"{precision:<10}{kernel['kernel']}{'' if kernel['own_instruction'] else ' (emulated)'}")
    bf16 = "yes" if info["torch_native_bf16"] else "no (bf16 without these kernels is slower than fp32)"
    lines.append(f"torch     native bf16 matmuls: {bf16}")
    print("\n".join(lines))
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from gptwo.infer import native

    if os.environ.get("GPTWO_NATIVE", "1") == "0":
        raise GptwoError("GPTWO_NATIVE=0 turns the native kernels off", "unset GPTWO_NATIVE to build them")
    isas = [isa for isa, why in native.isa_support().items() if why is None] if args.all else [native.chosen_isa()]
    for isa in isas:
        try:
            lib = native.load(isa)
        except native.KernelBuildError as err:
            if err.stderr and args.debug:
                print(err.stderr, file=sys.stderr)
            raise GptwoError(
                f"the {isa} kernels did not build: {err}",
                "install a C compiler with OpenMP (gcc), set CC, or rerun with --debug for the compiler's whole output",
            ) from None
        except OSError as err:
            what, _, fix = str(err).partition(" — ")
            raise GptwoError(
                f"the {isa} kernels cannot be loaded: {what}",
                fix or "remove the kernel cache folder and run again, or set GPTWO_NATIVE=0",
            ) from None
        print(f"{isa}: {native.library_path(isa, native.source())} (abi {lib.gptwo_abi()})")
    return 0
