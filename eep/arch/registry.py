"""The registry of architecture adapters, keyed by ``config.model_type``."""
from __future__ import annotations

from torch import nn

ADAPTERS: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: register ``cls`` for each of its ``model_types``; a name registered twice is an error."""
    for model_type in cls.model_types:
        if model_type in ADAPTERS:
            raise ValueError(f"model type {model_type!r} already has adapter {ADAPTERS[model_type].__name__}")
        ADAPTERS[model_type] = cls
    return cls


def supported() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(model: nn.Module):
    """The adapter instance for a loaded model, or a ValueError that names the supported model types."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(f"unsupported MoE architecture {model_type!r} ({type(model).__name__}); eep supports "
                         f"model types: {', '.join(supported())}")
    return ADAPTERS[model_type](model)
