"""The import layering of DESIGN.md §2, read from the source: no package reaches into a learner's private
module, and the eval harness knows nothing of learners (it evaluates any policy)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "agentrl"


def _imports(path: Path) -> list[str]:
    """Every module ``path`` imports, top level or inside functions, as dotted names."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def _modules_under(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py")) if folder else sorted(PACKAGE.rglob("*.py"))


def test_no_module_outside_the_learners_imports_a_private_learner_module():
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}: {name}"
        for path in _modules_under("")
        if "learners" not in path.relative_to(PACKAGE).parts
        for name in _imports(path)
        if name.startswith("agentrl.learners.") and name.split(".")[2].startswith("_")
    ]
    assert not offenders, "import a public module instead:\n" + "\n".join(offenders)


def test_the_learners_package_has_no_private_modules_left_for_others_to_reach():
    assert not [p.name for p in (PACKAGE / "learners").glob("_*.py") if p.name != "__init__.py"]


def _learner_imports(*folders: str) -> list[str]:
    return [
        f"{path.relative_to(PACKAGE.parent)}: {name}"
        for folder in folders
        for path in _modules_under(folder)
        for name in _imports(path)
        if name == "agentrl.learners" or name.startswith("agentrl.learners.")
    ]


def test_evaluation_imports_nothing_from_the_learners():
    offenders = _learner_imports("evaluation")
    assert not offenders, "the harness evaluates any policy; move what it needs below learners:\n" + "\n".join(
        offenders
    )


def test_the_layers_below_the_learners_import_nothing_from_them():
    offenders = _learner_imports("rewards", "data", "models")
    assert not offenders, "a learned scorer lives in rewards, a value head in models:\n" + "\n".join(offenders)
