"""The import rules that keep the layout meaningful, checked on the source (an AST walk, nothing imported).

- Entry scripts (train.py, val.py, detect.py, average.py, export.py, hubconf.py) are imported by nobody; tests and
  benchmarks may call a script's main() only.
- models/ and the basics at the root of utils/ import no data, evaluation, checkpoint or training code.
- utils/data imports neither evaluation, checkpoint nor training code; utils/eval and
  utils/checkpoint no training code; utils/export no data, evaluation or training code.
- The inference paths (detect.py, val.py, export.py, hubconf.py) reach no training module: no loss, EMA or optimiser.
- Every public function and class of the library is used by the library or a script, not only by tests.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from utils.config_files import REPO_ROOT

SCRIPTS = ("train", "val", "detect", "average", "export", "hubconf")
LIBRARY_FOLDERS = ("models", "utils")
# Packages a layer may not import, by the layer's package.
FORBIDDEN = {
    "models": ("utils.data", "utils.eval", "utils.checkpoint", "utils.train"),
    "utils": ("utils.data", "utils.eval", "utils.checkpoint", "utils.train", "models"),  # the root basics
    "utils.data": ("utils.eval", "utils.checkpoint", "utils.train"),
    "utils.eval": ("utils.checkpoint", "utils.train"),
    "utils.checkpoint": ("utils.data", "utils.eval", "utils.train"),
    "utils.export": ("utils.data", "utils.eval", "utils.train"),  # models, checkpoints and the basics only
    "utils.infer": ("utils.train",),  # inference: no loss, EMA or optimiser
}


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO_ROOT / folder).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[str]:
    """Every module `path` imports (absolute names; `from a import b` counts as a.b and a)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def layer_of(module: str) -> str:
    """The most specific FORBIDDEN key `module` belongs to."""
    return max((key for key in FORBIDDEN if within(module, key)), key=len)


def script_imports(files: list[Path]) -> list[tuple[str, str]]:
    """(file, imported script module) for every import of an entry script in `files`."""
    return [(path.name, name) for path in files for name in imported_modules(path) if name.split(".")[0] in SCRIPTS]


def test_no_script_is_imported_by_the_library_or_another_script():
    offenders = script_imports(python_files(*LIBRARY_FOLDERS) + sorted(REPO_ROOT.glob("*.py")))
    assert not offenders, f"import a library module instead of an entry script: {offenders}"


def test_tests_and_benchmarks_use_only_a_scripts_main():
    offenders = []
    for path in python_files("tests", "benchmarks"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in SCRIPTS and not node.level:
                offenders += [
                    f"{path.name}: from {node.module} import {a.name}" for a in node.names if a.name != "main"
                ]
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in SCRIPTS
                and node.attr != "main"
                and any(isinstance(n, ast.Import) and any(a.name == node.value.id for a in n.names) for n in tree.body)
            ):
                offenders.append(f"{path.name}: {node.value.id}.{node.attr}")
    assert not offenders, f"tests and benchmarks may call a script's main() only: {offenders}"


def test_each_layer_imports_only_what_it_may():
    offenders = []
    for path in python_files(*LIBRARY_FOLDERS):
        module = module_name(path)
        layer = layer_of(module)
        if layer == "utils" and module.count(".") > 1:  # a subpackage without rules of its own: utils.train
            continue
        offenders += [
            f"{module} imports {name}"
            for name in imported_modules(path)
            if any(within(name, banned) for banned in FORBIDDEN[layer])
        ]
    assert not offenders, "\n".join(offenders)


def reachable(script: str) -> set[str]:
    """The repository modules `script` imports, directly or through others (packages included)."""
    files = {module_name(p): p for p in python_files(*LIBRARY_FOLDERS)}
    seen, todo = set(), [REPO_ROOT / f"{script}.py"]
    while todo:
        for name in imported_modules(todo.pop()):
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):  # a.b.c imports the packages a and a.b too
                prefix = ".".join(parts[:depth])
                if prefix in files and prefix not in seen:
                    seen.add(prefix)
                    todo.append(files[prefix])
    return seen


@pytest.mark.parametrize("script", ["detect", "val", "export", "hubconf"])
def test_inference_reaches_no_training_code(script):
    modules = reachable(script)
    assert "utils.checkpoint.format" in modules and "models.yolo" in modules  # the walk follows imports
    training = sorted(m for m in modules if within(m, "utils.train"))
    assert not training, f"{script}.py reaches training code (loss, EMA, optimiser): {training}"


def test_a_script_importing_another_is_caught(tmp_path):
    """The rule above is no formality: `from val import evaluate` added to train.py is found."""
    fake = tmp_path / "train.py"
    fake.write_text((REPO_ROOT / "train.py").read_text() + "\nfrom val import evaluate\n")
    others = [p for p in sorted(REPO_ROOT.glob("*.py")) if p.name != "train.py"]
    assert script_imports(others + [fake]) == [("train.py", "val"), ("train.py", "val.evaluate")]


def test_every_public_library_name_is_used_outside_the_tests():
    """A public function or class that only tests (or benchmarks) call is dead code, or the library is missing
    its use."""
    defined = {}
    for path in python_files(*LIBRARY_FOLDERS):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                defined[node.name] = module_name(path)
    used = set()
    for path in python_files(*LIBRARY_FOLDERS) + list(REPO_ROOT.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Name):
                used.add(node.id)
            elif isinstance(node, ast.Attribute):
                used.add(node.attr)
            elif isinstance(node, ast.ImportFrom):
                used.update(alias.name for alias in node.names)
    unused = sorted(f"{module}.{name}" for name, module in defined.items() if name not in used)
    assert not unused, f"used by tests or benchmarks only (or by nobody): {unused}"
