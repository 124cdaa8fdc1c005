"""``search.fitness=match+likelihood``: exact match and likelihood read off one teacher-forced forward, against
generation's exact match and the two-pass ``task+likelihood`` it replaces; ``auto`` and the refusals."""
import random

import pytest
import torch
from conftest import compose_config
from transformers import AutoModelForCausalLM, AutoTokenizer

import eep.zoo
from eep.app.session import fitness_kind
from eep.errors import UserError
from eep.evaluate.dense import BLEND_WEIGHT, MATCH, DenseFitness, match_refusal
from eep.evaluate.evaluator import Evaluator
from eep.genome import Genome
from eep.materialize import Materializer

SKILLS = ["skills_add", "skills_reverse", "skills_sort", "skills_copy", "skills_lookup", "skills_count"]


@pytest.mark.parametrize("zoo, experts", [("skills-mixtral", 8), ("skills-olmoe", 32)])
def test_forced_exact_match_is_generations_and_the_fitness_is_task_plus_likelihoods(zoo, experts):
    """Per task, the forced exact match equals generation's on the full model and on random pruned candidates
    (up to one document of 40 per task: a near-tie of two logits can make greedy decoding with its KV cache and the
    single forward's argmax differ; bench/match_fitness.py found no such document in 3 models x 21 candidates x 600
    documents, docs/results.md); the likelihood is the likelihood fitness's; one forward's tokens, under half of
    generation plus that forward."""
    folder = eep.zoo.path(zoo)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ev = Evaluator(model, AutoTokenizer.from_pretrained(folder), SKILLS, role="search", limit=40, batch_size=32)
    match, likelihood = DenseFitness(ev, MATCH), DenseFitness(ev, "likelihood")
    mat, rng, layers = Materializer(model), random.Random(0), len(model.model.layers)
    for step in range(5):
        if step:
            k = rng.choice([experts // 2, experts - 2, experts - 1])
            mat.apply(Genome.pruning([sorted(rng.sample(range(experts), k)) for _ in range(layers)], experts, 2))
        forced, task, lik = match.evaluate(), ev.evaluate(), likelihood.evaluate()
        assert forced.error is None and task.error is None
        for name in SKILLS:
            em = forced.metrics[name]["exact_match_forced"]
            assert em == pytest.approx(task.metrics[name]["exact_match"], abs=1 / 40 + 1e-9), (step, name)
            assert forced.metrics[name]["likelihood"] == pytest.approx(lik.metrics[name]["likelihood"], abs=1e-9)
        weights = 1 / len(SKILLS)
        assert forced.fitness == pytest.approx(sum(weights * (m["exact_match_forced"] + BLEND_WEIGHT * m["likelihood"])
                                                   for m in forced.metrics.values()), abs=1e-12)
        assert forced.forward_tokens == lik.forward_tokens < (task.forward_tokens + lik.forward_tokens) / 2
    mat.restore()
    assert ev.evaluate().fitness > 0.9


def test_match_refuses_what_it_cannot_score_and_auto_falls_back_to_task_likelihood():
    """A multiple-choice task is scored by loglikelihood, not generation: match+likelihood names it and the fix;
    ``auto`` is match+likelihood on a generation task and task+likelihood on it."""
    folder = eep.zoo.path("skills-mixtral")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    mc = Evaluator(model, tok, ["skills_count_mc"], role="search", limit=8, batch_size=8)
    gen = Evaluator(model, tok, ["skills_sort"], role="search", limit=8, batch_size=8)
    assert "skills_count_mc is scored by loglikelihood" in match_refusal(mc) and match_refusal(gen) is None
    with pytest.raises(UserError, match=r"search.fitness=match\+likelihood: skills_count_mc is scored by "
                                        r"loglikelihood, not generation; use task\+likelihood"):
        DenseFitness(mc, MATCH)
    cfg = compose_config("eep_search", ["model=skills_mixtral", "task=skills_sort"])
    assert cfg.search.fitness == "auto"
    assert fitness_kind(cfg, gen) == MATCH and fitness_kind(cfg, mc) == "task+likelihood"
