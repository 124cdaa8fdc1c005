"""Quiet output: the third-party lines eep knows to be harmless are silenced; one switch shows everything again.

What eep's apps print by default: eep's own log lines (INFO and up: progress, warnings such as a failed candidate,
errors), its progress bar and its results. Silenced unless verbose: the loggers of lm-eval, transformers and
matplotlib below ERROR (for example lm-eval's "Custom kwargs can be passed to `--metadata`", "`pretrained` model kwarg
is not of type `str`" and "Passed an already-initialized model through `pretrained`", which it logs whenever a live
model is handed over, as eep does; transformers' generation warnings; matplotlib's font-cache lines), transformers'
and lm-eval's progress bars (loading weights, writing shards, building contexts). Where eep can pass the arguments a
library expects it does so instead (generation lengths without conflicting flags, greedy decoding without sampling
flags, the Agg backend for plots).

The switch: the apps' ``verbose=true`` key or Hydra's ``hydra.verbose=true`` (the apps call
:func:`quiet_third_party` once with :func:`verbose_requested`); in Python, the environment variable ``EEP_VERBOSE=1``
(also how the apps hand the choice to processes they start, such as Ray workers).
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterable
from contextlib import contextmanager

ENV = "EEP_VERBOSE"
QUIET_LOGGERS = ("lm_eval", "transformers", "matplotlib")   # set to ERROR unless verbose (children included)
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error",              # read by transformers when it sets up its logger
             "HF_HUB_DISABLE_PROGRESS_BARS": "1"}            # transformers' and huggingface_hub's progress bars
# Python ``warnings`` (not logging) of these libraries that eep's own calls trigger and knows to be harmless:
# (message regex, category, module regex), each targeted, never a blanket ignore. The main job and eep-compare raise
# none today (checked with PYTHONWARNINGS=always); add one here with the call that triggers it.
WARNING_FILTERS: tuple[tuple[str, type[Warning], str], ...] = ()

_saved: dict | None = None   # what quiet_third_party changed, to put back with verbose=True


def is_verbose() -> bool:
    """Whether third-party output is wanted: ``EEP_VERBOSE=1`` (set by the apps from their switch)."""
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes")


def verbose_requested(cfg=None) -> bool | tuple[str, ...]:
    """The apps' switch: True for ``verbose=true`` or ``hydra.verbose=true``; Hydra's ``hydra.verbose=<logger>`` (or
    a list) names loggers: those third-party ones among them are left alone (tuple of names); else False."""
    if cfg is not None and bool(cfg.get("verbose", False)):
        return True
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_verbose = HydraConfig.get().verbose if HydraConfig.initialized() else False
    except Exception:  # noqa: BLE001 - no Hydra run: no Hydra switch
        hydra_verbose = False
    if hydra_verbose is True or (isinstance(hydra_verbose, str) and hydra_verbose.lower() in ("true", "root")):
        return True
    if isinstance(hydra_verbose, str) and hydra_verbose:
        return (hydra_verbose,)
    if hydra_verbose and not isinstance(hydra_verbose, (bool, str)):
        return tuple(str(name) for name in hydra_verbose)
    return False


def quiet_third_party(verbose: bool | Iterable[str]) -> None:
    """Silence the known-harmless third-party output (``verbose=False``), or show everything again (True: what a
    previous call changed is put back). An iterable of logger names (Hydra's ``hydra.verbose=<names>``) quiets the
    rest and leaves those alone. Also records the choice in ``EEP_VERBOSE`` for eep's evaluators and the processes
    the app starts. Plots use the Agg backend either way (eep only writes image files)."""
    global _saved

    os.environ.setdefault("MPLBACKEND", "Agg")
    if verbose is True:
        os.environ[ENV] = "1"
        _restore()
        return
    keep = () if verbose is False else tuple(verbose)
    os.environ[ENV] = "0"
    if _saved is None:
        _saved = {"env": {k: os.environ.get(k) for k in QUIET_ENV}, "levels": {}, "filters": list(warnings.filters)}
    for key, value in QUIET_ENV.items():
        os.environ[key] = value
    for name in QUIET_LOGGERS:
        if any(name == k or name.startswith(k + ".") or k.startswith(name + ".") for k in keep):
            continue
        if name == "transformers":
            _quiet_transformers()
        logger = logging.getLogger(name)
        _saved["levels"].setdefault(name, logger.level)
        logger.setLevel(logging.ERROR)
    for message, category, module in WARNING_FILTERS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def _quiet_transformers() -> None:
    """transformers' own logger (set up by transformers, so through its API) and progress bars."""
    from transformers.utils import logging as hf_logging

    _saved.setdefault("transformers_bars", hf_logging.is_progress_bar_enabled())
    hf_logging.get_logger()   # sets up the library's root logger now, so a later set-up does not reset its level
    hf_logging.disable_progress_bar()


def _restore() -> None:
    global _saved

    if _saved is None:
        return
    for key, value in _saved["env"].items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    for name, level in _saved["levels"].items():
        logging.getLogger(name).setLevel(level)
    if _saved.get("transformers_bars") and "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.enable_progress_bar()
    warnings.filters[:] = _saved["filters"]
    warnings._filters_mutated()  # noqa: SLF001 - what warnings.filterwarnings itself calls after changing filters
    _saved = None


@contextmanager
def quiet_harness(progress: bool = False):
    """While an Evaluator is built: lm-eval's logger at ERROR (its task-loading and ``HFLM(pretrained=<model>)``
    warnings) and its "building contexts" progress bar off unless ``progress``; nothing changes when
    :func:`is_verbose`. Scoped, so a library user's own lm-eval logging is left as it was; it also quiets evaluators
    built in processes that never ran an app's start-up (Ray workers)."""
    if is_verbose():
        yield
        return
    import lm_eval.api.task as task_module

    logger = logging.getLogger("lm_eval")
    level, bar = logger.level, task_module.tqdm
    logger.setLevel(max(logging.ERROR, logger.getEffectiveLevel()))
    if not progress:
        task_module.tqdm = _silent(bar)
    try:
        yield
    finally:
        logger.setLevel(level)
        task_module.tqdm = bar


def _silent(bar):
    def silent(*args, **kwargs):
        kwargs["disable"] = True
        return bar(*args, **kwargs)

    return silent
