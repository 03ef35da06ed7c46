"""The package's layering (docs/design.md), checked by walking every import of every module.

A module may import from its own layer or a lower one; the import graph has no cycle (imports
inside functions count: a lazy import hides a cycle, it does not remove it); no module uses a
``_private`` name of another module; plotting happens only in ``samliver.visualization`` (and
the widgets' interactive canvas), and nothing calls ``matplotlib.use``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "samliver"

# The layers of docs/design.md, lowest first. A new module must be placed here.
LAYERS: dict[str, tuple[str, ...]] = {
    "core": ("util", "config", "download"),
    "data": ("preprocess", "io", "sample", "datasets", "phantom"),
    "analysis": ("evaluation", "postprocess", "visualization"),
    "model": ("backends", "decoder_backends", "models", "embeddings"),
    "prompting": ("prompts", "prompt_based_segmentation", "multi_dimensional_segmentation"),
    "learning": ("heads", "losses", "checkpoints", "training_data", "training", "baselines", "nnunet",
                 "distributed"),
    "use": ("inference", "zero_shot", "experiment", "annotate", "annotate_sim",
            "dataset_embedding", "bench", "demo", "results"),
    "front": ("view3d", "viewer", "widgets", "app"),
    "cli": ("cli",),
    "api": ("__init__", "__main__"),
}
RANK = {mod: i for i, mods in enumerate(LAYERS.values()) for mod in mods}


def _modules() -> dict[str, Path]:
    """``{dotted name relative to samliver: path}`` for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer_of(name: str) -> int:
    top = name.split(".")[0]
    if top not in RANK:
        pytest.fail(f"samliver.{name} is in no layer: add it to LAYERS here and to docs/design.md")
    return RANK[top]


def _resolve(current: str, node: ast.ImportFrom) -> str | None:
    """The samliver-relative module a ``from X import ...`` reads, or None if outside samliver."""
    if node.level == 0:
        if not (node.module or "").startswith("samliver"):
            return None
        return (node.module or "samliver")[len("samliver"):].lstrip(".")
    is_package = MODULES.get(current, Path()).name == "__init__.py"
    base = current.split(".") if current else []
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join(base + ([node.module] if node.module else []))


def _type_only_lines(tree: ast.AST) -> set[int]:
    """Lines of imports under ``if TYPE_CHECKING:``: annotations only, never run."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def _imports(name: str, *, runtime_only: bool = False) -> list[tuple[str, list[str], int]]:
    """``[(imported samliver module, names taken from it, line)]`` for one module.

    ``runtime_only`` leaves out the imports under ``if TYPE_CHECKING:``.
    """
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    skip = _type_only_lines(tree) if runtime_only else set()
    out = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            target = _resolve(name, node)
            if target is None:
                continue
            names = [a.name for a in node.names]
            # ``from . import training`` imports the module samliver.training
            subs = [f"{target}.{n}".lstrip(".") for n in names if f"{target}.{n}".lstrip(".") in MODULES]
            if subs:
                out += [(s, [], node.lineno) for s in subs]
                rest = [n for n in names if f"{target}.{n}".lstrip(".") not in MODULES]
                if rest:
                    out.append((target, rest, node.lineno))
            else:
                out.append((target, names, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("samliver."):
                    out.append((alias.name[len("samliver."):], [], node.lineno))
    return [(t, n, line) for t, n, line in out if t != name]


GRAPH = {name: _imports(name) for name in MODULES}


def test_every_module_has_a_layer():
    for name in MODULES:
        if name:
            _layer_of(name)


def test_imports_point_down_or_sideways():
    wrong = []
    for name, imports in GRAPH.items():
        if not name:
            continue
        for target, _, line in imports:
            if target and target.split(".")[0] != name.split(".")[0] and _layer_of(target) > _layer_of(name):
                wrong.append(f"samliver/{MODULES[name].relative_to(PACKAGE)}:{line} imports "
                             f"samliver.{target} from a higher layer")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    """No cycle among the imports that run (type-only imports still obey the layers above)."""
    runtime = {name: _imports(name, runtime_only=True) for name in MODULES}
    edges = {n: sorted({t for t, _, _ in imps if t in MODULES}) for n, imps in runtime.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in edges.get(node, []):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in edges:
        if node not in state and (cycle := visit(node)):
            pytest.fail("import cycle: " + " -> ".join(f"samliver.{c}" for c in cycle))


def test_no_private_names_across_modules():
    wrong = []
    for name, imports in GRAPH.items():
        for target, names, line in imports:
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                wrong.append(f"samliver.{name}:{line} takes {private} from samliver.{target}")
        # attribute access to a private name of an imported samliver module (``io._read_mrc``)
        tree = ast.parse(MODULES[name].read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and _resolve(name, node) is not None:
                base = _resolve(name, node)
                for a in node.names:
                    if f"{base}.{a.name}".lstrip(".") in MODULES:
                        aliases[a.asname or a.name] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                wrong.append(f"samliver.{name}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not wrong, "\n".join(wrong)


def test_plotting_only_in_visualization():
    wrong = []
    for name, path in MODULES.items():
        text = path.read_text()
        if "matplotlib.use(" in text:
            wrong.append(f"samliver.{name} calls matplotlib.use (a library must not pick the backend)")
        uses_pyplot = "matplotlib.pyplot" in text or "from matplotlib import pyplot" in text
        if uses_pyplot or (name != "visualization" and ".savefig(" in text):
            wrong.append(f"samliver.{name} draws with pyplot or saves figures itself: build a Figure in samliver.visualization")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_what_it_should():
    """The walker itself: it resolves relative imports and finds function-level ones."""
    assert ("training_data", ["slice_tensors"]) in [(t, n) for t, n, _ in GRAPH["inference"]]
    assert any(t == "models" for t, _, _ in GRAPH["cli.options"])
    assert _layer_of("cli.train") == RANK["cli"] > _layer_of("training")
