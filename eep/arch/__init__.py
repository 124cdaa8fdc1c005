"""Architecture adapters: one per MoE family, found by ``config.model_type``."""
from eep.arch.base import MoEAdapter, MoELayer
from eep.arch.registry import ADAPTERS, adapter_for, register, supported
from eep.arch import families  # noqa: F401  (registers the built-in adapters)

__all__ = ["ADAPTERS", "MoEAdapter", "MoELayer", "adapter_for", "register", "supported"]
