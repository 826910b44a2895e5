"""The package's layers point one way: parsed from the source, every jaxlm import (function-level ones too, and
the package `__init__`s they run) goes to the same layer or a lower one, and no import cycle exists."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent / "jaxlm"
# Lower layers never import higher ones. Most specific prefix wins.
LAYERS = {
    "jaxlm": 0,  # the lazy package __init__ (PEP 562): imports nothing
    "jaxlm.errors": 0,
    "jaxlm.choices": 0,
    "jaxlm.presets": 0,
    "jaxlm.kernels": 0,  # native CPU kernels (jax.ffi): imports only jax
    "jaxlm.axes": 1,
    "jaxlm.config": 1,
    "jaxlm.data": 1,
    "jaxlm.ops": 1,
    "jaxlm.rewards": 1,  # example reward functions (align.reward=jaxlm.rewards:...)
    "jaxlm.nn": 2,
    "jaxlm.parallel": 2,
    "jaxlm.engine": 2,
    "jaxlm.flops": 3,
    "jaxlm.peft": 3,
    "jaxlm.quantize": 3,  # weights stored for inference (--weights)
    "jaxlm.generate": 3,
    "jaxlm.hf": 4,  # Hugging Face and GGUF interop: below training
    "jaxlm.train": 5,
    "jaxlm.hf.convert": 6,  # run directories <-> Hugging Face: above training
    "jaxlm.plan": 6,
    "jaxlm.serve": 7,
    "jaxlm.cli": 8,
    "jaxlm.__main__": 8,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """The jaxlm modules `name` imports anywhere in its file, with the packages whose __init__ that runs."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            found |= {m for i in range(1, len(parts) + 1) if (m := ".".join(parts[:i])) in MODULES}
    own = name.split(".")
    return found - {".".join(own[:i]) for i in range(1, len(own) + 1)}  # its own packages run anyway


def layer(name: str) -> int:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[best]


GRAPH = {name: _imports(name) for name in MODULES}


def test_every_module_and_package_is_placed():
    """A new top-level module or package must be given its layer here."""
    unplaced = sorted({".".join(n.split(".")[:2]) for n in MODULES} - set(LAYERS))
    assert not unplaced, unplaced


def test_imports_point_down():
    upward = sorted(
        f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
        for a, bs in GRAPH.items()
        for b in bs
        if layer(b) > layer(a)
    )
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    state, cycles = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("module", ["jaxlm.ops", "jaxlm.ops.attention", "jaxlm.config"])
def test_importing_a_low_layer_stays_light(module):
    code = f"import sys, {module}; print(' '.join(sorted(m for m in sys.modules if m.startswith('jaxlm'))))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert all(layer(m) <= layer(module) for m in loaded), loaded
