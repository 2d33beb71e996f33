"""The package's import structure: no cycles, the model independent of what builds on it, a light `import dsv2viz`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dsv2viz"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_imports(path: Path) -> set[str]:
    """The dsv2viz modules `path` imports when it is imported: top-level statements, not those inside
    functions (imported when used) or `if TYPE_CHECKING:` blocks (never at run time)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("dsv2viz"))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                if target.startswith("dsv2viz"):
                    found.add(target)
                    # `from . import analysis` imports a submodule
                    found.update(f"{target}.{a.name}" for a in node.names if is_module(f"{target}.{a.name}"))

    visit(ast.parse(path.read_text()).body)
    return found


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def import_graph() -> dict[str, set[str]]:
    """Module -> the dsv2viz modules it imports at module level. Edges to a module's own ancestor packages
    are left out: Python initialises those first whatever the module says, so they are never a cycle."""
    graph = {module_name(p): module_level_imports(p) for p in PACKAGE.rglob("*.py")}
    return {
        name: {t for t in targets if t in graph and t != name and not name.startswith(t + ".")}
        for name, targets in graph.items()
    }


def test_no_import_cycles_between_modules():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                walk(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)


def test_the_model_imports_nothing_that_builds_on_it():
    imported = import_graph()["dsv2viz.model"]
    assert not imported & {"dsv2viz.generation", "dsv2viz.traces", "dsv2viz.tokenizer", "dsv2viz.analysis"}
    assert not any(i.startswith(("dsv2viz.traces.", "dsv2viz.widgets", "dsv2viz.plots")) for i in imported)
    analysis = {t for name, ts in import_graph().items() if name.startswith("dsv2viz.analysis") for t in ts}
    assert not any(t.startswith("dsv2viz.corpus") for t in analysis)  # corpora come in through a protocol


def test_import_dsv2viz_loads_torch_safetensors_and_tokenizers_only():
    heavy = [  # (not tqdm: torch itself imports it)
        "plotly",
        "pandas",
        "ipywidgets",
        "ray",
        "pyarrow",
        "jinja2",
        "matplotlib",
        "transformers",
        "IPython",
    ]
    code = f"import sys, dsv2viz; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
