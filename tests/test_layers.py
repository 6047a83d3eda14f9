"""The package's layering, checked on the source (an AST walk, no imports executed).

Each module may import only from its own layer or the ones below; `core` is pure (standard
library, numpy and moocore; no files); only `engine.py` imports llama_cpp; the daemon never
imports the paper's evaluation, planning, or anything that quantizes.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "apreqeld"

# Lowest first. A module's layer is that of the longest prefix listed here.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("apreqeld", "apreqeld.errors", "apreqeld.data"),
    ("apreqeld.core",),
    ("apreqeld.storage", "apreqeld.resources", "apreqeld.manifest"),
    ("apreqeld.engine",),
    ("apreqeld.gguf",),
    ("apreqeld.store",),
    ("apreqeld.evidence",),
    ("apreqeld.build",),
    ("apreqeld.workflow", "apreqeld.aiming", "apreqeld.aiming_loop", "apreqeld.planset",
     "apreqeld.study"),
    ("apreqeld.runtime",),
    ("apreqeld.client",),
    ("apreqeld.cli",),
)
CORE_THIRD_PARTY = {"numpy", "moocore"}
FILE_MODULES = {"os", "io", "pathlib", "shutil", "tempfile", "glob", "mmap", "sqlite3"}
FILE_CALLS = {"open", "read_text", "write_text", "read_bytes", "write_bytes", "unlink",
              "mkdir", "load", "save", "savez", "loadtxt", "savetxt", "fromfile", "tofile"}
# The daemon never quantizes in its supervisor: building shards (store.fill, build) is a child
# process's job, started as a command, never imported.
FORBIDDEN = {"apreqeld.runtime": ("apreqeld.study", "apreqeld.workflow", "apreqeld.planset",
                                  "apreqeld.store.fill", "apreqeld.build", "apreqeld.aiming",
                                  "apreqeld.aiming_loop"),
             "apreqeld.client": ("apreqeld.engine", "apreqeld.study", "apreqeld.workflow")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best, rank = -1, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, rank = len(name), i
    return rank


def imports(path: Path) -> list[tuple[str, int]]:
    """Absolute names of everything a module imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = module_name(path).split(".")
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here if is_pkg else here[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.append((mod, node.lineno))
            if mod.startswith("apreqeld"):  # `from apreqeld import engine` imports a module
                found += [(f"{mod}.{a.name}", node.lineno) for a in node.names]
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    assert SOURCES
    missing = [module_name(p) for p in SOURCES if layer_of(module_name(p)) < 0]
    assert not missing, f"modules outside the layer table: {missing}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_imports_go_down_only(path: Path) -> None:
    me = module_name(path)
    rank = layer_of(me)
    for mod, line in imports(path):
        if not mod.startswith("apreqeld"):
            continue
        if layer_of(mod) > rank:
            pytest.fail(f"{me}:{line} imports {mod}, a higher layer")
        for prefix, banned in FORBIDDEN.items():
            if me.startswith(prefix) and mod.startswith(banned):
                pytest.fail(f"{me}:{line} imports {mod}, which {prefix} must not use")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_only_engine_imports_llama_cpp(path: Path) -> None:
    if module_name(path) == "apreqeld.engine":
        return
    for mod, line in imports(path):
        assert mod.split(".")[0] != "llama_cpp", f"{module_name(path)}:{line} imports {mod}"


CORE = [p for p in SOURCES if module_name(p).startswith("apreqeld.core")]


@pytest.mark.parametrize("path", CORE, ids=lambda p: module_name(p))
def test_core_is_pure(path: Path) -> None:
    me = module_name(path)
    for mod, line in imports(path):
        top = mod.split(".")[0]
        if mod.startswith("apreqeld"):
            assert layer_of(mod) <= 1, f"{me}:{line} imports {mod}"
        elif top in FILE_MODULES:
            pytest.fail(f"{me}:{line} imports {mod}: core touches no files")
        else:
            allowed = sys.stdlib_module_names | CORE_THIRD_PARTY | {"__future__"}
            assert top in allowed, \
                f"{me}:{line} imports {mod}: core uses only the standard library, numpy and moocore"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(
                fn, ast.Attribute) else None
            assert name not in FILE_CALLS, f"{me}:{node.lineno} calls {name}(): core opens no files"


def test_the_checker_catches_violations(tmp_path: Path) -> None:
    """The rules above can fail: a core module that reads a file and imports the engine."""
    bad = PACKAGE / "core" / "_layer_probe.py"
    bad.write_text("from pathlib import Path\nfrom apreqeld import engine\n"
                   "x = open('f').read()\n")
    try:
        assert any(m == "apreqeld.engine" for m, _ in imports(bad))
        assert layer_of("apreqeld.engine") > layer_of(module_name(bad))
        with pytest.raises(pytest.fail.Exception):
            test_core_is_pure(bad)
    finally:
        bad.unlink()
