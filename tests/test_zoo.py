"""The shipped trained models: plain transformers loading, sizes, accuracy through lm-eval, reproducible training."""
import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import eep.zoo
from eep.evaluate.reference import simple_scores
from eep.zoo.train import RECIPES, Recipe, train, with_overrides

EXPECTED = {  # name: (class, min experts, min top-k, skill checked through lm-eval)
    "skills-mixtral": ("MixtralForCausalLM", 8, 2, "skills_add"),
    "skills-olmoe": ("OlmoeForCausalLM", 32, 4, "skills_count"),
}


@pytest.fixture(scope="module", params=eep.zoo.names())
def shipped(request):
    folder = eep.zoo.path(request.param)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return request.param, model, AutoTokenizer.from_pretrained(folder)


def test_unknown_model_lists_the_shipped_ones():
    with pytest.raises(ValueError, match="skills-mixtral, skills-olmoe"):
        eep.zoo.path("skills-llama")


def test_loads_with_plain_transformers_in_the_promised_shape(shipped):
    name, model, _ = shipped
    cls, experts, top_k, _ = EXPECTED[name]
    cfg = model.config
    assert type(model).__name__ == cls
    assert (getattr(cfg, "num_local_experts", None) or cfg.num_experts) >= experts
    assert cfg.num_experts_per_tok >= top_k and cfg.num_hidden_layers >= 4
    for file in eep.zoo.path(name).iterdir():
        assert file.stat().st_size <= 15 * 2**20, f"{file} is over 15 MB"
    assert (eep.zoo.path(name) / "README.md").is_file()


def test_skill_accuracy_through_lm_eval(shipped):
    """One generation skill and one multiple-choice task on a 50-doc slice of the test split."""
    name, model, tok = shipped
    task = EXPECTED[name][3]
    scores = simple_scores(model, tok, [task, "skills_add_mc"], limit=50, batch_size=50)
    assert scores[task]["exact_match"] >= 0.9, scores
    assert scores["skills_add_mc"]["acc"] >= 0.9, scores


@pytest.mark.parametrize("name", eep.zoo.names())
def test_training_reproduces_the_shipped_loss_curve(name):
    """The first 100 steps of the recorded training command give the same losses (same seed and thread count)."""
    log = json.loads((eep.zoo.path(name) / "training_log.json").read_text())
    recipe = Recipe(**log["recipe"])
    words = log["command"].split()
    assert words[:4] == ["python", "-m", "eep.zoo.train", name]
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    assert with_overrides(RECIPES[name], sets) == recipe  # the committed recipe and command are what was run
    rerun = train(name, replace(recipe, steps=100), None, log["threads"], check_every=0, quiet=True)
    assert rerun["loss_curve"] == log["loss_curve"][:2]
