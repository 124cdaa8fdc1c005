"""The registry of architecture adapters, keyed by ``config.model_type``, and of the families eep refuses."""
from __future__ import annotations

from torch import nn

ADAPTERS: dict[str, type] = {}
REFUSED: dict[str, str] = {}    # model type -> why eep cannot prune it exactly


def register(cls: type) -> type:
    """Class decorator: register ``cls`` for each of its ``model_types``; a name registered twice is an error."""
    for model_type in cls.model_types:
        _check_new(model_type)
        ADAPTERS[model_type] = cls
    return cls


def refuse(reason: str, *model_types: str) -> None:
    """Record ``model_types`` as MoE families eep refuses, with the ``reason`` shown at load and in the table."""
    for model_type in model_types:
        _check_new(model_type)
        REFUSED[model_type] = reason


def _check_new(model_type: str) -> None:
    if model_type in ADAPTERS or model_type in REFUSED:
        owner = ADAPTERS[model_type].__name__ if model_type in ADAPTERS else "a refusal"
        raise ValueError(f"model type {model_type!r} already has {owner}")


def supported() -> list[str]:
    return sorted(ADAPTERS)


def quantization_method(model: nn.Module) -> str | None:
    """The ``quant_method`` of a model loaded with a ``quantization_config`` that it still carries (a model
    dequantized at load carries none), else None."""
    config = getattr(model.config, "quantization_config", None)
    if config is None:
        return None
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    return str(getattr(method, "value", method) or "unknown")


def adapter_for(model: nn.Module):
    """The adapter instance for a loaded model, or a ValueError that gives the refusal's reason or names the
    supported model types."""
    model_type = getattr(model.config, "model_type", None)
    quantized = quantization_method(model)
    if quantized is not None:
        raise ValueError(f"eep refuses quantised checkpoints ({model_type}, quant_method {quantized!r}): it slices and "
                         f"merges float expert tensors, and a quantised model keeps them packed with scales an export "
                         f"would not carry; load a float/bf16 release, or dequantize at load (transformers: "
                         f"from_pretrained(..., quantization_config=<its config class>(dequantize=True)))")
    if model_type in REFUSED:
        raise ValueError(f"eep refuses MoE architecture {model_type!r} ({type(model).__name__}): "
                         f"{REFUSED[model_type]}")
    if model_type not in ADAPTERS:
        raise ValueError(f"unsupported MoE architecture {model_type!r} ({type(model).__name__}); eep supports "
                         f"model types: {', '.join(supported())}")
    return ADAPTERS[model_type](model)
