"""The package's import graph: no import circles, and layers that depend one way only.

Every `import` in llorch_cpud counts, at module level or inside a function (a function-local import that
closes a circle is still a circle: it only moves the failure to whichever call runs first). Importing
`a.b.c` also imports the packages `a.b` and `a` (their `__init__.py` run first), so those edges count too,
except to a package that already contains the importing module.

The layers, lowest first; a module may import from its own layer or a lower one, never a higher one:

  errors, arguments   leaves: the exception types; the argparse types the command modules share
  kernels             numpy and the C extension: products, attention, the head screen
  cache               KV cache arrays (kernels' layouts)
  models              the forward passes (GPT-2, Llama) on kernels and caches
  tokenizer, sampling text <-> ids; logits -> a token. Neither knows the models; the models do not know them
  (logprobs)          logits -> log-probabilities; token ids -> their bytes (the sampling layer)
  (structured)        grammars -> allowed-token masks (llguidance; the sampling layer)
  formats             files -> (model, tokenizer): HF folders, GGUF files, hub names
  engine              the generation loop over a model and a tokenizer; load_engine = formats + Engine
  validate            engines against reference implementations
  server              the HTTP worker around an engine
  bench_server        concurrent streams through real servers (started as subprocesses, not imported)
  bench               the `bench` subcommand: our engine and peers, in subprocesses; hands concurrency to bench_server
  cli                 the `llorch-cpud` command: registers server.cli and bench (importlib, by name) as plugins

`server.cli` and `bench` are subcommand modules: they import `arguments`, never `cli`, which imports them.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "llorch_cpud"

LAYERS = [
    ("errors", "arguments"),
    ("kernels",),
    ("cache",),
    ("models",),
    ("tokenizer", "sampling", "logprobs", "structured"),
    ("formats",),
    ("engine",),
    ("validate",),
    ("server",),
    ("bench_server",),
    ("bench",),
    ("cli",),
]


def extension_modules(setup_py: Path) -> set[str]:
    """C extensions setup.py builds (`Extension("pkg.mod", ...)`): modules with no .py file."""
    return set(re.findall(r"Extension\(\s*[\"']([\w.]+)[\"']", setup_py.read_text())) if setup_py.exists() else set()


def find_modules(root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def import_graph(root: Path, package: str, extensions: set[str] = frozenset()) -> dict[str, dict[str, list[int]]]:
    """{importer: {imported: [line, ...]}} over the package's modules, every import statement included."""
    modules = find_modules(root, package)
    known = set(modules) | set(extensions)

    def owner(name: str) -> str | None:  # the module a dotted name lives in (a name in a module: that module)
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, list[int]]] = {m: {} for m in modules}
    for mod, (path, is_pkg) in modules.items():
        here = mod.split(".") if is_pkg else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names]  # a submodule, else a name in `base`
            else:
                continue
            for name in names:
                if name.split(".")[0] != package:
                    continue
                target = owner(name)
                if target is None:
                    continue
                if target != mod:
                    graph[mod].setdefault(target, []).append(node.lineno)
                parts = target.split(".")
                for i in range(1, len(parts)):  # the packages it sits in, but not one that holds this module
                    t = ".".join(parts[:i])
                    if t != mod and not mod.startswith(t + ".") and t in known:
                        graph[mod].setdefault(t, []).append(node.lineno)
    return graph


def cycles(graph: dict[str, dict[str, list[int]]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
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
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def describe(graph, comp: list[str]) -> str:
    return "; ".join(f"{a} -> {b} (line {graph[a][b][0]})" for a in comp for b in sorted(graph.get(a, {})) if b in comp)


def layer_of(module: str, package: str, layers) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return 0  # the package itself (__version__)
    for i, names in enumerate(layers):
        if parts[1] in names:
            return i
    raise AssertionError(f"{module} is in no layer: add {parts[1]!r} to LAYERS")


def layer_violations(graph, package: str, layers) -> list[str]:
    out = []
    for a, targets in sorted(graph.items()):
        for b, lines in sorted(targets.items()):
            la, lb = layer_of(a, package, layers), layer_of(b, package, layers)
            if lb > la:
                out.append(f"{a} (layer {'/'.join(layers[la])}) imports {b} (layer {'/'.join(layers[lb])}) at line {lines[0]}")
    return out


@pytest.fixture(scope="module")
def graph():
    return import_graph(ROOT, PACKAGE, extension_modules(ROOT / "setup.py"))


def test_no_import_cycles(graph):
    found = cycles(graph)
    assert not found, "import circles:\n" + "\n".join(describe(graph, c) for c in found)


def test_layers_depend_one_way(graph):
    bad = layer_violations(graph, PACKAGE, LAYERS)
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(bad)


def test_graph_sees_the_package(graph):
    """The checker reads what it should: known edges are present (an empty graph would pass the two above)."""
    assert "llorch_cpud.models.base" in graph["llorch_cpud.engine"]
    assert "llorch_cpud.kernels.isa" in graph["llorch_cpud.kernels.quantized"]  # what imports the C extension
    assert "llorch_cpud.engine" in graph["llorch_cpud.bench"]  # a function-local import counts
    assert "llorch_cpud.formats" in graph["llorch_cpud.models.llama"] or "llorch_cpud.formats" in graph["llorch_cpud.engine"]
    assert "llorch_cpud.kernels" not in graph["llorch_cpud.kernels.ops"]  # the package that holds it: not an edge


def write_package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_negative_control_cycles_and_layers(tmp_path):
    """A synthetic package with the circles this test exists to catch: the checker must report each."""
    write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low.py": "def f():\n    from pkg.high import g  # function-local: still a circle\n    return g\n",
        "pkg/high.py": "from pkg import low\n\ndef g():\n    return low\n",
        "pkg/sub/__init__.py": "from pkg.sub.a import x\n",
        "pkg/sub/a.py": "x = 1\n",  # a package importing its own module: no circle
        "pkg/sub/b.py": "from pkg.sub import x\n",  # a module importing its own package: no circle either
        "pkg/other/__init__.py": "from pkg.other.c import y\n",
        "pkg/other/c.py": "from .d import z\ny = z\n",
        "pkg/other/d.py": "import pkg.other\nz = 2\n",  # the package's __init__ runs c, c imports d: a circle
        "pkg/ext.py": "from pkg import _native\n",
    })
    g = import_graph(tmp_path, "pkg", extensions={"pkg._native"})
    found = cycles(g)
    assert ["pkg.high", "pkg.low"] in found
    assert ["pkg.other", "pkg.other.c", "pkg.other.d"] in found
    assert len(found) == 2, found
    assert "pkg._native" in g["pkg.ext"]
    assert "pkg.high" in describe(g, ["pkg.high", "pkg.low"])
    bad = layer_violations(g, "pkg", [("low", "ext", "_native", "sub", "other"), ("high",)])
    assert bad == ["pkg.low (layer low/ext/_native/sub/other) imports pkg.high (layer high) at line 2"], bad
