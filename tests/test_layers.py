"""gptwo's layers (docs/core.md, Layers): no import goes up a layer, and none closes a cycle.

Every module under src/gptwo is read with `ast` (nothing is imported) and every import of a gptwo module
counts: at top level and inside functions, `importlib.import_module("gptwo...")` (an f-string stands for
every module it can name), and the lazy name tables of package __init__s (`lazy_names(__name__, TABLE)`),
each entry counted as an import by the package. Imports under `if TYPE_CHECKING:` are annotations only
and are not counted. Running a package's __init__ when one of its submodules is imported is not counted
either: instead a package __init__ may import at top level only from the runtime layer (checked below),
so that implicit import can never go up.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Bottom to top. A module may import modules of its own layer and of the layers below it, never above.
LAYERS: dict[str, tuple[str, ...]] = {
    # devices, dtypes, CPU features, memory, and the base utilities every layer uses. data.sources and
    # data.builtin (reading documents from files and the built-in corpus) sit here because
    # Tokenizer.train reads them; argtypes (argument types and report printing) because parts validate
    # and print with it, not only their cli modules.
    "runtime": (
        "gptwo.runtime",
        "gptwo.errors",
        "gptwo.lazy",
        "gptwo.fileio",
        "gptwo.progress",
        "gptwo.config",
        "gptwo.tokenizer",
        "gptwo.argtypes",
        "gptwo.data.sources",
        "gptwo.data.builtin",
    ),
    # GPT-2 itself: knows nothing above it.
    "model": ("gptwo.model",),
    # one decode step over one paged KV cache, and the layers a prepared model runs on.
    "step": (
        "gptwo.infer.step",
        "gptwo.infer.torch_step",
        "gptwo.infer.kvcache",
        "gptwo.infer.native",
        "gptwo.infer.linear",
        "gptwo.infer.arena",
        "gptwo.infer.multilora",
    ),
    # sampling over a decode step; stop strings and streaming text (no torch).
    "sampling": ("gptwo.sampling", "gptwo.text", "gptwo.chat", "gptwo.watermark", "gptwo.speculative"),
    # a model from stored weights, dtype/quantization, and `gptwo.GPT` with its conveniences.
    "loading": ("gptwo", "gptwo.weights", "gptwo.gguf", "gptwo.infer.prepare", "gptwo.lora"),
    # the parts: what the commands do. See PART_USES for which parts a part may import.
    "parts": (
        "gptwo.generate",
        "gptwo.infer",
        "gptwo.infer.decode",
        "gptwo.data",
        "gptwo.data.chat",
        "gptwo.data.loader",
        "gptwo.data.shard_corpus",
        "gptwo.data.shards",
        "gptwo.eval",
        "gptwo.eval.catalog",
        "gptwo.eval.compare",
        "gptwo.eval.harness",
        "gptwo.eval.perplexity",
        "gptwo.eval.scoring",
        "gptwo.eval.tables",
        "gptwo.eval.tasks",
        "gptwo.detect",
        "gptwo.detect.attention",
        "gptwo.detect.calibrate",
        "gptwo.detect.classifier",
        "gptwo.detect.detector",
        "gptwo.detect.documents",
        "gptwo.detect.gltr",
        "gptwo.detect.pairs",
        "gptwo.detect.stats",
        "gptwo.detect.watermark",
        "gptwo.serve",
        "gptwo.serve.app",
        "gptwo.serve.connection",
        "gptwo.serve.engine",
        "gptwo.serve.inspect",
        "gptwo.serve.limits",
        "gptwo.serve.metrics",
        "gptwo.serve.params",
        "gptwo.serve.protocol",
        "gptwo.train",
        "gptwo.train.checkpoint",
        "gptwo.train.distributed",
        "gptwo.train.loop",
        "gptwo.train.metrics",
        "gptwo.train.optim",
        "gptwo.train.quickstart",
        "gptwo.train.runfolder",
        "gptwo.train.sampling",
        "gptwo.train.speed",
        "gptwo.train.threads",
        "gptwo.select",
        "gptwo.select.offline",
        "gptwo.select.online",
        "gptwo.select.score",
        "gptwo.scale",
        "gptwo.scale.fit",
        "gptwo.scale.method",
        "gptwo.scale.plan",
        "gptwo.scale.plots",
        "gptwo.scale.repeats",
        "gptwo.scale.run",
        "gptwo.bench",
        "gptwo.bench.decode",
        "gptwo.bench.instruct",
        "gptwo.bench.llamacpp",
        "gptwo.bench.lora",
        "gptwo.bench.lora_quality",
        "gptwo.bench.onnx_rows",
        "gptwo.bench.serve",
        "gptwo.bench.serve_workloads",
        "gptwo.bench.speculative",
        "gptwo.bench.train",
        "gptwo.bench.watermark",
        "gptwo.export",
        "gptwo.export.gguf",
        "gptwo.export.onnx",
        "gptwo.webtext",
        "gptwo.webtext.addresses",
        "gptwo.webtext.corpus",
        "gptwo.webtext.crawlstate",
        "gptwo.webtext.dedup",
        "gptwo.webtext.extract",
        "gptwo.webtext.fetch",
        "gptwo.webtext.filters",
        "gptwo.webtext.pipeline",
        "gptwo.webtext.records",
        "gptwo.webtext.settings",
        "gptwo.webtext.urls",
    ),
    # the command line: `gptwo` and each part's subcommands.
    "cli": (
        "gptwo.cli",
        "gptwo.bench.cli",
        "gptwo.data.cli",
        "gptwo.detect.cli",
        "gptwo.eval.cli",
        "gptwo.export.cli",
        "gptwo.infer.cli",
        "gptwo.scale.cli",
        "gptwo.select.cli",
        "gptwo.serve.cli",
        "gptwo.train.cli",
        "gptwo.webtext.cli",
    ),
}

# The parts a part may import besides itself (and every lower layer). The uses form no cycle, so no two
# parts build on each other. A part is a module's package under gptwo (gptwo.generate is "generate";
# gptwo.infer and gptwo.infer.decode are "infer").
PART_USES: dict[str, set[str]] = {
    "generate": set(),
    "data": set(),
    "infer": {"generate"},
    "eval": {"data", "generate"},
    "detect": {"data", "eval"},
    "serve": {"detect", "generate"},
    "train": {"data", "generate", "select"},
    "select": {"data"},
    "scale": {"data", "train"},
    "bench": {"data", "detect", "export", "generate", "infer", "train"},
    "export": set(),
    "webtext": {"data"},
}


@dataclass(frozen=True)
class Import:
    """One import of a gptwo module: by `module`, of `target`, at `line` of `path`."""

    module: str
    target: str
    path: str
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> dict[str, Path]:
    return {module_name(path): path for path in sorted((SRC / "gptwo").rglob("*.py"))}


def _is_gptwo(name: str) -> bool:
    return name == "gptwo" or name.startswith("gptwo.")


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_in(source: str, module: str, is_package: bool, modules: set[str], path: str = "") -> list[Import]:
    """Every import of a gptwo module in `source` (the text of `module`), as the module docstring counts them."""
    found: list[Import] = []
    tree = ast.parse(source)

    def add(target: str, node: ast.AST) -> None:
        if _is_gptwo(target) and target != module:
            found.append(Import(module, target, path, node.lineno))

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package of this module
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:  # `from gptwo.infer import native` imports the submodule
                add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base, node)
        elif isinstance(node, ast.Call):
            called = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
            if called in ("import_module", "__import__") and node.args:
                for target in _named_modules(node.args[0], modules):
                    add(target, node)
            elif called == "lazy_names":
                for target in lazy_table(tree).values():
                    add(target, node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def lazy_table(tree: ast.Module) -> dict[str, str]:
    """The {name: module} table a package __init__ passes to `lazy_names(__name__, TABLE)`, if it has one."""
    tables = {
        t.id: n.value for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy_names" and len(node.args) == 2:
            table = tables.get(node.args[1].id) if isinstance(node.args[1], ast.Name) else node.args[1]
            return ast.literal_eval(table)
    return {}


def _named_modules(arg: ast.expr, modules: set[str]) -> list[str]:
    """The modules an `import_module` argument names: a string, or every module an f-string can make."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return [arg.value]
    if isinstance(arg, ast.JoinedStr):
        pattern = "".join(part.value if isinstance(part, ast.Constant) else "*" for part in arg.values)
        return sorted(m for m in modules if fnmatch.fnmatchcase(m, pattern))
    return []


