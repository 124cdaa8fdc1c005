"""Every MoE family of the installed transformers: listed, supported exactly or refused with its reason.

Supported families: a tiny random model per family pruned 8 -> 4 in place equals its export reloaded by plain
``from_pretrained`` (float32, 1e-5), at the family's k and at k' = 1; merging runs where the family allows it; every
one-shot method runs or refuses with a reason. Routing settings of released checkpoints at tiny width too.
"""
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import compose_config

from eep.arch import ADAPTERS, REFUSED, adapter_for
from eep.arch.conformance import (BEGIN, END, build_tiny, check_family, check_methods, exported_diff, kept_subsets,
                                  logits_of, render, sample_batch, tiny_config)
from eep.arch.survey import MOE_MODEL_TYPES, families, scan_installed
from eep.genome import Genome
from eep.materialize import Materializer

SUPPORTED = [f for f in families() if f in ADAPTERS]
TABLE = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one torch thread is much faster than two on a busy 2-core machine."""
    from transformers.utils import logging as hf_logging

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    yield
    torch.set_num_threads(threads)
    hf_logging.enable_progress_bar()


def test_every_moe_family_of_the_installed_transformers_is_listed_and_decided():
    installed = scan_installed()
    missing = sorted(set(installed) - set(MOE_MODEL_TYPES))
    assert not missing, f"MoE model types of transformers missing from eep.arch.survey.MOE_MODEL_TYPES: {missing}"
    undecided = sorted(t for t in MOE_MODEL_TYPES if t not in ADAPTERS and t not in REFUSED)
    assert not undecided, f"listed MoE model types neither supported nor refused: {undecided}"
    assert all(MOE_MODEL_TYPES[a] is None for a in MOE_MODEL_TYPES.values() if a is not None)  # aliases of families
    assert len(SUPPORTED) >= 20


def test_the_generated_table_has_every_family_and_this_transformers():
    import transformers

    text = TABLE.read_text()
    assert "eep-zoo archs" in text and f"transformers {transformers.__version__}" in text
    table = text.split(BEGIN, 1)[1].split(END, 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \|[^|]*\|[^|]*\| (\w+) \|", table, flags=re.M))
    assert sorted(rows) == families(), "docs/architectures.md is out of date: run eep-zoo archs"
    assert all(rows[f] == ("refused" if f in REFUSED else "exact") for f in rows)


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_refused_families_raise_their_reason(model_type):
    model = SimpleNamespace(config=SimpleNamespace(model_type=model_type))
    with pytest.raises(ValueError, match=re.escape(REFUSED[model_type])):
        adapter_for(model)
    assert render([check_family(model_type)]).count(REFUSED[model_type]) == 1


def test_a_structure_that_does_not_fit_the_adapter_is_refused_at_load():
    model = build_tiny("mixtral")
    model.config.num_local_experts = 6        # the router and experts hold 8
    with pytest.raises(ValueError, match=r"router tensor `weight` of layer 0 has shape \(8, 32\), not 6 experts"):
        adapter_for(model)
    model.config.num_local_experts = 8
    del model.model.layers[0].mlp.experts.down_proj
    with pytest.raises(ValueError, match="MoE layer 0 has no experts tensor `down_proj`"):
        adapter_for(model)


@pytest.mark.parametrize("family", SUPPORTED)
def test_pruning_in_place_equals_the_reloaded_export(family):
    """8 -> 4 at k and k' = 1 (check_family); the candidate differs from the full model; merging runs (and its
    gate-rows form exports exactly, part of status "exact") or the family refuses it."""
    row = check_family(family, methods=False)
    assert row.status == "exact", row.reason or (row.max_diff, row.top_k_diff)
    model = build_tiny(family)
    mat = Materializer(model)
    batch = sample_batch()
    full = logits_of(model, batch)
    with mat.applied(Genome.pruning(kept_subsets(mat.adapter, 4), 8, mat.adapter.top_k)):
        assert not torch.allclose(logits_of(model, batch), full, atol=1e-4)
    assert torch.equal(logits_of(model, batch), full)
    assert row.merging == ("runs" if mat.adapter.supports_merging else "refused")
    assert (row.gate_rows_diff is not None) == mat.adapter.supports_merging   # <= 1e-5: part of status "exact"
    assert (row.top_k_diff is None) == (not mat.adapter.supports_top_k_change)


RELEASED = {   # routing settings of released checkpoints at tiny width: family, E, k, other settings, E'
    "qwen3-30b-a3b": ("qwen3_moe", 128, 8, dict(norm_topk_prob=True), 64),
    "deepseek-v3": ("deepseek_v3", 256, 8, dict(n_group=8, topk_group=4, norm_topk_prob=True), 128),
    "gpt-oss-20b": ("gpt_oss", 32, 4, dict(layer_types=["sliding_attention", "full_attention"]), 16),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_routing_settings_prune_exactly(name):
    family, num_experts, top_k, settings, num_kept = RELEASED[name]
    config = tiny_config(family, num_experts, top_k, num_hidden_layers=2, **settings)
    model = build_tiny(family, config=config)
    mat = Materializer(model)
    assert (mat.adapter.num_experts, mat.adapter.top_k) == (num_experts, top_k)
    genome = Genome.pruning(kept_subsets(mat.adapter, num_kept), num_experts, top_k)
    assert exported_diff(model, mat, genome, sample_batch()) <= 1e-5


@pytest.mark.parametrize("family", SUPPORTED)
def test_one_shot_methods_run_or_refuse_with_a_reason(family):
    model = build_tiny(family)
    mat = Materializer(model)
    outcomes = check_methods(model, mat, sample_batch(), 4, mat.adapter.top_k)
    failed = {m: v for m, v in outcomes.items() if v != "ok" and not v.startswith("refused: ")}
    assert not failed
    assert outcomes["random"] == "ok"
    statistics = ("frequency", "soft_activation", "reap")
    if mat.adapter.block_input_routes:
        assert all(outcomes[m] == "ok" for m in statistics)
    else:   # the router and experts read other tensors than the block's input (Gemma-4)
        assert all("do not read the MoE block's input" in outcomes[m] for m in statistics)
    if mat.adapter.supports_merging:
        assert outcomes["hc_smoe"] == "ok"


def test_ci_installs_the_transformers_the_table_was_made_with():
    root = TABLE.parents[1]
    pins = dict(re.findall(r"^([\w-]+)==([\w.]+)$", (root / "constraints-ci.txt").read_text(), flags=re.M))
    assert f"transformers {pins['transformers']} " in TABLE.read_text()
    assert "-c constraints-ci.txt" in (root / ".ci" / "run").read_text()
    assert '"transformers>=5.17,<6"' in (root / "pyproject.toml").read_text()


E2E = ["gpt_oss", "glm4_moe", "jamba"]   # transposed biased experts; sigmoid + bias; hybrid Mamba


def saved_tiny(family: str, folder: Path) -> Path:
    """A tiny random model of ``family`` with the shipped skills tokenizer (50 tokens, pad 0, eos 1) in ``folder``."""
    from transformers import AutoTokenizer

    import eep.zoo

    model = build_tiny(family, eos_token_id=1, bos_token_id=None)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(eep.zoo.path("skills-olmoe")).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", E2E)
def test_eep_search_runs_end_to_end_on_a_new_family(tmp_path, family):
    """``eep-search model.path=<folder>`` in process: a pruning search, its exact export, reload and report."""
    from eep.app import search as app

    folder = saved_tiny(family, tmp_path / "model")
    run_dir = tmp_path / "run"
    report = app.run(compose_config("eep_search", [
        f"model.path={folder}", f"model.name=tiny-{family}", "task=skills_count", "search.num_experts=4",
        "search.prune_budget=3", "search.merge_budget=0", "search.eep.population=2", "evaluator.limit=8",
        "evaluator.validation_limit=8", "evaluator.test_limit=8", "search.final_candidates=1"]), run_dir)
    assert report["experts"] == {"before": 8, "after": 4}
    assert (run_dir / "model" / "config.json").is_file() and (run_dir / "report.md").is_file()
    assert report["export"]["exact"] and report["test"]["best_in_place"] == report["test"]["best_exported"]


def test_a_model_still_carrying_a_quantization_config_is_refused_with_the_fix():
    model = build_tiny("mixtral")
    model.config.quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    with pytest.raises(ValueError, match=r"refuses quantised checkpoints \(mixtral, quant_method 'fp8'\).*"
                                         r"dequantize=True"):
        adapter_for(model)
    del model.config.quantization_config   # dequantized at load: float weights, a config without it
    assert adapter_for(model).num_experts == 8


REMOTE_CODE = '''
from transformers import MixtralConfig, MixtralForCausalLM


class {name}Config(MixtralConfig):
    model_type = "{model_type}"


class {name}ForCausalLM(MixtralForCausalLM):
    config_class = {name}Config
'''


@pytest.mark.parametrize("model_type", ["mixtral", "remote_moe"])
def test_a_trust_remote_code_checkpoint_is_supported_by_its_structure_or_refused_by_name(tmp_path, model_type):
    """A hub-style remote-code checkpoint (``auto_map`` to modeling code in its folder), loaded through eep's loader
    with ``model.trust_remote_code=true``: a model type eep knows, with the adapter's structure, prunes exactly; an
    unknown one is refused by name."""
    import json

    from eep.models import ModelConfig, load_model

    folder = saved_tiny("mixtral", tmp_path / "model")
    (folder / "modeling_remote.py").write_text(REMOTE_CODE.format(name="Remote", model_type=model_type))
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "modeling_remote.RemoteConfig",
                                                   "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    model, _ = load_model(ModelConfig(path=str(folder), trust_remote_code=True))
    assert type(model).__name__ == "RemoteForCausalLM"
    if model_type == "remote_moe":
        with pytest.raises(ValueError, match="unsupported MoE architecture 'remote_moe' \\(RemoteForCausalLM\\)"):
            adapter_for(model)
        return
    mat = Materializer(model)
    genome = Genome.pruning(kept_subsets(mat.adapter, 4), 8, 2)
    assert exported_diff(model, mat, genome, sample_batch()) <= 1e-5
