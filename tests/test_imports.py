"""The package's module graph: no import cycles, and importing any module on its own does no work.

Cycles are found statically, over every import statement (module level, inside functions and under
``TYPE_CHECKING`` alike), so a cycle hidden behind a lazy import is still reported. Import-time side effects are
caught in one fresh interpreter that imports each module with every ``laptop_deploy`` module unloaded before it,
under an audit hook that records file opens (other than Python's own module files), network use and subprocesses,
and compares torch's global state (RNG, threads, default dtype, grad mode) before and after. Warning filters are
checked statically (no module-level call statements at all): third-party lazy imports add filters of their own.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import laptop_deploy

PACKAGE_ROOTS = {"laptop_deploy": Path(laptop_deploy.__file__).parent}
PACKAGE_ROOTS.update({f"laptop_deploy.{sub}": Path(p) / sub for p in laptop_deploy.__path__[1:]
                      for sub in ("exporters", "runtimes")})


def package_modules() -> dict[str, Path]:
    """Every module of the package, dotted name → file (``exporters/`` and ``runtimes/`` under their import names)."""
    found: dict[str, Path] = {}
    for prefix, root in PACKAGE_ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if prefix == "laptop_deploy" and parts and parts[0] in ("exporters", "runtimes"):
                continue  # an installed copy inside the package: the root folders are the source
            found[".".join([prefix, *parts])] = path
    return found


def _targets(node: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            anchor = ".".join(base + ([node.module] if node.module else []))
        else:
            anchor = node.module or ""
        names = [f"{anchor}.{a.name}" for a in node.names] + [anchor]
    else:
        return set()
    out = set()
    for name in names:
        # the deepest package module the statement names ("from .x import y": x.y if y is a module, else x)
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module and not module.startswith(name + "."):
            out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        graph[name] = set().union(*(_targets(n, name, is_package, known) for n in ast.walk(tree)))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        item = stack.pop()
                        on_stack.discard(item)
                        component.append(item)
                        if item == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_relative_and_lazy_imports():
    graph = import_graph()
    assert "laptop_deploy.models.inventory" in graph["laptop_deploy.prune.plan"]
    assert "laptop_deploy.exporters.onnx_files" in graph["laptop_deploy.exporters.onnx_fp16"]
    # a function-level import in the CLI's handlers counts like any other
    assert "laptop_deploy.prune.plan" in graph["laptop_deploy.cli.commands"]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


_PROBE = r"""
import json, sys, warnings
import numpy, torch, diffusers, transformers, safetensors, tqdm  # third-party import cost is not ours
for optional in ("onnx", "onnxruntime", "onnxscript", "coremltools", "PIL"):
    try:
        __import__(optional)
    except ImportError:
        pass
LIBRARY = ("/proc/", sys.prefix, sys.base_prefix, sys.exec_prefix)
events = []
def hook(event, args):
    if event == "open":
        path, mode = str(args[0]), str(args[1])
        if (path.endswith((".py", ".pyc", ".so", ".pth")) or "__pycache__" in path or path.startswith(LIBRARY)
                or ".egg-info" in path or ".dist-info" in path):
            return  # Python's own module loading, and third-party packages' lazy imports reading their metadata
        events.append(f"open {path} {mode}")
    elif event in ("socket.connect", "socket.getaddrinfo", "subprocess.Popen", "os.system", "os.remove",
                   "os.rmdir", "os.rename", "shutil.rmtree", "os.mkdir"):
        events.append(f"{event} {args[0]!r}")
def state():
    return (torch.get_rng_state().sum().item(), torch.get_num_threads(), str(torch.get_default_dtype()),
            torch.is_grad_enabled())
sys.addaudithook(hook)
report = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "laptop_deploy" or m.startswith("laptop_deploy.")]:
        del sys.modules[loaded]
    events.clear()
    before = state()
    try:
        __import__(name)
    except ImportError as error:  # an optional extra that is not installed: its own import names it
        report[name] = {"skipped": str(error)}
        continue
    after = state()
    problems = list(events)
    if before != after:
        problems.append(f"global state changed: {before} -> {after}")
    report[name] = {"problems": problems}
print(json.dumps(report))
"""


def test_every_module_imports_on_its_own_without_side_effects():
    names = sorted(n for n in package_modules() if not n.endswith("__main__"))  # __main__ runs the CLI by design
    done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(names)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(report) == set(names)
    bad = {name: r["problems"] for name, r in report.items() if r.get("problems")}
    assert bad == {}
    skipped = {name: r["skipped"] for name, r in report.items() if "skipped" in r}
    # only optional targets may be missing (TensorRT cannot be installed here; ExecuTorch is an opt-in extra, not
    # in the default install: see README); everything else must import
    assert all(name.endswith(("tensorrt", "executorch")) for name in skipped), skipped


def test_every_subpackage_is_installed():
    """pyproject lists packages explicitly (exporters/ and runtimes/ are mapped from the root): a new subpackage that
    is not listed works from a checkout and is missing from a wheel."""
    import tomllib

    listed = set(tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    packages = {name for name, path in package_modules().items() if path.name == "__init__.py"}
    assert packages - listed == set()


def test_no_module_level_calls():
    """A bare call at module level (``warnings.filterwarnings(...)``, ``torch.set_num_threads(...)``, ``main()``) runs
    on import; constants and definitions are fine. ``__main__`` runs the CLI by design."""
    calls = []
    for name, path in package_modules().items():
        if name.endswith("__main__"):
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
                calls.append(f"{path.name}:{node.lineno}")
    assert calls == []
