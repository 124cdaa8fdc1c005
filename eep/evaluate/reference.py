"""Scores through ``lm_eval.simple_evaluate``: the plain harness path, used for model cards and as a reference."""
from __future__ import annotations

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

log = logging.getLogger(__name__)
_TASK_MANAGERS: dict[tuple, object] = {}


def task_manager(include_paths: tuple[str, ...] = (), include_defaults: bool = False):
    """One cached ``lm_eval`` ``TaskManager`` per (include paths, defaults): indexing the harness's tasks costs ~15 s."""
    from lm_eval.tasks import TaskManager

    import eep.tasks

    paths = tuple(dict.fromkeys((str(eep.tasks.include_path()), *map(str, include_paths))))
    key = (paths, include_defaults)
    if key not in _TASK_MANAGERS:
        _TASK_MANAGERS[key] = TaskManager(include_path=list(paths), include_defaults=include_defaults)
    return _TASK_MANAGERS[key]


def manager_for(tasks: list[str], include_paths: tuple[str, ...] = ()):
    """A task manager that knows ``tasks`` (indexing the harness's own tasks only if needed), else a ValueError."""
    manager = task_manager(tuple(include_paths))
    if not set(tasks) <= set(manager.all_tasks):
        manager = task_manager(tuple(include_paths), include_defaults=True)
    check_tasks(tasks, manager)
    return manager


def check_tasks(names: list[str], manager) -> None:
    """Raise a short ValueError naming the first task the manager does not know, with close names."""
    import eep.tasks

    known = list(manager.all_tasks)
    for name in names:
        if name not in known:
            raise eep.tasks.unknown_task_error(name, known)


def simple_scores(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 64,
                  device: str = "cpu", include_paths: tuple[str, ...] = ()) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` (0-1 units, stderr dropped) from one ``simple_evaluate`` call on a live model.

    ``model`` is a loaded ``PreTrainedModel`` (possibly patched); the tasks' ``test_split`` is scored, the first
    ``limit`` documents of each task (all when None).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from eep.logs import quiet_harness

    manager = manager_for(tasks, include_paths)
    with quiet_harness():  # lm-eval's warnings about a live model passed as `pretrained`: harmless (eep.logs)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                      log_samples=False, bootstrap_iters=0)
    return flat_metrics(out["results"])


def flat_metrics(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's ``results`` (``{task: {"metric,filter": value, ...}}``) as ``{task: {metric: value}}``, stderr
    and non-numeric entries dropped."""
    return {task: {k.split(",")[0]: float(v) for k, v in res.items()
                   if "," in k and "stderr" not in k and isinstance(v, (int, float))}
            for task, res in results.items()}

