"""What inference saves: dynamic skipping that skips (sentinel slots, every experts kernel, skipping.json and its
loader) and the notes an export gives serving stacks."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import build_tiny
from eep.materialize import Materializer
from eep.methods import applied, compute, export_result
from eep.methods.skipping import FILE, load_skipping, skip_routing, skip_weights

CAL_SHAPE = (4, 12)


def batch():
    torch.manual_seed(0)
    ids = torch.randint(3, 64, CAL_SHAPE)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model, cal):
    with torch.no_grad():
        return model(**cal).logits


def test_skip_routing_sends_skipped_slots_to_the_sentinel_and_rescales_the_rest():
    weights = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.5, 0.5]])
    slots = torch.tensor([[3, 5], [1, 0], [2, 7]])
    out, routed = skip_routing(weights, slots, torch.tensor([0.7]), sentinel=8)
    assert torch.equal(out, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]))
    assert torch.equal(routed, torch.tensor([[3, 8], [8, 0], [2, 7]]))
    out, routed = skip_routing(weights, slots, torch.tensor([0.0]), sentinel=8)
    assert torch.equal(out, weights) and torch.equal(routed, slots)


class Counting(torch.nn.Module):
    """Wraps an experts module's activation and counts the rows it is applied to (one row per computed pair)."""

    def __init__(self, act):
        super().__init__()
        self.act, self.rows = act, 0

    def forward(self, x):
        self.rows += x.shape[0]
        return self.act(x)


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_skipped_pairs_compute_what_zero_weights_compute_on_every_kernel(family, implementation):
    model = build_tiny(family)
    model.set_experts_implementation(implementation)
    mat = Materializer(model)
    cal = batch()
    skip = compute("skipping", model, mat, cal, num_kept=4, top_k=2, prune="frequency")
    betas = [torch.tensor(b) for b in skip.info["betas"]]
    # the same rule with the skipped experts computed at weight 0 (eep's rule before skipping skipped)
    zero_weight = {i: (lambda w, s, b=b: (skip_weights(w, b), s)) for i, b in enumerate(betas)}
    with mat.applied(skip.genome):
        mat.patch_routing(zero_weight)
        expected = logits(model, cal)
    with applied(mat, skip):
        got = logits(model, cal)
        assert all("forward" in layer.experts.__dict__ for layer in mat.layers)
    # float32 sums in another order (the skipped pair's exact 0 is left out, and the eager loop adds per expert):
    # measured max |difference| 1.4e-6 over the six families and three kernels (batched_mm: 0, it sums k=1 per pair)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not any("forward" in layer.experts.__dict__ for layer in mat.layers)


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_the_experts_compute_only_the_kept_pairs(implementation):
    """The activation runs once per computed (token, expert) pair on every kernel: the skipped pairs never reach it."""
    model = build_tiny("mixtral")
    model.set_experts_implementation(implementation)
    mat = Materializer(model)
    cal = batch()
    skip = compute("skipping", model, mat, cal, num_kept=8, top_k=2)
    routed = []
    for layer in mat.layers:
        layer.experts.act_fn = Counting(layer.experts.act_fn)
        layer.experts.register_forward_pre_hook(lambda m, args: routed.append(args[1].clone()))
    with applied(mat, skip):
        logits(model, cal)
    tokens = CAL_SHAPE[0] * CAL_SHAPE[1]
    kept = [int((r < 8).sum()) for r in routed]
    assert all(tokens < k < 2 * tokens for k in kept)   # the median rule skips some, never a top expert
    assert [layer.experts.act_fn.rows for layer in mat.layers] == kept


def test_an_export_carries_skipping_json_and_load_skipping_reproduces_the_candidate(tmp_path):
    model = build_tiny("qwen3_moe")
    mat = Materializer(model)
    cal = batch()
    skip = compute("skipping", model, mat, cal, num_kept=4, top_k=2, prune="frequency")
    with applied(mat, skip):
        candidate = logits(model, cal)
    out = export_result(mat, skip, tmp_path / "skip")
    assert out.exact and (tmp_path / "skip" / FILE).is_file()
    assert "load_skipping" in (tmp_path / "skip" / "README.md").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "skip", dtype=torch.float32).eval()
    with mat.applied(skip.genome):   # loaded alone, the checkpoint routes plain top-k'
        torch.testing.assert_close(logits(reloaded, cal), logits(model, cal), rtol=1e-5, atol=1e-5)
    loaded = load_skipping(reloaded, tmp_path / "skip")
    torch.testing.assert_close(logits(reloaded, cal), candidate, rtol=1e-5, atol=1e-5)
    loaded.restore()
    with pytest.raises(ValueError, match="holds betas for 3 MoE layers"):
        load_skipping(build_tiny("qwen3_moe", num_hidden_layers=2), tmp_path / "skip")


def test_an_expert_count_that_expert_parallel_sizes_do_not_divide_is_noted(tmp_path, caplog):
    from eep.export import export, serving_notes
    from eep.genome import Genome

    assert serving_notes(8) == [] and serving_notes(4) == [] and serving_notes(1) == []
    assert "size(s) 4" in serving_notes(6)[0] and "size(s) 2, 4" in serving_notes(5)[0]
    model = build_tiny("mixtral")
    with caplog.at_level("WARNING", logger="eep.export"):
        out = export(model, Genome.pruning([[0, 1, 2, 3, 4, 5]] * 3, 8, 2), tmp_path / "six")
    assert any("not divisible by expert-parallel size(s) 4" in n for n in out.notes)
    assert "size(s) 4" in caplog.text and "size(s) 4" in (tmp_path / "six" / "README.md").read_text()
