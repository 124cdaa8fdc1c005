"""The apps' settings, checked once before any model loads: a composed config in, validated values out, or one
:class:`UserError` line naming the key, the value and what would be valid.

One typed schema (:data:`SEARCH`, :data:`COMPARE`) covers every key of ``eep-search`` (conf/eep_search.yaml and its
groups) and ``eep-compare`` (plus ``compare.*``). :func:`check` runs, in order: unknown keys (with the nearest known
one), types and ranges, paths (model folder, include path, resume folder), combinations that need no model (k' <= E',
distinct splits, Ray for several workers, CUDA for a CUDA device) and names (optimisers, methods, lm-eval tasks with
the include path, task weights). :func:`check_shape` then reads the model's ``config.json`` only (no weights) and
checks the counts against the model's shape (E' <= E, k', layer groups, the family's own constraints such as
DeepSeek-V3's expert groups). :func:`check_overrides` refuses a command line's unknown keys and config-group options
before Hydra composes anything. Self-contained on purpose (it imports eep's modules lazily, for their registries).
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from eep.errors import UserError
from eep.schema import (COMPARE_CONFIG, GROUPS, SEARCH, SEARCH_CONFIG, bad, schema, show,  # noqa: F401
                        unknown_key, walk)


def check_overrides(argv: list[str], compare: bool = False) -> None:
    """Refuse a command line's overrides that name an unknown key or config-group option (before Hydra composes):
    ``search.num_expert=4`` or ``+search.num_expert=4``, ``model=skills_llama``."""
    import eep

    known = schema(compare)
    free = ("task.weights.", "compare.options.", "model.device_map.")
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if not key or key.startswith("hydra") or "/" in key or "@" in key or key.startswith(free):
            continue
        if key in GROUPS:
            options = sorted(p.stem for p in (eep.conf_dir() / key).glob("*.yaml"))
            for option in value.split(",") if re.fullmatch(r"[\w.-]+(,[\w.-]+)*", value) else ():
                if option not in options:
                    close = difflib.get_close_matches(option, options, n=1)
                    hint = f"; did you mean {close[0]}?" if close else ""
                    raise UserError(f"{key}={option}: unknown {key} config{hint} (known: {', '.join(options)})")
        elif key not in known and not any(name.startswith(key + ".") for name in known):
            raise unknown_key(key, value, known)


# ---------------------------------------------------------------------------------------------------- the checks
def plain(cfg) -> dict:
    """The config as plain, resolved Python values ("???" left for a missing mandatory value)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(cfg, dict):
        return cfg
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as err:
        raise UserError(f"the config cannot be resolved: {str(err).splitlines()[0]}") from None


def get(data: dict, key: str, default=None):
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return default
        data = data[part]
    return data


def check(cfg, app: str = "eep-search") -> dict:
    """Every key of ``cfg`` (an ``eep-search`` or ``eep-compare`` config) checked without loading the model; the
    plain, resolved values. Keys missing from an older saved config take their defaults where they are read."""
    data = plain(cfg)
    known = schema(compare="compare" in data or app == "eep-compare")
    for key, value in walk(data, known):
        raise unknown_key(key, value, known)
    for key, spec in known.items():
        value = get(data, key, spec)
        if value is spec:
            continue
        if value == "???":
            raise UserError(f"{key} is required (e.g. {key}=<value>)")
        spec.check(key, value)
    _check_model(data)
    _check_paths(data, app)
    _check_combinations(data)
    _check_names(data)
    return data


