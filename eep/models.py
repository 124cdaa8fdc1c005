"""Load the model a ``model`` config names: a shipped zoo model, a local folder or a hub id."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import eep


@dataclass
class ModelConfig:
    """What ``conf/model/*.yaml`` holds."""

    name: str | None = None
    path: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    device_map: str | None = None
    trust_remote_code: bool = False   # run the checkpoint's own modeling code (a model the hub ships as code)

    def location(self) -> str:
        """The folder or hub id to load: ``path`` if set, else the shipped model ``name``."""
        if self.path:
            return str(self.path)
        if not self.name:
            raise ValueError("model config needs `model.name` (a shipped model) or `model.path` (a folder or hub id)")
        import eep.zoo

        return str(eep.zoo.path(self.name))


def model_config(name: str) -> ModelConfig:
    """The shipped config group entry ``conf/model/<name>.yaml`` as a :class:`ModelConfig`."""
    from omegaconf import OmegaConf

    folder = eep.conf_dir() / "model"
    file = folder / f"{name}.yaml"
    if not file.is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ValueError(f"unknown model config {name!r}; known: {', '.join(known)} "
                         f"(or give any model folder or hub id as model.path)")
    return ModelConfig(**OmegaConf.to_container(OmegaConf.load(file)))


def load_model(cfg: ModelConfig):
    """``(model, tokenizer)`` loaded with plain transformers in ``cfg.dtype`` on ``cfg.device`` (or ``device_map``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, cfg.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"model.dtype={cfg.dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
    where = cfg.location()
    if not Path(where).exists() and Path(where).is_absolute():
        raise FileNotFoundError(f"model.path={where!r} does not exist")
    kwargs = {"device_map": cfg.device_map} if cfg.device_map else {}
    remote = {"trust_remote_code": True} if cfg.trust_remote_code else {}
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs, **remote)
    if not cfg.device_map:
        model = model.to(cfg.device)
    return model.eval(), AutoTokenizer.from_pretrained(where, **remote)
