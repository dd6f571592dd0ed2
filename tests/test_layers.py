"""Dependencies run one way: the import graph of rwkvtune/, read with ``ast`` (no module is
imported), has no edge from a lower layer to a higher one and no cycle, and a function-local
import is there only to keep torch and numpy out of a module without them (the CLI's startup, the
configs) or to reach an optional package.

Every import counts: top-level and function-local, relative, ``from pkg import name`` where
``name`` is a submodule, and the package ``__init__`` files that Python runs on the way to a
submodule (importing ``a.b.c`` runs ``a/b/__init__.py`` first, unless the importer is itself
inside ``a.b``, whose ``__init__`` has then already started).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Lowest first. A module belongs to the entry with the longest matching prefix; imports within
# one layer are allowed (cycles are checked separately), imports of a higher layer are not.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # the root __init__: the version and lazily imported names (import_module strings), no imports
    ("root", ("rwkvtune",)),
    ("foundation", ("rwkvtune.errors", "rwkvtune.constants", "rwkvtune.utils", "rwkvtune.tensor_checks",
                    "rwkvtune.tokenizer", "rwkvtune.bounds", "rwkvtune.safe_yaml",
                    "rwkvtune.log")),
    # checkpoint files: safe readers, safetensors, adapter/state artifacts, official <-> HF key layout
    ("io", ("rwkvtune.io",)),
    # the registry, ModelConfig, detection of a checkpoint's dims
    ("configs", ("rwkvtune.configs",)),
    # hub: fetches a registry entry's file (needs the registry; the model loader names it in its
    # "file missing" hint); convert: whole-file format conversions (needs detection and the registry)
    ("hub, convert", ("rwkvtune.hub", "rwkvtune.hub_releases", "rwkvtune.hub_repos", "rwkvtune.convert")),
    ("models", ("rwkvtune.models",)),
    ("peft", ("rwkvtune.peft",)),
    # evaluate: lm-eval's model class over the model, an adapter or a state (train's eval_tasks uses it)
    ("data, generate, evaluate", ("rwkvtune.data", "rwkvtune.generate", "rwkvtune.evaluate")),
    ("train", ("rwkvtune.train",)),
    ("cli", ("rwkvtune.cli", "rwkvtune.__main__")),
]

# Third-party packages that may be missing (extras, or a capability of the platform's torch):
# imported where they are used, so the rest works without them and a missing one is a one-line
# error. pyrwkv_tokenizer is required, but its absence is reported in one line by tokenizer.py.
OPTIONAL = ("fla", "matplotlib", "wandb", "huggingface_hub", "filelock", "torch.distributed",
            "torch.utils.tensorboard", "pyrwkv_tokenizer", "lm_eval", "datasets", "gguf", "torchao",
            "bitsandbytes")
# What the CLI's startup (argument parsing, `models`, `inspect`) and the configs must not import.
HEAVY = ("torch", "numpy")
# Parts of torch that cost startup time only the runs that use them should pay: importing
# torch.distributed.checkpoint takes ~1.1 s on top of torch's ~1.5 s (it pulls DTensor's op tables
# and sympy), and only fsdp runs save sharded checkpoints. Imported where used, like OPTIONAL.
SLOW = ("torch.distributed.checkpoint", "torch.distributed.tensor", "torch.distributed.fsdp",
        "torch._dynamo")  # torch._dynamo: ~2 s; torch's optimizers import it on their first step anyway


@dataclass(frozen=True)
class Edge:
    source: str
    target: str  # a module of the package, or a third-party/stdlib module name
    line: int
    local: bool  # inside a function
    internal: bool
    implicit: bool = False  # a package __init__ that Python runs on the way to the named module

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} (line {self.line}{', function-local' if self.local else ''})"


def package_modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """{dotted module name: (file, is a package __init__)} for every .py under ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_pkg)
    return out


def _function_lines(tree: ast.AST) -> set[int]:
    """Line numbers of the import statements inside functions."""
    lines = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            lines |= {n.lineno for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return lines


def import_graph(root: Path) -> dict[str, list[Edge]]:
    """{module: its imports} for the package at ``root`` (a directory with __init__.py)."""
    modules = package_modules(root)
    top = root.name
    graph: dict[str, list[Edge]] = {}
    for name, (path, is_pkg) in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        local_lines = _function_lines(tree)
        package = name if is_pkg else name.rpartition(".")[0]
        edges: list[Edge] = []

        def add(target: str, node: ast.stmt) -> None:
            local = node.lineno in local_lines
            if target.split(".")[0] != top:
                edges.append(Edge(name, target, node.lineno, local, False))
                return
            while target not in modules and "." in target:  # e.g. "pkg.mod.attr" -> "pkg.mod"
                target = target.rpartition(".")[0]
            edges.append(Edge(name, target, node.lineno, local, True))
            # the packages Python initialises on the way (not the importer's own, already started)
            parent = target.rpartition(".")[0]
            while parent:
                if not (name == parent or name.startswith(parent + ".")):
                    edges.append(Edge(name, parent, node.lineno, local, True, implicit=True))
                parent = parent.rpartition(".")[0]

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, node)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                add(mod, node)
                for alias in node.names:  # from pkg import submodule
                    if f"{mod}.{alias.name}" in modules:
                        add(f"{mod}.{alias.name}", node)
        graph[name] = edges
    return graph


