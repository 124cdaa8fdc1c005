"""eep.methods: each method's defining property on constructed cases, every family, bit-exact restore, export."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import eep.zoo
from conftest import build_tiny
from eep.genome import Genome
from eep.materialize import Materializer
from eep.methods import (METHOD_INFO, METHODS, MethodError, applied, calibration_batch, compute, export_result,
                         method_names, register)
from eep.methods.merging import align_permutation, alignment_rewrite, permute_expert
from eep.methods.result import ExpertRewrite
from eep.methods.skipping import skip_weights
from eep.methods.statistics import expert_outputs

PRUNING = ("random", "frequency", "soft_activation", "reap", "enumeration", "enumeration_progressive", "skipping")
MERGING = ("m_smoe", "hc_smoe", "svd_compress")
PREFERRED = [1, 3, 4, 6]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one torch thread is tens of times faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch(rows=4, cols=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, 64, (rows, cols), generator=gen),
            "attention_mask": torch.ones(rows, cols, dtype=torch.long)}


def logits(model, cal):
    with torch.no_grad():
        return model(**cal).logits


def preferring_model(preferred=PREFERRED):
    """Tiny top-4 Mixtral whose every router sends every token to the 4 ``preferred`` experts: a large constant
    residual dimension 0 (embeddings) meets router rows +5 (preferred) or -5 (the others) there."""
    model = build_tiny("mixtral", num_experts_per_tok=4)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 20.0
        for layer in Materializer(model).layers:
            sign = -torch.ones(layer.router.weight.shape[0])
            sign[preferred] = 1.0
            layer.router.weight[:, 0] = 5.0 * sign
    return model


def test_registry_names_duplicates_and_unknown_names():
    assert sorted(METHODS) == sorted(PRUNING + MERGING)
    with pytest.raises(ValueError, match="already registered"):
        register("random", kind="baseline", seedable=True)(lambda *a, **k: None)
    with pytest.raises(ValueError, match="kind 'pruning' is not one of baseline, statistic"):
        register("magnitude", kind="pruning", seedable=True)
    model = build_tiny("mixtral")
    with pytest.raises(MethodError, match="valid methods: enumeration, enumeration_progressive, frequency"):
        compute("magnitude", model, None, batch(), num_kept=4, top_k=2)
    with pytest.raises(MethodError, match="top_k=5"):
        compute("random", model, None, None, num_kept=4, top_k=5)


def test_the_registry_metadata_is_what_the_apps_list():
    """eep-compare's default list and search.init_from's choices come from the registry's metadata: listing order
    by kind, seedable = a genome over the original weights alone (no rewrite, no routing patch)."""
    from eep.app.compare import all_methods

    assert all_methods() == [*PRUNING[:6], "skipping", *MERGING, "eep"]
    assert method_names(seedable=True) == [*PRUNING[:6], "hc_smoe"]
    assert [n for n in METHODS if not METHOD_INFO[n].needs_calibration] == ["random"]
    model = build_tiny("mixtral")
    for name in ("m_smoe", "skipping", "svd_compress", "hc_smoe", "reap"):
        options = {"rank": 2} if name == "svd_compress" else {}
        result = compute(name, model, None, batch(), num_kept=4, top_k=2, **options)
        has_extra = result.rewrite is not None or bool(result.routing)
        assert METHOD_INFO[name].seedable == (not has_extra), name


@pytest.mark.parametrize("name", ["frequency", "soft_activation", "reap", "enumeration", "enumeration_progressive"])
def test_statistic_methods_keep_the_experts_a_router_prefers(name):
    model = preferring_model()
    result = compute(name, model, None, batch(), num_kept=4, top_k=4)
    assert [result.genome.kept(i) for i in range(3)] == [PREFERRED] * 3


def test_reap_keeps_the_experts_with_the_largest_routed_outputs():
    model = build_tiny("mixtral", seed=3)
    loud = [0, 2, 5, 7]
    mat = Materializer(model)
    with torch.no_grad():
        for layer in mat.layers:
            layer.experts.down_proj[loud] *= 100.0
    reap = compute("reap", model, mat, batch(8), num_kept=4, top_k=2)
    assert [reap.genome.kept(i) for i in range(3)] == [loud] * 3
    assert all(min(s[e] for e in loud) > max(s[e] for e in range(8) if e not in loud) for s in reap.info["scores"])


def test_random_is_seeded_and_valid():
    model = build_tiny("mixtral")
    a, b, c = (compute("random", model, None, None, num_kept=3, top_k=2, seed=s) for s in (0, 0, 1))
    assert a.genome == b.genome and a.genome != c.genome
    assert a.genome.is_pruning and a.genome.num_kept == 3 and a.info["seed"] == 0


def test_enumeration_fallbacks_are_used_and_recorded():
    model = preferring_model()
    greedy = compute("enumeration", model, None, batch(), num_kept=4, top_k=4, max_subsets=10)
    assert greedy.info["search"] == ["greedy"] * 3 and [greedy.genome.kept(i) for i in range(3)] == [PREFERRED] * 3
    assert greedy.info["subsets_scored"] == [8 + 7 + 6 + 5] * 3
    exhaustive = compute("enumeration", model, None, batch(), num_kept=4, top_k=4)
    assert exhaustive.info["search"] == ["exhaustive"] * 3 and exhaustive.info["subsets_scored"] == [70] * 3
    sample = compute("enumeration", model, None, batch(), num_kept=4, top_k=4, max_subsets=10, fallback="sample")
    assert sample.info["search"] == ["sample"] * 3 and max(sample.info["subsets_scored"]) <= 10
    deepseek = build_tiny("deepseek_v3")
    with pytest.raises(MethodError, match="fallback='sample'"):
        compute("enumeration", deepseek, None, batch(), num_kept=4, top_k=2, max_subsets=10)


def test_permutation_alignment_recovers_a_permuted_copy_and_preserves_function():
    model = build_tiny("mixtral")
    mat = Materializer(model)
    layer = mat.layers[0]
    gate_up, down = layer.experts.gate_up_proj.data, layer.experts.down_proj.data
    perm = torch.randperm(down.shape[2], generator=torch.Generator().manual_seed(0))
    shuffled = permute_expert(gate_up[0], down[0], perm)
    found = align_permutation((gate_up[0], down[0]), shuffled)
    assert all(torch.equal(a, b) for a, b in zip(permute_expert(*shuffled, found), (gate_up[0], down[0])))
    x = torch.randn(20, down.shape[1])
    before = expert_outputs(layer, x, 1)
    original = gate_up[1].clone(), down[1].clone()
    found = align_permutation((gate_up[0], down[0]), original)
    assert not torch.equal(found, torch.arange(len(found)))  # a real reordering: the checks below can fail
    aligned = permute_expert(*original, found)
    rewrite = ExpertRewrite("test", {(0, 1): aligned}, function_preserving=True)
    rewrite.apply(mat)
    # slot 1 now holds exactly expert 1's weights reordered by ``found`` (gate rows, up rows, down columns) ...
    gate, up = original[0].chunk(2)
    assert torch.equal(layer.experts.gate_up_proj[1], torch.cat([gate[found], up[found]]))
    assert torch.equal(layer.experts.down_proj[1], original[1][:, found])
    assert not torch.equal(layer.experts.gate_up_proj[1], original[0])
    # ... which computes the same function; the other slots are untouched
    torch.testing.assert_close(expert_outputs(layer, x, 1), before, rtol=1e-5, atol=1e-6)
    rewrite.undo(mat)
    assert torch.equal(layer.experts.gate_up_proj[1], original[0]) and torch.equal(layer.experts.down_proj[1],
                                                                                   original[1])


def test_m_smoe_alignment_rewrite_leaves_the_model_function_unchanged():
    model = build_tiny("olmoe")
    mat = Materializer(model)
    cal = batch()
    result = compute("m_smoe", model, mat, cal, num_kept=4, top_k=2)
    assert result.rewrite.slots and result.rewrite.function_preserving
    before = logits(model, cal)
    result.rewrite.apply(mat)
    torch.testing.assert_close(logits(model, cal), before, rtol=1e-5, atol=1e-5)
    result.rewrite.undo(mat)
    assert torch.equal(logits(model, cal), before)


@pytest.mark.parametrize("name", MERGING)
def test_merging_identical_experts_changes_nothing(name):
    model = build_tiny("mixtral")
    mat = Materializer(model)
    with torch.no_grad():
        for layer in mat.layers:
            layer.experts.gate_up_proj[:] = layer.experts.gate_up_proj[0].clone()
            layer.experts.down_proj[:] = layer.experts.down_proj[0].clone()
    cal = batch()
    before = logits(model, cal)
    options = {"rank": 10_000} if name == "svd_compress" else {}
    result = compute(name, model, mat, cal, num_kept=3, top_k=2, **options)
    assert not result.genome.is_pruning and "p'_g = sum" in result.info["semantics"]
    with applied(mat, result):
        torch.testing.assert_close(logits(model, cal), before, rtol=1e-5, atol=1e-5)


def test_skip_weights_rule():
    weights = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.5, 0.5]])
    out = skip_weights(weights, torch.tensor([0.7]))
    assert torch.equal(out, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]))
    assert torch.equal(skip_weights(weights, torch.tensor([0.0])), weights)


def test_skipping_with_beta_zero_equals_top_k_and_betas_are_median_ratios():
    model = build_tiny("mixtral")
    mat = Materializer(model)
    cal = batch()
    plain = logits(model, cal)
    zero = compute("skipping", model, mat, cal, num_kept=8, top_k=2, beta_scale=0.0)
    assert zero.genome == Genome.identity(3, 8, 2) and zero.info["betas"] == [[0.0]] * 3
    with applied(mat, zero):
        assert torch.equal(logits(model, cal), plain)
    skip = compute("skipping", model, mat, cal, num_kept=8, top_k=2)
    # independently: Mixtral's top-2 weights are renormalised softmax probabilities, so w_2 / w_1 = exp(z_2 - z_1)
    # from the router logits z of each of the 4 x 12 calibration tokens; beta = their (lower) median per layer
    inputs, hooks = [], [layer.router.register_forward_hook(lambda m, args, out: inputs.append(args[0]))
                         for layer in mat.layers]
    try:
        logits(model, cal)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(inputs) == 3
    for layer, hidden, beta, share in zip(mat.layers, inputs, skip.info["betas"],
                                          skip.info["calibration_share_skipped_per_rank"]):
        top = (hidden.reshape(-1, 32) @ layer.router.weight.T).topk(2, dim=-1).values
        ratios = torch.exp(top[:, 1] - top[:, 0])
        assert len(ratios) == 48 and 0 < beta[0] < 1
        torch.testing.assert_close(torch.tensor(beta[0]), ratios.median(), rtol=1e-5, atol=0)
        # the share skipped is the share strictly below the median (tokens repeating a prefix tie with each other);
        # the counts are rounding-proof: no other ratio lies within 1e-4 (relative) of the median
        median = ratios.median()
        others = ratios[(ratios - median).abs() > 1e-6 * median]
        assert ((others - median).abs() > 1e-4 * median).all()
        assert share == [pytest.approx(int((ratios < median * (1 - 1e-6)).sum()) / 48, abs=1e-6)]
        assert share[0] <= 0.5
    with applied(mat, skip):
        assert not torch.allclose(logits(model, cal), plain)


@pytest.mark.parametrize("name", PRUNING)
def test_every_pruning_method_gives_a_valid_genome_on_every_family(family, name):
    model = build_tiny(family)
    mat = Materializer(model)
    cal = batch(2, 8)
    options = {"prune": "frequency"} if name == "skipping" else {}
    result = compute(name, model, mat, cal, num_kept=4, top_k=2, **options)
    assert result.genome.is_pruning and result.genome.num_kept == 4 and result.genome.top_k == 2
    mat.adapter.validate(result.genome)
    json.dumps(result.info)
    with applied(mat, result):
        assert torch.isfinite(logits(model, cal)).all()
    if family == "deepseek_v3":  # equal count per expert group
        assert all(sum(e < 4 for e in result.genome.kept(i)) == 2 for i in range(result.genome.num_layers))


def test_merging_is_refused_where_the_router_defines_none_and_odd_group_counts_are_refused():
    model = build_tiny("deepseek_v3")
    for name in MERGING:
        with pytest.raises(MethodError, match="defines no merging"):
            compute(name, model, None, batch(), num_kept=4, top_k=2)
    with pytest.raises(MethodError, match="multiple of 2 with at least 2 per group"):
        compute("frequency", model, None, batch(), num_kept=3, top_k=2)


@pytest.mark.parametrize("name", ["m_smoe", "svd_compress", "skipping"])
def test_applied_restores_bit_exactly_and_reapplies_the_previous_genome(name):
    model = build_tiny("qwen3_moe")
    mat = Materializer(model)
    cal = batch()
    result = compute(name, model, mat, cal, num_kept=4, top_k=2, **({"rank": 2} if name == "svd_compress" else {}))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    previous = Genome.pruning([[0, 1, 2, 3]] * 3, 8, 2)
    mat.apply(previous)
    with_previous = logits(model, cal)
    with applied(mat, result):
        assert not torch.equal(logits(model, cal), with_previous)
    assert mat.genome is previous and torch.equal(logits(model, cal), with_previous)
    mat.restore()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any("forward" in layer.router.__dict__ for layer in mat.layers) and not mat.route_patches


def test_svd_compress_reports_ranks_and_bytes():
    model = build_tiny("mixtral")
    mat = Materializer(model)
    cal = batch()
    low = compute("svd_compress", model, mat, cal, num_kept=4, top_k=2, rank=1)
    assert low.info["ranks"] == [[[1, 1, 1]] * 4] * 3
    hidden, inter = 32, 16
    assert low.info["merged_expert_bytes_factored"] == 3 * 4 * 3 * (inter + hidden) * 4
    assert low.info["bytes_a_factored_format_would_save"] == 3 * 4 * 3 * inter * hidden * 4 - 3 * 4 * 3 * 48 * 4
    assert low.info["bytes_saved_by_vanilla_export_beyond_merge"] == 0
    full = compute("svd_compress", model, mat, cal, num_kept=4, top_k=2, rank=10_000)
    merged = compute("m_smoe", model, mat, cal, num_kept=4, top_k=2)
    with applied(mat, merged):
        reference = logits(model, cal)
    with applied(mat, full):
        torch.testing.assert_close(logits(model, cal), reference, rtol=1e-4, atol=1e-4)


def test_calibration_from_the_mixed_corpus_and_from_a_task():
    model, tok = shipped()
    mixed = calibration_batch(model, tok, n=12)
    texts = tok.batch_decode(mixed["input_ids"], skip_special_tokens=True)
    assert mixed["input_ids"].shape[0] == 12
    assert [t.split("]")[0] + "]" for t in texts[:6]] == ["[add]", "[reverse]", "[sort]", "[copy]", "[lookup]",
                                                          "[count]"]
    task = calibration_batch(model, tok, "skills_sort", n=5)
    assert task["input_ids"].shape[0] == 5
    assert all(t.startswith("[sort]") for t in tok.batch_decode(task["input_ids"], skip_special_tokens=True))


def shipped():
    folder = eep.zoo.path("skills-mixtral")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def test_skills_mixtral_results_export_and_reload_with_plain_transformers(tmp_path):
    model, tok = shipped()
    mat = Materializer(model)
    cal = calibration_batch(model, tok, n=24)
    skip = compute("skipping", model, mat, cal, num_kept=4, top_k=2, prune="frequency")
    out = export_result(mat, skip, tmp_path / "skip", tok)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "skip").eval()
    with mat.applied(skip.genome):  # the checkpoint routes plain top-k': the genome without the skipping patch
        torch.testing.assert_close(logits(reloaded, cal), logits(model, cal), rtol=1e-5, atol=1e-5)
    record = json.loads((tmp_path / "skip" / "eep_export.json").read_text())
    assert out.exact and record["method"] == "skipping" and record["method_info"]["betas"] == skip.info["betas"]
    assert "plain transformers ignores it" in (tmp_path / "skip" / "README.md").read_text()
    merged = compute("m_smoe", model, mat, cal, num_kept=4, top_k=2)
    result = export_result(mat, merged, tmp_path / "m_smoe", tok, calibration=cal)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m_smoe").eval()
    assert reloaded.config.num_local_experts == 4
    # the checkpoint holds exactly the candidate's merged experts (slots 0..3); only its gates are refit, so it
    # follows the candidate, not the full model: next-token argmax agrees on 97% of the calibration tokens
    # (measured; the full model agrees with the candidate on 78%), refit top-2 overlap measured 0.906
    full = logits(model, cal)
    with applied(mat, merged):
        candidate = logits(model, cal)
        slots = {k: v[:4].clone() for k, v in model.state_dict().items() if ".experts." in k}
    exported = reloaded.state_dict()
    assert len(slots) == 8 and all(torch.equal(exported[k], v) for k, v in slots.items())
    mask = cal["attention_mask"].bool()
    agree = (logits(reloaded, cal).argmax(-1) == candidate.argmax(-1))[mask].float().mean()
    assert agree > 0.9 > (full.argmax(-1) == candidate.argmax(-1))[mask].float().mean()
    assert 0.8 < result.router_top_k_overlap < 1.0


def test_enumeration_says_how_many_subsets_it_scores_per_layer():
    """What decides whether ``enumeration`` joins a search's first generation (``eep.app.seeding``): exhaustive up
    to ``max_subsets``, greedy elimination's ``sum_{n=E'+1}^{E} n`` beyond it, nothing for a grouped router."""
    from eep.methods.enumeration import subsets_scored

    assert subsets_scored(8, 4) == 70 and subsets_scored(8, 2) == 28
    assert subsets_scored(32, 8) == sum(range(9, 33)) == 492 and subsets_scored(64, 16) == 1944
    assert subsets_scored(256, 32, expert_groups=8) is None
    assert subsets_scored(256, 32, expert_groups=8, fallback="sample") == 10000
