"""The package's modules import each other in layers: no module reaches itself again through its imports (counting
imports inside functions and for annotations, which only postpone a loop), and parsing and checking flags imports
no training code (the checks of the checkpoints a run reads are ``training/preflight.py``'s)."""
import ast
import functools
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_puffin"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set) -> set:
    """The package modules ``path`` imports anywhere in its text (``from a import b`` counts ``a.b`` when that is a
    module, else ``a``)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                if target in modules:
                    found.add(target)
    return found - {name}


def _cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index, low, on_stack, stack, components, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
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
                    components.append(sorted(component))
    return components


@functools.lru_cache(maxsize=1)
def _graph() -> dict:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(path) for path in files}
    return {_module_name(path): _imports(path, modules) for path in files}


def test_no_module_imports_itself_through_others():
    graph = _graph()
    assert "megatron_puffin.config.validate" in graph["megatron_puffin.config"]  # the graph is read
    cycles = _cycles(graph)
    assert cycles == [], "import circles (the modules of each import one another around a loop): " + "; ".join(
        ", ".join(cycle) for cycle in cycles)


def test_the_cycle_finder_finds_a_loop():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]


@pytest.mark.parametrize("layer, above", [
    ("megatron_puffin.config", "megatron_puffin.training"),
    ("megatron_puffin.config", "megatron_puffin.inference"),
    ("megatron_puffin.models", "megatron_puffin.training"),
    ("megatron_puffin.models", "megatron_puffin.config"),  # flags -> model config: megatron_puffin.config.model
    ("megatron_puffin.data", "megatron_puffin.training"),
    ("megatron_puffin.inference", "megatron_puffin.training"),  # checkpoints load through megatron_puffin.checkpointing
    ("megatron_puffin.convert", "megatron_puffin.training"),
    ("megatron_puffin.checkpointing", "megatron_puffin.training"),
    ("megatron_puffin.distributed", "megatron_puffin.platform"),
    ("megatron_puffin.training", "megatron_puffin.platform"),
])
def test_lower_layers_import_nothing_of_higher_ones(layer, above):
    graph = _graph()
    uses = {(module, target) for module, targets in graph.items() if module == layer or module.startswith(layer + ".")
            for target in targets if target == above or target.startswith(above + ".")}
    assert uses == set()


def test_the_patching_mechanism_imports_nothing_of_the_package():
    """The modules holding megatron-core replacements import it; the table (platform.py) imports them."""
    assert _graph()["megatron_puffin.patching"] == set()


def test_parsing_and_checking_flags_loads_no_training_code(tmp_path):
    """In a fresh interpreter: parse and validate flags that name a checkpoint to resume; no training module loads
    (the checkpoint's checks are training/preflight.py's)."""
    code = (
        "import sys\n"
        "from megatron_puffin.config import ConfigError, parse_args\n"
        f"try:\n    parse_args(['--load', {str(tmp_path / 'missing')!r}, '--train-iters', '1'])\n"
        "except ConfigError:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('megatron_puffin.training')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                            cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