@functools.cache
def all_imports() -> tuple[Import, ...]:
    files = source_files()
    modules = set(files)
    return tuple(
        found
        for name, path in files.items()
        for found in imports_in(
            path.read_text(encoding="utf-8"), name, path.name == "__init__.py", modules, str(path.relative_to(SRC))
        )
    )


LAYER_NAMES = list(LAYERS)
LAYER_OF = {module: index for index, modules in enumerate(LAYERS.values()) for module in modules}
PARTS = LAYER_NAMES.index("parts")


def part_of(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def a_cycle(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """One closed path through the first module of a strongly connected component (shortest, by BFS)."""
    start, inside = component[0], set(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(edges[node] & inside):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if child not in came_from:
                    came_from[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{component} is not strongly connected")


def where(imports: tuple[Import, ...], module: str, target: str) -> str:
    first = next(i for i in imports if i.module == module and i.target == target)
    return f"{first.path}:{first.line}"


# ---------------------------------------------------------------- the collector finds every kind of import
def test_the_collector_counts_every_kind_of_import_and_skips_annotations():
    source = """
import gptwo.errors
from gptwo.infer import native, prepare_model
from . import sibling
from .sibling import thing
from typing import TYPE_CHECKING
import importlib
if TYPE_CHECKING:
    from gptwo.weights import GPT
else:
    import gptwo.config
def later(part):
    from gptwo.serve.engine import BatchEngine
    importlib.import_module("gptwo.train.loop")
    importlib.import_module(f"gptwo.{part}.cli")
_WHERE = {"Decoder": "gptwo.infer.decode"}
__getattr__, __dir__ = lazy_names(__name__, _WHERE)
"""
    modules = {
        "gptwo.infer",
        "gptwo.infer.native",
        "gptwo.infer.sibling",
        "gptwo.train.cli",
        "gptwo.serve.cli",
        "gptwo.serve",
    }
    targets = sorted({i.target for i in imports_in(source, "gptwo.infer.here", False, modules)})
    assert targets == [
        "gptwo.config",
        "gptwo.errors",
        "gptwo.infer",
        "gptwo.infer.decode",
        "gptwo.infer.native",
        "gptwo.infer.sibling",
        "gptwo.serve.cli",
        "gptwo.serve.engine",
        "gptwo.train.cli",
        "gptwo.train.loop",
    ]  # not gptwo.weights: under TYPE_CHECKING


def test_cycles_are_found_and_printed_as_a_closed_path():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert cycles(edges) == [["a", "b", "c"]]
    assert a_cycle(["a", "b", "c"], edges) == ["a", "b", "c", "a"]


# ---------------------------------------------------------------- the layers hold
def test_every_module_has_a_layer():
    modules = set(source_files())
    listed = [m for layer in LAYERS.values() for m in layer]
    assert len(listed) == len(set(listed)), "a module is listed in two layers of LAYERS"
    missing = sorted(modules - set(listed))
    assert not missing, (
        f"{', '.join(missing)}: not in LAYERS of tests/test_layers.py; add each to the layer it belongs to "
        f"({' -> '.join(LAYER_NAMES)}, bottom to top; docs/core.md, Layers, says what each holds)"
    )
    gone = sorted(set(listed) - modules)
    assert not gone, f"{', '.join(gone)}: listed in LAYERS of tests/test_layers.py but no such module; remove it"


def test_no_import_goes_up_a_layer():
    up = [
        f"{i.path}:{i.line}: {i.module} ({LAYER_NAMES[LAYER_OF[i.module]]}) imports {i.target} "
        f"({LAYER_NAMES[LAYER_OF[i.target]]})"
        for i in all_imports()
        if i.module in LAYER_OF and i.target in LAYER_OF and LAYER_OF[i.target] > LAYER_OF[i.module]
    ]
    assert not up, "imports going up a layer (docs/core.md, Layers):\n" + "\n".join(up)


def test_every_import_names_a_module_of_gptwo():
    modules = set(source_files())
    unknown = [f"{i.path}:{i.line}: {i.module} imports {i.target}" for i in all_imports() if i.target not in modules]
    assert not unknown, "imports of gptwo modules that do not exist:\n" + "\n".join(unknown)


def test_parts_import_only_the_parts_they_build_on():
    across = sorted(
        {
            f"{i.path}:{i.line}: {i.module} ({part_of(i.module)}) imports {i.target} ({part_of(i.target)})"
            for i in all_imports()
            if LAYER_OF.get(i.module) == PARTS
            and LAYER_OF.get(i.target) == PARTS
            and part_of(i.target) != part_of(i.module)
            and part_of(i.target) not in PART_USES.get(part_of(i.module), set())
        }
    )
    assert not across, "a part imports a part it does not build on (PART_USES in tests/test_layers.py):\n" + "\n".join(
        across
    )


def test_parts_build_on_each_other_without_a_cycle():
    listed = {part_of(m) for m in LAYERS["parts"]}
    assert set(PART_USES) == listed, f"PART_USES must list exactly the parts: {sorted(listed)}"
    assert not cycles({part: set(uses) for part, uses in PART_USES.items()}), "PART_USES has a cycle"


def test_no_import_cycle():
    imports = all_imports()
    edges: dict[str, set[str]] = {m: set() for m in source_files()}
    for i in imports:
        edges[i.module].add(i.target)
    found = []
    for component in cycles(edges):
        path = a_cycle(component, edges)
        steps = "\n    ".join(f"{a} -> {b}  ({where(imports, a, b)})" for a, b in zip(path, path[1:]))
        found.append(f"{len(component)} modules in a cycle ({', '.join(component)}), e.g.\n    {steps}")
    assert not found, "import cycles (counting imports inside functions):\n" + "\n".join(found)


def test_package_inits_import_only_the_runtime_layer_at_top_level():
    # importing any module of a package runs its __init__, so the __init__'s own imports must be lowest
    runtime = set(LAYERS["runtime"])
    files = source_files()
    modules = set(files)
    bad = []
    for name, path in files.items():
        if path.name != "__init__.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = ast.Module(body=[n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)], type_ignores=[])
        for i in imports_in(ast.unparse(top), name, True, modules):
            if i.target not in runtime:
                bad.append(f"{path.relative_to(SRC)}: imports {i.target} at top level")
    assert not bad, "\n".join(bad)


def test_lazy_tables_name_what_their_modules_define():
    files = source_files()
    missing = [
        f"{path.relative_to(SRC)}: exports {exported!r} from {module}, which does not define it"
        for path in files.values()
        if path.name == "__init__.py"
        for exported, module in lazy_table(ast.parse(path.read_text(encoding="utf-8"))).items()
        if module not in files or exported not in top_level_names(files[module])
    ]
    assert not missing, "\n".join(missing)


def top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


@pytest.mark.parametrize("module", ["gptwo.text", "gptwo.serve.protocol", "gptwo.runtime", "gptwo.watermark"])
def test_torch_free_modules_do_not_import_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False", f"importing {module} imports torch"


def test_gptwo_GPT_carries_the_conveniences_and_every_loader_builds_it(tmp_path):
    # the conveniences import loading and sampling, so they live in the loading layer, not on the model
    import torch

    import gptwo
    import gptwo.model
    from gptwo import sampling, weights
    from gptwo.config import GPTConfig

    assert gptwo.GPT is weights.GPT and issubclass(weights.GPT, gptwo.model.GPT)
    assert not {"generate", "from_pretrained", "save_pretrained"} & set(vars(gptwo.model.GPT))
    torch.manual_seed(0)
    model = gptwo.GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    model.save_pretrained(str(tmp_path))
    loaded = gptwo.GPT.from_pretrained(str(tmp_path))
    assert type(loaded) is weights.GPT and type(weights.load_pretrained(str(tmp_path), dtype="fp32")) is weights.GPT
    idx = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded.generate(idx, 5, temperature=0), sampling.generate(model, idx, 5, temperature=0))
