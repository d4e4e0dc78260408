"""The two layers: the core (``import loft``: optimizer, pairs, clipping, integrations) never
imports the application (``loft.app``), and the application package starts light.
See docs/architecture.md, "Two layers"."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import loft

SRC = Path(loft.__file__).resolve().parent
CORE_MODULES = sorted(
    "loft." + ".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
    for p in SRC.rglob("*.py")
    if "app" not in p.relative_to(SRC).parts[:1]
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_core_module_list_is_complete():
    assert "loft.optim" in CORE_MODULES and "loft.integrations.trainer" in CORE_MODULES
    assert not [m for m in CORE_MODULES if m.startswith("loft.app")]


def test_importing_the_core_loads_no_app_module():
    """In a fresh interpreter, every core module imports without bringing in ``loft.app``."""
    code = (
        "import importlib, sys\n"
        f"for name in {CORE_MODULES!r}:\n"
        "    importlib.import_module(name.removesuffix('.loft').rstrip('.') or 'loft')\n"
        "print(sorted(m for m in sys.modules if m == 'loft.app' or m.startswith('loft.app.')))\n"
    )
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"the core imported application modules: {out.stdout.strip()}"


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, imported module)`` of every import in ``path`` (relative ones resolved)."""
    parts = ["loft", *path.relative_to(SRC).with_suffix("").parts]
    package = parts[:-1]  # what a level-1 relative import starts from (for __init__: the package)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{a.name}") for a in node.names]
    return found


def test_no_core_module_imports_the_app_statically():
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.relative_to(SRC).parts[0] == "app":
            continue
        for line, module in _imports(path):
            if module == "loft.app" or module.startswith("loft.app."):
                offenders.append(f"{path.relative_to(SRC.parent)}:{line} imports {module}")
        text = path.read_text(encoding="utf-8")
        if "import_module(\"loft.app" in text or "import_module('loft.app" in text:
            offenders.append(f"{path.relative_to(SRC.parent)} imports loft.app dynamically")
    assert not offenders, "the core must not import the application: " + "; ".join(offenders)


def test_import_resolver_sees_relative_imports():
    """The static check resolves ``from ..x import y`` (so a ``from .app import`` would be caught)."""
    assert "loft.clip" in [m for _, m in _imports(SRC / "integrations" / "trainer.py")]
    assert any(m == "loft.app.errors" for _, m in _imports(SRC / "app" / "cli.py"))


def test_app_package_and_entry_point_import_nothing_heavy():
    """``loft.app`` and ``loft.app.command`` (the console script) load no torch / transformers /
    typer: the dependency check must run before any of them is imported."""
    out = _run(
        "import sys, loft.app, loft.app.command\n"
        "print(sorted(m for m in ('torch', 'transformers', 'typer', 'peft', 'accelerate') if m in sys.modules))\n"
    )
    assert out.returncode == 0, out.stderr
    # importing loft.app runs loft/__init__ (which needs torch); nothing beyond torch may load
    assert out.stdout.strip() in ("[]", "['torch']"), out.stdout


def test_python_dash_m_loft_app_runs_the_command():
    out = subprocess.run([sys.executable, "-m", "loft.app", "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "finetune" in out.stdout and "compare" in out.stdout


# ----------------------------------------------------------------------------- docs/architecture.md's table
ARCHITECTURE = SRC.parents[1] / "docs" / "architecture.md"


def _module_name(path: Path) -> str:
    return "loft." + ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")


def _loft_imports(path: Path) -> set[str]:
    """The loft modules ``path`` imports (``from .x import y`` counts ``loft.x``, or ``loft.x.y``
    where that is a module), lazy imports inside functions included."""
    modules = {_module_name(p) for p in SRC.rglob("*.py")} | {"loft"}
    found = set()
    for _, name in _imports(path):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != _module_name(path):
            found.add(name)
    # ``from .x import y`` where ``loft.x.y`` is a module yields ``loft.x`` too: keep the submodule
    return {m for m in found if m == "loft" or not any(other.startswith(m + ".") for other in found)}


def _layer_table() -> dict[str, set[str]]:
    """``module -> loft modules it may import`` from the table of docs/architecture.md, "Layers"."""
    table = {}
    for line in ARCHITECTURE.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`loft/") and cells[0].endswith(".py`"):
            module = "loft." + cells[0].strip("`").removeprefix("loft/").removesuffix(".py").replace("/", ".")
            allowed = set() if cells[2] == "nothing" else {"loft." + m.strip().strip("`") for m in cells[2].split(",")}
            table[module] = allowed
    return table


def test_every_core_module_imports_only_what_architecture_md_says():
    """docs/architecture.md's "Layers" table lists every core module with the loft modules it may
    import; each module's real imports (lazy ones too) are checked against it."""
    table = _layer_table()
    core = [p for p in SRC.rglob("*.py") if p.relative_to(SRC).parts[0] != "app" and p.name != "__init__.py"]
    assert {_module_name(p) for p in core} == set(table), "architecture.md's Layers table and src/loft differ"
    wrong = {}
    for path in core:
        extra = _loft_imports(path) - table[_module_name(path)]
        if extra:
            wrong[_module_name(path)] = sorted(extra)
    assert not wrong, f"imports that architecture.md's Layers table does not allow: {wrong}"


def test_no_module_imports_another_in_a_circle():
    graph = {_module_name(p): _loft_imports(p) - {"loft"} for p in SRC.rglob("*.py")}
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(node):] + [node]))
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            if nxt in graph:
                visit(nxt, path + [node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])


def test_no_module_imports_a_private_name_of_another():
    offenders = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("loft")):
                offenders += [f"{path.relative_to(SRC.parent)}:{node.lineno} {a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert not offenders, f"imports of another module's private names: {offenders}"


#: the core as the application may use it (docs/architecture.md, "Two layers")
PUBLIC_CORE = {"loft", "loft.federated", "loft.lr_search", "loft.integrations", "loft.integrations.trainer",
               "loft.integrations.library_internals", "loft.linalg"}


def test_the_app_uses_only_the_cores_public_api():
    offenders = {}
    for path in (SRC / "app").rglob("*.py"):
        core = {m for m in _loft_imports(path) if not m.startswith("loft.app")} - PUBLIC_CORE
        if core:
            offenders[_module_name(path)] = sorted(core)
    assert not offenders, f"application modules importing core internals: {offenders}"
    linalg = [(p, n) for p in (SRC / "app").rglob("*.py") for n in ast.walk(ast.parse(p.read_text()))
              if isinstance(n, ast.ImportFrom) and n.level and n.module == "linalg"]
    assert all([a.name for a in n.names] == ["rank_regime"] for _, n in linalg)
