"""Architecture adapters: one per MoE family, found by ``config.model_type``; refused families with their reason."""
from eep.arch.base import MoEAdapter, MoELayer
from eep.arch.registry import ADAPTERS, REFUSED, adapter_for, refuse, register, supported
from eep.arch import families  # noqa: F401  (registers the built-in adapters and refusals)

__all__ = ["ADAPTERS", "MoEAdapter", "MoELayer", "REFUSED", "adapter_for", "refuse", "register", "supported"]
