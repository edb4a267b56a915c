"""Task names: the built-in synthetic tasks and the specs shipped in `eep/tasks/specs/`."""

from __future__ import annotations

from pathlib import Path

from eep.tasks.spec import TaskError, TaskSpec

SPECS_DIR = Path(__file__).parent / "specs"


def shipped_specs() -> list[str]:
    """Names of the YAML specs shipped with eep (file stems), sorted."""
    return sorted(p.stem for p in SPECS_DIR.glob("*.yaml"))


def available_tasks() -> list[str]:
    """Every task name `resolve_task` accepts: built-in synthetic tasks first, then shipped specs."""
    from eep.tasks import synthetic

    return [*synthetic.SYNTHETIC_TASKS, *shipped_specs()]


def builtin_spec(name: str) -> TaskSpec:
    """The default spec of a built-in synthetic task."""
    return TaskSpec.from_dict(
        {"name": name, "source": {"kind": "builtin", "name": name}},
        origin=f"built-in task {name!r}",
    )


def resolve_task(ref: str | Path | TaskSpec | dict) -> TaskSpec:
    """A TaskSpec from a task name, a `.yaml` path, a mapping, or a TaskSpec (returned as is)."""
    if isinstance(ref, TaskSpec):
        return ref
    if isinstance(ref, dict):
        return TaskSpec.from_dict(ref)
    text = str(ref)
    if isinstance(ref, Path) or text.endswith((".yaml", ".yml")):
        return TaskSpec.from_yaml(text)
    from eep.tasks import synthetic

    if text in synthetic.SYNTHETIC_TASKS:
        return builtin_spec(text)
    if text in shipped_specs():
        return TaskSpec.from_yaml(SPECS_DIR / f"{text}.yaml")
    raise TaskError(f"unknown task {text!r}; available tasks: {', '.join(available_tasks())}")
