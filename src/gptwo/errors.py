"""One error type for every failure a user can fix: it carries what went wrong and how to fix it.

Input is checked where it enters (paths, JSON files, streams, numbers, token ids). What a library
still raises past those checks (a missing optional package, OS errors on a named file, corrupt
zstandard or SQLite data, bad JSON, undecodable text) is turned into a `GptwoError` here, in one
place (`from_library_error`), which the CLI uses; anything else is a bug.
"""

from __future__ import annotations

import errno
import importlib
import json
from types import ModuleType


class GptwoError(Exception):
    """A failure with a fix. The CLI prints it as one line `error: <what> — <fix>` and exits `code`."""

    def __init__(self, what: str, fix: str = "", code: int = 2):
        self.what, self.fix, self.code = what, fix, code
        super().__init__(f"{what} — {fix}" if fix else what)


# ---------------------------------------------------------------- optional packages
# Top-level module → (the extras that install it, what to call it). The first extra is the default.
OPTIONAL_MODULES: dict[str, tuple[tuple[str, ...], str]] = {
    "fastapi": (("serve",), "FastAPI and uvicorn"),
    "uvicorn": (("serve",), "FastAPI and uvicorn"),
    "pydantic": (("serve",), "FastAPI and uvicorn"),
    "lm_eval": (("eval",), "lm-evaluation-harness"),
    "accelerate": (("eval",), "accelerate"),
    "datasets": (("data", "eval"), "Hugging Face datasets"),
    "pyarrow": (("data",), "pyarrow"),
    "zstandard": (("data", "webtext"), "zstandard"),
    **{
        name: (("webtext",), f"the crawler's packages ({name} missing)")
        for name in (
            "aiohttp",
            "trafilatura",
            "ftfy",
            "datasketch",
            "warcio",
            "py3langid",
            "regex",
            "ray",
            "lxml_html_clean",
        )
    },
    "transformers": (("bench",), "transformers"),
    "peft": (("bench",), "peft"),
    "scipy": (("scale",), "scipy"),
    "threadpoolctl": (("webtext", "scale"), "threadpoolctl"),
    "gguf": (("export",), "the gguf package (llama.cpp's gguf-py)"),
    **{name: (("export",), f"the ONNX packages ({name} missing)") for name in ("onnx", "onnxruntime", "onnxscript")},
}
# The extra each command's own packages come from, when a module belongs to several.
COMMAND_EXTRAS = {
    "serve": "serve",
    "eval": "eval",
    "webtext": "webtext",
    "prepare": "data",
    "tokenizer": "data",
    "scale": "scale",
    "export": "export",
}


def missing_extra(module: str, purpose: str, command: str | None = None) -> GptwoError | None:
    """The error for a missing optional `module` (naming its extra), or None if it belongs to no extra."""
    known = OPTIONAL_MODULES.get(module.split(".")[0])
    if known is None:
        return None
    extras, name = known
    preferred = COMMAND_EXTRAS.get(command or "")
    extra = preferred if preferred in extras else extras[0]
    return GptwoError(f"{purpose} needs {name}", f"pip install 'gptwo[{extra}]'")


def require(module: str, purpose: str, command: str | None = None) -> ModuleType:
    """Import an optional `module`, or raise the one-line error naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        mapped = missing_extra(err.name or module, purpose, command)
        if mapped is None:
            raise
        raise mapped from None


# ---------------------------------------------------------------- library errors → GptwoError
_OS_FIXES = {
    errno.ENOENT: "check the path",
    errno.EISDIR: "give a file, not a folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EEXIST: "choose another path, or remove what is there",
    errno.EACCES: "check the file's permissions",
    errno.EPERM: "check the file's permissions",
    errno.ENOSPC: "free disk space or choose another output folder",
    errno.EROFS: "choose a writable location",
}


def from_library_error(err: BaseException, command: str | None = None) -> GptwoError | None:
    """A GptwoError for a library error a user can fix, or None when `err` means a bug in gptwo."""
    if isinstance(err, GptwoError):
        return err
    module = type(err).__module__.split(".")[0]
    if isinstance(err, ImportError) and err.name:
        return missing_extra(err.name, f"gptwo {command}" if command else "this command", command)
    if isinstance(err, OSError) and (err.filename is not None or err.errno == errno.ENOSPC):
        where = f" {err.filename}" if err.filename is not None else ""
        return GptwoError(f"cannot use{where} ({err.strerror or err})", _OS_FIXES.get(err.errno, "check the path"))
    if module == "zstandard":
        return GptwoError(
            f"a zstandard (.zst) input is corrupt or truncated ({err})", "re-download or re-compress it with zstd"
        )
    if module == "sqlite3":
        return GptwoError(
            f"a database file is damaged or unusable (sqlite3: {err})",
            "remove the damaged folder's state and rerun, or restore it",
        )
    if isinstance(err, json.JSONDecodeError):
        return GptwoError(f"an input is not valid JSON ({err})", "fix the file's syntax")
    if isinstance(err, UnicodeDecodeError):
        return GptwoError(
            f"an input is not UTF-8 text ({err.reason} at byte {err.start})",
            "convert it to UTF-8, e.g. iconv -f latin1 -t utf-8",
        )
    if isinstance(err, UnicodeEncodeError):
        return GptwoError(
            f"text holds characters that are not valid Unicode ({err.reason})",
            "give valid UTF-8 text (no lone surrogates)",
        )
    return None
