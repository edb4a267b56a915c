"""Score a model, with a candidate applied in memory, with lm-evaluation-harness (`lm_eval`).

The candidate goes through the same `Surgery` the search evaluates with (merged `probs`
candidates included: their gates become eep's mapped routers), and lm-eval's HF wrapper gets the
model object and tokenizer, so nothing is exported. lm-eval is the optional extra `harness`
(`pip install 'eep[harness]'`); it is imported only here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from eep.candidate import Candidate
from eep.models.loading import LoadedModel, load_model

INSTALL_HINT = "pip install 'eep[harness]' (lm-eval 0.4.x)"


def _lm_eval():
    try:
        import lm_eval  # noqa: PLC0415
        from lm_eval.models.huggingface import HFLM  # noqa: PLC0415
        from lm_eval.tasks import TaskManager  # noqa: PLC0415
    except ImportError as exc:
        raise ValueError(
            f"--harness needs lm-evaluation-harness, which is not installed ({exc}): {INSTALL_HINT}"
        ) from None
    return lm_eval, HFLM, TaskManager


def parse_tasks(text: str) -> list[str]:
    """`a,b, c` -> ["a", "b", "c"]; an empty list is an error."""
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise ValueError(f"--harness {text!r}: name at least one lm-eval task")
    return tasks


def run_harness(
    model: str | LoadedModel,
    tasks: Sequence[str],
    candidate: Candidate | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "auto",
    include_path: str | Path | None = None,
    num_fewshot: int | None = None,
    log_samples: bool = False,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` result for `model` with `candidate` (None: unpruned) applied.

    `include_path` is a folder of extra lm-eval task YAMLs (lm-eval's `--include_path`).
    """
    lm_eval, HFLM, TaskManager = _lm_eval()
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--include-path {include_path}: not a folder")
    loaded = (
        model
        if isinstance(model, LoadedModel)
        else load_model(model, device, dtype, trust_remote_code=trust_remote_code)
    )
    if loaded.tokenizer is None:
        raise ValueError(f"model {loaded.spec!r} has no tokenizer: lm-eval needs one")
    _apply(loaded, candidate)
    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [
        t for t in tasks if t not in manager.all_tasks and not t.endswith(".yaml") and "*" not in t
    ]
    if unknown:
        raise ValueError(
            f"unknown lm-eval task(s) {', '.join(unknown)}"
            + ("" if include_path else "; a local task YAML folder goes in --include-path")
        )
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        limit=limit,
        num_fewshot=num_fewshot,
        task_manager=manager,
        log_samples=log_samples,
    )


def _apply(loaded: LoadedModel, candidate: Candidate | None) -> None:
    # The evaluator's own code path: one Surgery per model object, skipping from the candidate.
    from eep.fitness import surgery_for  # noqa: PLC0415
    from eep.models.skipping import set_skipping, skip_thresholds_of  # noqa: PLC0415

    surgery = surgery_for(loaded.model)
    # Inference mode, as the Evaluator applies: a Surgery's working tensors made there can only
    # be updated there (the Evaluator and lm-eval may share one model object).
    with torch.inference_mode():
        if candidate is None:
            surgery.restore()
        else:
            surgery.apply(candidate)
        set_skipping(loaded.model, skip_thresholds_of(candidate))


def results_table(results: dict[str, Any]) -> str:
    """lm-eval's own markdown table of a result (and of its groups, when there are any)."""
    from lm_eval.utils import make_table  # noqa: PLC0415

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text


def results_json(results: dict[str, Any], **extra: Any) -> str:
    """The result's scores as one JSON line (`results`, `groups`, `n-shot`, `versions`, config)."""
    from lm_eval.utils import handle_non_serializable  # noqa: PLC0415

    keep = ("results", "groups", "group_subtasks", "n-shot", "higher_is_better", "versions",
            "n-samples", "config")
    out = {**extra, **{k: results[k] for k in keep if k in results}}
    return json.dumps(out, default=handle_non_serializable)


def main() -> None:
    """`python -m eep.harness ARGS`: lm-eval's own command line, eep's model classes registered.

    Stock exported checkpoints need nothing (`lm_eval run --model hf ...`); `eep_<family>` ones
    load only after `import eep`, which this entry point has done.
    """
    _lm_eval()
    from lm_eval.__main__ import cli_evaluate  # noqa: PLC0415

    cli_evaluate()


if __name__ == "__main__":
    main()