def layer_of(module: str, layers=LAYERS) -> int | None:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(layers):
        for p in prefixes:
            exact_only = "." not in p and i == 0  # the root entry matches the root __init__ only
            if (module == p or (not exact_only and module.startswith(p + "."))) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def layer_problems(graph: dict[str, list[Edge]], layers=LAYERS) -> list[str]:
    """One line per module without a layer and per import of a higher layer."""
    out = [f"{m}: in no layer; add it to LAYERS in tests/test_layers.py" for m in graph if layer_of(m, layers) is None]
    for edges in graph.values():
        for e in edges:
            if not e.internal:
                continue
            src, dst = layer_of(e.source, layers), layer_of(e.target, layers)
            if src is not None and dst is not None and dst > src:
                out.append(f"upward import: {e}: layer '{layers[src][0]}' imports layer '{layers[dst][0]}'")
    return out


def find_cycles(graph: dict[str, list[Edge]]) -> list[list[str]]:
    """One cycle (a list of modules, first == last) per strongly connected component with a cycle."""
    succ = {m: sorted({e.target for e in edges if e.internal and e.target in graph}) for m, edges in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:  # Tarjan; the graph is a few hundred nodes
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in succ[v]:
                sccs.append(comp)

    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 10_000))
    try:
        for v in sorted(succ):
            if v not in index:
                strongconnect(v)
    finally:
        sys.setrecursionlimit(old)

    cycles = []
    for comp in sccs:  # a shortest path back to the start, within the component
        members, start = set(comp), min(comp)
        paths, frontier, found = {start: [start]}, [start], None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in succ[v]:
                    if w == start:
                        found = paths[v] + [start]
                        break
                    if w in members and w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
                if found:
                    break
            frontier = nxt
        cycles.append(found)
    return cycles


def format_cycle(cycle: list[str], graph: dict[str, list[Edge]]) -> str:
    steps = []
    for a, b in zip(cycle, cycle[1:]):
        e = next(e for e in graph[a] if e.target == b)
        steps.append(str(e))
    return "import cycle: " + "; ".join(steps)