def _check_model(data: dict) -> None:
    import torch

    import eep.zoo

    name, path = get(data, "model.name"), get(data, "model.path")
    if path is None:
        if name is None:
            raise UserError("model.path=null with model.name=null: give model.path=<model folder or hub id>, or "
                            f"model.name=<a shipped model: {', '.join(eep.zoo.names())}>")
        if name not in eep.zoo.names():
            raise bad("model.name", name, f"not a shipped model (shipped: {', '.join(eep.zoo.names())}); give any "
                                          "other model as model.path=<folder or hub id>")
    else:
        model_location(path)
    dtype = getattr(torch, str(get(data, "model.dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise bad("model.dtype", get(data, "model.dtype"), "use float32, bfloat16 or float16")
    device = get(data, "model.device", "cpu")
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise bad("model.device", device, "use cpu, cuda, cuda:<n> or mps") from None
    if kind == "cuda" and not torch.cuda.is_available() and get(data, "evaluator.ray_address") is None:
        raise bad("model.device", device, "no CUDA device on this machine (torch.cuda.is_available() is false); "
                                          "use model.device=cpu (and model.dtype=float32)")
    device_map = get(data, "model.device_map")
    if device_map is not None and not isinstance(device_map, (str, dict)):
        raise bad("model.device_map", device_map, "use null, auto, balanced, sequential or a mapping")
    template = get(data, "evaluator.apply_chat_template", False)
    if not isinstance(template, (bool, str)):
        raise bad("evaluator.apply_chat_template", template, "use true, false or a chat template's name")


def model_location(path: str) -> str:
    """``model.path`` checked: an existing folder holding config.json, or a hub id in the local cache when eep runs
    offline (HF_HUB_OFFLINE=1)."""
    where = Path(str(path)).expanduser()
    if where.exists():
        if not where.is_dir():
            raise bad("model.path", path, "is a file; give the model's folder (holding config.json) or a hub id")
        if not (where / "config.json").is_file():
            raise bad("model.path", path, "the folder holds no config.json; give a saved model's folder "
                                          "(save_pretrained) or a hub id")
        return str(where)
    looks_local = where.is_absolute() or str(path).startswith((".", "~")) or str(path).count("/") > 1
    if looks_local:
        raise bad("model.path", path, "no such folder; give a model folder (holding config.json) or a hub id")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.errors import HFValidationError

        try:
            cached = try_to_load_from_cache(str(path), "config.json")
        except HFValidationError:
            raise bad("model.path", path, "neither a folder nor a valid hub id (org/name)") from None
        if not isinstance(cached, str):
            raise bad("model.path", path, "no such folder, and not in the local hub cache (eep runs offline, "
                                          "HF_HUB_OFFLINE=1); download it first or give its folder")
    return str(path)


def _check_paths(data: dict, app: str) -> None:
    include = get(data, "task.include_path")
    if include is not None and not Path(include).expanduser().is_dir():
        raise bad("task.include_path", include, "no such folder; give a folder of lm-eval task YAMLs")
    statistics = get(data, "statistics")
    if statistics is not None and not Path(statistics).expanduser().is_file():
        raise bad("statistics", statistics, "no such file; give the statistics.safetensors an eep-search run "
                                            "wrote in its folder, or null to calibrate")
    resume = get(data, "resume")
    if resume is not None:
        marker = COMPARE_CONFIG if app == "eep-compare" else SEARCH_CONFIG
        if not (Path(resume) / marker).is_file():
            raise bad("resume", resume, f"not an {app} run folder (no {marker}); give the folder the run printed "
                                        "when it started")


def _check_combinations(data: dict) -> None:
    kept, top_k = get(data, "search.num_experts"), get(data, "search.top_k")
    if top_k is not None and top_k > kept:
        raise bad("search.top_k", top_k, f"must be an integer between 1 and search.num_experts={kept}")
    methods = init_methods(data)
    if methods:
        from eep.methods import METHOD_INFO, method_names

        seedable = method_names(seedable=True)
        for method in methods:
            if method not in seedable:
                why = (f"{method} is a {METHOD_INFO[method].kind} method whose result is more than a genome"
                       if method in METHOD_INFO else f"{method} is not a method")
                raise bad("search.init_from", get(data, "search.init_from"),
                          f"use methods among {', '.join(seedable)} (methods whose result is a genome over the "
                          f"original weights alone; {why}), or [] for the random start")
    splits = {k: get(data, f"task.{k}") for k in ("search_split", "validation_split", "report_split")}
    named = [(k, v) for k, v in splits.items() if v is not None]
    for i, (k, v) in enumerate(named):
        for k2, v2 in named[i + 1:]:
            if v == v2:
                raise bad(f"task.{k2}", v2, f"task.{k} names the same split; each role needs its own documents")
    if get(data, "evaluator.workers", 1) > 1:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise bad("evaluator.workers", get(data, "evaluator.workers"),
                      "more than 1 worker needs Ray: pip install 'eep[ray]' (or evaluator.workers=1)") from None


def init_methods(data) -> list[str]:
    """``search.init_from`` as a list (a single name or null, as configs before eep 0.2 wrote it: [name] or [])."""
    value = get(data if isinstance(data, dict) else plain(data), "search.init_from")
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def check_optimizers(cfg) -> None:
    """``optimizer.prune_name`` and ``merge_name``: ``eep`` or a name of nevergrad's registry."""
    data = plain(cfg)
    import nevergrad as ng

    from eep.search.proposers import nevergrad_optimizer

    for key in ("prune_name", "merge_name"):
        name = get(data, f"optimizer.{key}")
        if name != "eep" and name not in ng.optimizers.registry:
            try:
                nevergrad_optimizer(name, ng.p.Scalar(), 1, 0)
            except ValueError as err:
                raise UserError(f"optimizer.{key}: {err}") from None


def _check_names(data: dict) -> None:
    from eep.evaluate.reference import manager_for

    check_optimizers(data)
    if "compare" in data:
        from eep.methods import METHODS

        valid = sorted({*METHODS, "eep"})
        for name in _as_list(get(data, "compare.methods")):
            if name not in valid:
                raise UserError(f"compare.methods: unknown method {name!r}; valid: {', '.join(valid)}")
        for name in get(data, "compare.options") or {}:
            if name not in valid:
                raise UserError(f"compare.options.{name}: unknown method {name!r}; valid: {', '.join(valid)}")
    names = _as_list(get(data, "task.names"))
    include = get(data, "task.include_path")
    try:
        manager = manager_for(names, (str(include),) if include else ())
    except ValueError as err:
        raise UserError(f"task.names={show(names)}: {err}") from None
    for key, weight in (get(data, "task.weights") or {}).items():
        task = str(key).split(",")[0]
        if task not in manager.all_tasks:
            raise UserError(f"task.weights.{key}: unknown lm-eval task {task!r}; name one of task.names "
                            f"({', '.join(names)}) or their subtasks, optionally as task,metric")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise bad(f"task.weights.{key}", weight, "must be a number >= 0")


def _as_list(value) -> list:
    return [] if value is None else [value] if isinstance(value, (str, int)) else list(value)


# ---------------------------------------------------------------------------------------------------- model shape
def check_settings(cfg, num_layers: int, num_experts: int, model_top_k: int) -> tuple[int, int, tuple]:
    """``(E', k', layer groups)`` from the search config against the model's shape, or a UserError naming the key
    and what is valid."""
    from eep.genome import depth_groups

    s = plain(cfg)["search"]
    kept = s["num_experts"]
    if isinstance(kept, bool) or not isinstance(kept, int) or not 1 <= kept <= num_experts:
        raise UserError(f"search.num_experts={kept!r}: must be an integer between 1 and the model's {num_experts} "
                        f"experts")
    top_k = min(model_top_k, kept) if s["top_k"] is None else s["top_k"]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= kept:
        raise UserError(f"search.top_k={s['top_k']!r}: must be an integer between 1 and search.num_experts={kept}")
    for key in ("prune_budget", "merge_budget", "final_candidates"):
        SEARCH[f"search.{key}"].check(f"search.{key}", s[key])
    groups = s["layer_groups"]
    if groups != "per_layer" and not (isinstance(groups, int) and 1 <= groups <= num_layers):
        raise UserError(f"search.layer_groups={groups!r}: use per_layer or a number of depth groups between 1 and "
                        f"{num_layers} (the model's MoE layers)")
    return kept, top_k, depth_groups(num_layers, None if groups == "per_layer" else groups)


def check_parallel(cfg) -> tuple[int, int]:
    """``(ask_batch, workers)`` from ``search.ask_batch`` (null: the worker count) and ``evaluator.workers``, and
    ``evaluator.threads`` checked; a UserError names the key."""
    data = plain(cfg)
    for key in ("evaluator.workers", "evaluator.threads", "search.ask_batch"):
        SEARCH[key].check(key, get(data, key))
    workers = get(data, "evaluator.workers")
    return get(data, "search.ask_batch") or workers, workers


@dataclass
class Shape:
    """What :func:`check_shape` returns: the adapter on the meta device, E', k' and the layer groups."""

    adapter: object
    num_experts: int
    top_k: int
    groups: tuple


def model_adapter(cfg):
    """The configured model's adapter on the meta device, from its config.json alone (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from eep.arch import adapter_for

    data = plain(cfg)
    path = get(data, "model.path")
    where = model_location(path) if path else None
    if where is None:
        import eep.zoo

        where = str(eep.zoo.path(get(data, "model.name")))
    key, value = ("model.path", path) if path else ("model.name", get(data, "model.name"))
    try:
        config = AutoConfig.from_pretrained(where)
    except (OSError, ValueError, KeyError) as err:
        raise bad(key, value, f"its config.json cannot be read: {str(err).splitlines()[0]}") from None
    try:
        with torch.device("meta"):
            return adapter_for(AutoModelForCausalLM.from_config(config))
    except ValueError as err:
        raise bad(key, value, str(err).splitlines()[0]) from None


def check_shape(cfg, num_experts: int | None = None) -> Shape:
    """The counts of ``cfg`` (with ``search.num_experts=num_experts`` if given) against the model's shape, read
    from its config.json: E' <= E, k', layer groups, ``search.init_from`` per layer, and the family's own
    constraints on a genome of that shape (DeepSeek-V3: the same count kept in every expert group)."""
    from eep.genome import Genome, GenomeError

    data = plain(cfg)
    if num_experts is not None:
        data = {**data, "search": {**data["search"], "num_experts": num_experts}}
    adapter = model_adapter(data)
    layers = len(adapter.layers)
    kept, top_k, groups = check_settings(data, layers, adapter.num_experts, adapter.top_k)
    from eep.methods import METHOD_INFO

    merging = [m for m in init_methods(data) if METHOD_INFO[m].kind == "merging"]
    if merging and len(groups) != layers:
        raise UserError(f"search.init_from: {merging[0]} gives a merging genome per layer, which has no "
                        f"depth-group form: use it with search.layer_groups=per_layer (not "
                        f"{get(data, 'search.layer_groups')}), or leave it out (pruning statistics are mapped to "
                        f"the groups)")
    n_group = adapter.expert_groups
    per_group, take = adapter.num_experts // n_group, -(-kept // n_group)
    spread = [g * per_group + i for i in range(take) for g in range(n_group)][:kept]  # balanced over groups
    try:
        adapter.validate(Genome.pruning([sorted(spread)] * len(groups), adapter.num_experts, top_k, groups))
    except (GenomeError, ValueError) as err:
        raise UserError(f"search.num_experts={kept} with top_k={top_k} does not fit this {adapter.name()} model: "
                        f"{err}") from None
    return Shape(adapter, kept, top_k, groups)
