"""One home for the task names and placeholder ids (megatron_puffin.tasks), and the layering it allows: the
models import neither the data pipeline nor the training code."""
import ast
from pathlib import Path

import megatron_puffin
from megatron_puffin import tasks
from megatron_puffin.data import templates
from megatron_puffin.data.task_encoders import ENCODERS

PACKAGE = Path(megatron_puffin.__file__).parent


def test_tasks_split_into_understanding_and_generation_and_every_task_has_an_encoder():
    assert set(tasks.UNDERSTANDING_TASKS).isdisjoint(tasks.GENERATION_TASKS)
    assert set(tasks.TASK_VARIANTS.values()) == set(tasks.TASKS) == set(ENCODERS)
    assert [t for t in tasks.TASKS if tasks.is_generation(t)] == list(tasks.GENERATION_TASKS)


def test_placeholder_ids_are_the_tasks_module_values():
    for name in ("IGNORE_INDEX", "INPUT_IMAGE_TOKEN_INDEX", "QUERY_TOKEN_INDEX", "UNDERSTANDING_PAD_ID"):
        assert getattr(templates, name) is getattr(tasks, name), name
    assert (tasks.IGNORE_INDEX, tasks.INPUT_IMAGE_TOKEN_INDEX, tasks.QUERY_TOKEN_INDEX) == (-100, -200, -400)


def _imported_modules(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def test_models_import_neither_data_nor_training():
    offending = sorted(
        f"{path.relative_to(PACKAGE)}: {module}"
        for path in (PACKAGE / "models").rglob("*.py")
        for module in _imported_modules(path)
        if module.startswith(("megatron_puffin.data", "megatron_puffin.training"))
    )
    assert not offending, offending
