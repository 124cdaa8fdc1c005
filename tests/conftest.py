"""Shared test set-up: offline hub access, single-threaded torch for repeatable numbers."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import (AutoModelForCausalLM, DeepseekV3Config, GraniteMoeConfig, MixtralConfig, OlmoeConfig,
                          Qwen2MoeConfig, Qwen3MoeConfig)

_COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=64, initializer_range=0.2, num_experts_per_tok=2,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)

# one tiny config per supported family; dense layers included where the family has them
TINY_CONFIGS = {
    "mixtral": lambda: MixtralConfig(**_COMMON, intermediate_size=16, num_local_experts=8),
    "qwen2_moe": lambda: Qwen2MoeConfig(**_COMMON, intermediate_size=24, moe_intermediate_size=16, num_experts=8,
                                        shared_expert_intermediate_size=24, mlp_only_layers=[1]),
    "qwen3_moe": lambda: Qwen3MoeConfig(**_COMMON, intermediate_size=24, moe_intermediate_size=16, num_experts=8,
                                        norm_topk_prob=True, head_dim=8),
    "olmoe": lambda: OlmoeConfig(**_COMMON, intermediate_size=16, num_experts=8),
    "deepseek_v3": lambda: DeepseekV3Config(**_COMMON, intermediate_size=24, moe_intermediate_size=16,
                                            n_routed_experts=8, n_group=2, topk_group=1, first_k_dense_replace=1,
                                            n_shared_experts=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
                                            qk_nope_head_dim=4, v_head_dim=8, routed_scaling_factor=2.5,
                                            norm_topk_prob=True),
    "granitemoe": lambda: GraniteMoeConfig(**_COMMON, intermediate_size=16, num_local_experts=8),
}


def build_tiny(family: str, seed: int = 0, **overrides):
    """A seeded random float32 model of ``family`` (eval mode, eager experts for exact comparisons)."""
    config = TINY_CONFIGS[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # non-zero router biases so that pruning must slice them
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.1)
    return model


@pytest.fixture(params=sorted(TINY_CONFIGS))
def family(request):
    return request.param


@pytest.fixture
def tokens():
    torch.manual_seed(123)
    return torch.randint(0, 64, (3, 11))


def compose_config(config_name: str, overrides: list[str]):
    """An app's config (``eep_search``, ``eep_compare``) composed from the shipped conf/ with ``overrides``."""
    from hydra import compose, initialize_config_dir

    import eep

    with initialize_config_dir(version_base="1.3", config_dir=str(eep.conf_dir())):
        return compose(config_name=config_name, overrides=overrides)
