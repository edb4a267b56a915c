"""Import hygiene: light modules stay light, the task modules import one way, registration still works."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

EEP = Path(__file__).resolve().parent.parent / "eep"


def run_python(code: str) -> str:
    """`code` in a fresh interpreter (nothing imported yet); its stdout."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


LIGHT = ("eep.search", "eep.config", "eep.summary", "eep.dashboard.rundata")


def test_light_modules_do_not_import_transformers():
    # One interpreter per module: what one imports must not hide what another pulls in.
    code = "import sys, {}; print('transformers' in sys.modules)"
    assert [run_python(code.format(m)) for m in LIGHT] == ["False"] * len(LIGHT)


# Registration must happen whichever comes first: eep, transformers, or an eep module that
# imports transformers itself (registering while eep.models.families is half-built would fail).
REGISTRATION_ORDERS = {
    "transformers-later": (
        "import importlib.util, eep, sys\n"
        "assert 'transformers' not in sys.modules\n"
        "importlib.util.find_spec('transformers')  # a lookup alone registers nothing\n",
        "eep_mixtral", "EEPMixtralConfig",
    ),
    "through-an-eep-module": (
        "import sys, eep.cli.search\n", "eep_olmoe", "EEPOlmoeConfig",
    ),
    "transformers-first": ("import transformers, eep\n", "eep_qwen2_moe", "EEPQwen2MoeConfig"),
}


@pytest.mark.slow  # a fresh interpreter importing transformers, ~10 s each
@pytest.mark.parametrize("order", REGISTRATION_ORDERS)
def test_import_eep_registers_the_mapped_classes_in_any_import_order(order):
    prelude, model_type, config_class = REGISTRATION_ORDERS[order]
    out = run_python(
        prelude
        + "from transformers import AutoConfig\n"
        + f"print(type(AutoConfig.for_model({model_type!r})).__name__)"
    )
    assert out == config_class


@pytest.mark.parametrize("name", ["spec", "loaders", "scorers", "vocab"])
def test_task_modules_import_only_at_top_level(name):
    """No function-level import of eep modules (that is how an import cycle hides)."""
    tree = ast.parse((EEP / "tasks" / f"{name}.py").read_text())
    top = set(map(id, tree.body))
    nested = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom | ast.Import)
        and id(node) not in top
        and _imports_eep(node)
        and not _under_type_checking(tree, node)
    ]
    assert nested == [], f"eep/tasks/{name}.py imports eep inside functions at lines {nested}"


def _imports_eep(node: ast.Import | ast.ImportFrom) -> bool:
    if isinstance(node, ast.ImportFrom):
        return (node.module or "").startswith("eep")
    return any(alias.name.startswith("eep") for alias in node.names)


def _under_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    for block in tree.body:
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test):
            if any(child is node for child in ast.walk(block)):
                return True
    return False


def test_vocab_is_the_lowest_task_module():
    assert run_python(
        "import sys, eep.tasks.vocab; print(sorted(m for m in sys.modules if m.startswith('eep.tasks.')))"
    ) == "['eep.tasks.vocab']"


@pytest.mark.parametrize("path", sorted((EEP / "models").glob("*.py")), ids=lambda p: p.name)
def test_models_do_not_import_oneshot(path):
    """`eep/models/` sits below the one-shot methods: it never imports them, not even lazily."""
    tree = ast.parse(path.read_text())
    upward = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom) and _imports(node, "eep.oneshot")
    ]
    assert upward == [], f"{path.name} imports eep.oneshot at lines {upward}"


def _imports(node: ast.Import | ast.ImportFrom, package: str) -> bool:
    names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
    return any(name == package or name.startswith(package + ".") for name in names)