def top_level_closure(graph: dict[str, list[Edge]], module: str) -> set[str]:
    """Every module name (internal and external) that importing ``module`` imports at once."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        for e in graph.get(m, []):
            if not e.local:
                if e.internal:
                    todo.append(e.target)
                else:
                    seen.add(e.target)
    return seen


def _heavy_in(names) -> set[str]:
    """Which of HEAVY the module names include."""
    return {h for h in HEAVY for n in names if n == h or n.startswith(h + ".")}


def local_import_problems(graph: dict[str, list[Edge]], optional=OPTIONAL + SLOW) -> list[str]:
    """A function-local import must keep a torch-free module free of torch and numpy (the target
    imports them, the importer does not) or reach an optional or slow-to-import package; any other
    belongs at the top."""
    heavy = {m: _heavy_in(top_level_closure(graph, m)) for m in graph}
    # our modules that need an optional package at import (e.g. evaluate.lm: lm_eval) count as optional
    needs = {m: {p for p in optional for n in top_level_closure(graph, m) if n == p or n.startswith(p + ".")}
             for m in graph}

    def justified(e: Edge) -> bool:  # the target brings a heavy or optional package the importer does not have
        if not e.internal:
            if any(e.target == p or e.target.startswith(p + ".") for p in optional):
                return True
            return bool(_heavy_in([e.target]) - heavy[e.source])
        return bool(heavy.get(e.target, set()) - heavy[e.source]) or bool(needs.get(e.target, set()) - needs[e.source])

    out = []
    for m, edges in graph.items():
        statements: dict[int, list[Edge]] = {}
        for e in edges:
            if e.local and not e.implicit:
                statements.setdefault(e.line, []).append(e)
        for line, named in sorted(statements.items()):
            if any(justified(e) for e in named):  # e.g. "from pkg import submodule": the submodule counts
                continue
            e = max(named, key=lambda e: len(e.target))
            why = (f"the importer already imports {' and '.join(sorted(heavy[m]))}" if heavy[m] else
                   "the target imports neither torch nor numpy and is no optional package")
            out.append(f"function-local import: {e}: {why}; import it at the top of the module")
    return out


# ---- the package itself ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def graph():
    return import_graph(REPO / "rwkvtune")


def test_no_upward_imports(graph):
    problems = layer_problems(graph)
    assert not problems, "\n".join(problems)


def test_no_import_cycles(graph):
    cycles = find_cycles(graph)
    assert not cycles, "\n".join(format_cycle(c, graph) for c in cycles)


def test_function_local_imports_only_keep_torch_out_or_reach_optional_packages(graph):
    problems = local_import_problems(graph)
    assert not problems, "\n".join(problems)


def test_train_config_imports_nothing_above_models(graph):
    """TrainConfig is plain data: peft and train are not in what importing it imports, even later."""
    reach, todo = set(), ["rwkvtune.models.rwkv7.config"]
    while todo:
        m = todo.pop()
        if m not in reach:
            reach.add(m)
            todo += [e.target for e in graph[m] if e.internal]
    assert not {m for m in reach if m.startswith(("rwkvtune.peft", "rwkvtune.train", "rwkvtune.cli"))}


def test_the_graph_sees_every_kind_of_import(graph):
    """The reader misses nothing the checks rely on (else they would pass vacuously)."""
    targets = {(e.source, e.target, e.local) for edges in graph.values() for e in edges}
    # a function-local import of a heavy module from the torch-free CLI
    assert any(s.startswith("rwkvtune.cli") and t.startswith("rwkvtune.train") and local for s, t, local in targets)
    # "from rwkvtune.io import checkpoint"-style and package __init__ edges
    assert ("rwkvtune.configs.detect", "rwkvtune.io", False) in targets
    assert ("rwkvtune.configs.detect", "rwkvtune.io.checkpoint", False) in targets


# ---- the checker on a synthetic package --------------------------------------------------------

def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_finds_upward_edges_cycles_and_needless_local_imports(tmp_path):
    pkg = tmp_path / "toy"
    _write(pkg, {
        "__init__.py": "",
        "low.py": "import json\n\ndef f():\n    from . import high  # upward, hidden in a function\n",
        "high.py": "from toy.low import f\n",
        "sub/__init__.py": "from toy.sub import a\n",
        "sub/a.py": "import toy.other\n",
        "sub/b.py": "def g():\n    from toy.sub import a\n",
        # imports toy.sub.b only, but Python runs toy/sub/__init__.py first: a cycle through it
        "other.py": "from toy.sub.b import g\n\ndef h():\n    import json\n",
    })
    layers = [("root", ("toy",)), ("low", ("toy.low", "toy.sub")), ("high", ("toy.high", "toy.other"))]
    graph = import_graph(pkg)

    assert layer_problems(graph, layers) == [
        "upward import: toy.low -> toy.high (line 4, function-local): layer 'low' imports layer 'high'",
        "upward import: toy.sub.a -> toy.other (line 1): layer 'low' imports layer 'high'"]
    cycles = sorted(format_cycle(c, graph) for c in find_cycles(graph))
    assert cycles == [
        "import cycle: toy.high -> toy.low (line 1); toy.low -> toy.high (line 4, function-local)",
        "import cycle: toy.other -> toy.sub (line 1); toy.sub -> toy.sub.a (line 1); toy.sub.a -> toy.other (line 1)"]
    # toy.other names toy.sub.b only: the edge to toy.sub is Python running the package's __init__
    assert [(e.target, e.implicit) for e in graph["toy.other"] if e.internal] == [("toy.sub.b", False),
                                                                                 ("toy.sub", True)]
    local = local_import_problems(graph, optional=())
    assert len(local) == 3 and all("import it at the top" in p for p in local), local
    assert {p.split(": ")[1] for p in local} == {"toy.low -> toy.high (line 4, function-local)",
                                                  "toy.sub.b -> toy.sub.a (line 2, function-local)",
                                                  "toy.other -> json (line 4, function-local)"}


def test_checker_passes_a_clean_package(tmp_path):
    pkg = tmp_path / "clean"
    _write(pkg, {"__init__.py": "", "low.py": "import json\n", "high.py": "from .low import json\n"})
    layers = [("root", ("clean",)), ("low", ("clean.low",)), ("high", ("clean.high",))]
    graph = import_graph(pkg)
    assert layer_problems(graph, layers) == [] and find_cycles(graph) == [] and local_import_problems(graph) == []
    assert [str(e) for e in graph["clean.high"]] == ["clean.high -> clean.low (line 1)"]


def test_a_run_that_is_not_sharded_does_not_import_the_slow_parts_of_torch():
    # every `rwkvtune train` process (and each test that starts one) would pay ~1 s for them; a dry
    # run builds the model on the meta device, where nn.Embedding's init imported torch._dynamo (2 s)
    code = ("import sys, rwkvtune.cli.train, rwkvtune.train.trainer\n"
            "from rwkvtune.configs.model_loader import load_model_config\n"
            "from rwkvtune.models.rwkv7.model import meta_model\n"
            "assert meta_model(load_model_config('0.1b')).emb.weight.is_meta\n"
            f"slow = sorted(n for n in sys.modules if n.startswith({SLOW!r}))\n"
            "assert not slow, slow\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
