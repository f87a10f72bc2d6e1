"""The package's imports go one way (README, Layout):

    commands -> pipeline -> {labeling, rl -> train} -> models -> {ops, tasks} -> data -> io -> config

Every `import fastrlhf.x` and `from fastrlhf.x import y` in python/fastrlhf, lazy ones inside functions
included, is read from the source (ast, nothing imported). A module may import its own folder and the
folders below it; no two modules may import each other, directly or through a longer cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "python" / "fastrlhf"
# each folder's level; a module may import folders of a strictly lower level (and its own folder)
LEVEL = {
    "commands": 6,
    "cli": 7,
    "__main__": 8,
    "pipeline": 5,
    "labeling": 4,
    "rl": 4,
    "train": 3,
    "models": 2,
    "ops": 1,
    "tasks": 1,
    "data": 0,
    "io": -0.5,  # file formats only: data (tokenizers from GGUF files, token files) reads through io
    "_ext": -1,
    "config": -1,  # fastrlhf/config.py: the typed-config machinery and validators every layer uses
    "__init__": 9,  # fastrlhf/__init__.py: the public facade (build_info, from_pretrained, load_tokenizer)
}
ALLOWED_SIDEWAYS = {("rl", "train")}  # {labeling, rl -> train}: rl sits above train


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> set[str]:
    """fastrlhf modules imported anywhere in the file (top level or inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = module_name(path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fastrlhf")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = me.split(".")[: -node.level] if path.name != "__init__.py" else me.split(".")
                base = ".".join(anchor[: len(anchor) - node.level + 1] + ([base] if base else []))
            if not base.startswith("fastrlhf"):
                continue
            for a in node.names:  # `from fastrlhf.x import y`: y may be a module of x (or the compiled _C)
                sub = f"{base}.{a.name}"
                path = PKG.parent / sub.replace(".", "/")
                found.add(
                    sub if path.with_suffix(".py").exists() or path.is_dir() or a.name == "_C" else base
                )
    found.discard(me)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PKG.rglob("*.py"))}


def test_every_folder_has_a_level():
    folders = {folder(m) for m in graph()}
    assert folders <= set(LEVEL), f"folders without a place in the layering: {sorted(folders - set(LEVEL))}"


def test_no_upward_import():
    bad = []
    for mod, deps in graph().items():
        src = folder(mod)
        for dep in deps:
            dst = folder(dep)
            if dst == src or dep == "fastrlhf" or dst in ("_ext", "_C", "__init__", "config"):
                continue
            if LEVEL[dst] >= LEVEL[src] and (src, dst) not in ALLOWED_SIDEWAYS:
                bad.append(f"{mod} ({src}) imports {dep} ({dst})")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if d not in g:
                continue
            if state.get(d) == 1:
                return [*stack[stack.index(d) :], d]
            if d not in state and (cycle := visit(d)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_library_code_never_imports_a_command():
    bad = [
        f"{m} imports {d}"
        for m, deps in graph().items()
        if folder(m) not in ("commands", "cli", "__main__")
        for d in deps
        if folder(d) in ("commands", "cli")
    ]
    assert not bad, "\n".join(bad)
