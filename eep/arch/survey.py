"""Every MoE family of the tested transformers, in one list, and a scan of the installed transformers for them.

A family is a model type whose ``AutoModelForCausalLM`` class has routed experts; model types that share one
modeling file's causal-LM class (``llama4`` and ``llama4_text``, ``sarvam_moe`` on GLM-4-MoE) are aliases of one
family. Vision-language and omni models count only where their text model has its own causal-LM class.
"""
from __future__ import annotations

import re
from pathlib import Path

# model type -> the family it is an alias of (None: its own family); kept in sync with the installed transformers
# by tests/test_architectures.py (a new MoE model type of transformers fails it until it is listed here)
MOE_MODEL_TYPES: dict[str, str | None] = {
    "afmoe": None, "aria_text": None, "axk1": None, "axk2": None, "bailing_hybrid": None, "beam": None,
    "cohere2_moe": None, "dbrx": None, "deepseek_v2": None, "deepseek_v3": None, "sarvam_mla": "deepseek_v3",
    "deepseek_v32": None, "deepseek_v4": None, "doge": None, "dots1": None, "dots3_note": "dots3_note_text",
    "dots3_note_text": None, "ernie4_5_moe": None, "exaone_moe": None, "flex_olmo": None, "flint": None,
    "gemma4": "gemma4_text", "gemma4_text": None, "glm4_moe": None, "sarvam_moe": "glm4_moe", "glm4_moe_lite": None,
    "glm_moe_dsa": None, "gpt_oss": None, "granitemoe": None, "granitemoe_swa": None, "granitemoehybrid": None,
    "granitemoeshared": None, "hunyuan_v1_moe": None, "hy_v3": None, "hy_v4": None, "inkling_text": None,
    "inkling2_text": None, "inkling2_loop_text": None, "jamba": None, "jetmoe": None, "kimi_linear": None,
    "kolibri1": None, "laguna": None, "lara_mini": None, "lfm2_moe": None, "llama4": "llama4_text",
    "llama4_text": None, "longcat_flash": None, "mellum": None, "mimo_v2_flash": None, "minimax": None,
    "minimax_m2": None, "minimax_m3_vl_text": None, "mixtral": None, "nemotron_h": None, "olmoe": None,
    "phimoe": None, "qwen2_moe": None, "qwen3_5_moe": "qwen3_5_moe_text", "qwen3_5_moe_text": None, "qwen3_moe": None,
    "qwen3_next": None, "qwen4_exp": "qwen4_exp_text", "qwen4_exp_text": None, "solar_open": None, "zaya": None,
}

# what marks a modeling file as MoE: a fused experts module, a sparse MoE block or a top-k router
_MARKERS = re.compile(r"class \w*(Experts|SparseMoe\w*|MoE|Moe|TopKRouter|TopkRouter|TopKGating)\(")


def families() -> list[str]:
    """The model types that are families of their own (aliases left out), sorted."""
    return sorted(t for t, alias in MOE_MODEL_TYPES.items() if alias is None)


def _is_moe_type(config_class) -> bool:
    """Whether a model type's config (or a sub-config: text, FFN) declares routed experts (an expert count or
    top-k attribute or alias)."""
    names = set(vars(config_class)) | set(getattr(config_class, "__annotations__", {}))
    names |= set(getattr(config_class, "attribute_map", {}))
    if names & {"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok",
                "moe_topk", "top_k_experts", "enable_moe_block"}:
        return True
    return any(_is_moe_type(sub) for sub in (getattr(config_class, "sub_configs", None) or {}).values()
               if isinstance(sub, type))


def scan_installed() -> dict[str, str]:
    """``{model type: causal-LM class}`` of every model type of the installed transformers whose causal-LM
    modeling file defines experts or a router and whose config declares experts."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    sources = {}   # causal-LM class name -> source of the modeling file that defines it
    for path in (Path(transformers.__file__).parent / "models").glob("*/modeling_*.py"):
        text = path.read_text(encoding="utf-8")
        for name in re.findall(r"^class (\w+ForCausalLM)\(", text, flags=re.M):
            sources[name] = text
    found = {}
    for model_type, class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        if class_name not in sources or model_type not in CONFIG_MAPPING:
            continue
        if _MARKERS.search(sources[class_name]) and _is_moe_type(CONFIG_MAPPING[model_type]):
            found[model_type] = class_name
    return found
