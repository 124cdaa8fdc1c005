"""The genome: constructors, validation errors, canonical hash, JSON and optimiser round trips."""
import pytest
import torch

from eep.genome import Genome, GenomeError, depth_groups


def test_identity_and_pruning_constructors():
    g = Genome.identity(4, 8, 2)
    assert g.is_pruning and g.num_kept == 8 and g.num_layers == 4 and g.kept(3) == list(range(8))
    p = Genome.pruning([[5, 1, 3, 0], [2, 4, 6, 7]], 8, 2)
    assert p.kept(0) == [0, 1, 3, 5] and torch.equal(p.router_map, p.merge)
    assert p.used_experts(1).tolist() == [False, False, True, False, True, False, True, True]


def test_depth_groups_split_layers_evenly():
    assert depth_groups(8, 4) == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert depth_groups(5, 2) == ((0, 1), (2, 3, 4))
    assert depth_groups(3, None) == ((0,), (1,), (2,))
    g = Genome.identity(8, 4, 1, layer_groups=4)
    assert g.group_of(5) == 2 and len(g.router_map) == 4


@pytest.mark.parametrize("make, message", [
    (lambda: Genome.pruning([[0, 1, 2]], 2, 1), "outside 0..1"),
    (lambda: Genome.merging(torch.rand(1, 9, 8), torch.rand(1, 9, 8), 2), "E'=9 kept experts is more than"),
    (lambda: Genome.pruning([[0, 1]], 8, 3), "top_k'=3 must be between 1 and E'=2"),
    (lambda: Genome.pruning([[0, 1]], 8, 0), "top_k'=0 must be between 1"),
    (lambda: Genome.merging(torch.rand(2, 4, 8), torch.rand(2, 4, 7), 2), "must both be"),
    (lambda: Genome.merging(-torch.rand(1, 4, 8), torch.rand(1, 4, 8), 2), "negative"),
    (lambda: Genome.pruning([[0, 1], [2]], 8, 1), "every layer keeps the same E'"),
    (lambda: Genome.pruning([[0, 0]], 8, 1), "twice"),
    (lambda: Genome.pruning([[0, 1], [2, 3]], 8, 1, groups=[(0,), (2,)]), "each layer exactly once"),
    (lambda: Genome.identity(3, 8, 2, layer_groups=4), "layer_groups=4"),
])
def test_invalid_genomes_are_refused_with_a_clear_error(make, message):
    with pytest.raises(GenomeError, match=message):
        make()


def test_hash_is_canonical():
    a = Genome.pruning([[0, 1, 2, 3], [4, 5, 6, 7]], 8, 2)
    b = Genome.pruning([[3, 2, 1, 0], [7, 4, 6, 5]], 8, 2)
    grouped = Genome.pruning([[0, 1, 2, 3]], 8, 2, groups=[(0, 1)])
    ungrouped = Genome.pruning([[0, 1, 2, 3], [0, 1, 2, 3]], 8, 2)
    assert a.content_hash() == b.content_hash() and a == b and len({a, b}) == 1
    assert grouped == ungrouped
    assert a != Genome.pruning([[0, 1, 2, 4], [4, 5, 6, 7]], 8, 2)
    assert a != Genome.pruning([[0, 1, 2, 3], [4, 5, 6, 7]], 8, 1)
    torch.manual_seed(0)
    rm, em = torch.rand(2, 4, 8), torch.rand(2, 4, 8)
    perm = torch.tensor([2, 0, 3, 1])
    assert Genome.merging(rm, em, 2) == Genome.merging(rm[:, perm], em[:, perm], 2)
    assert Genome.merging(rm, em, 2) != Genome.merging(rm[:, perm], em, 2)


def test_json_round_trip_is_exact():
    torch.manual_seed(1)
    pruned = Genome.pruning([[6, 1, 2]], 8, 2, groups=[(0, 1, 2)])
    back = Genome.from_json(pruned.to_json())
    assert back.kept(2) == [1, 2, 6] and back.groups == pruned.groups and back == pruned
    merged = Genome.merging(torch.rand(2, 3, 8), torch.randn(2, 3, 8), 3)
    back = Genome.from_json(merged.to_json())
    assert torch.equal(back.router_map, merged.router_map) and torch.equal(back.merge, merged.merge)
    assert back.top_k == 3 and back.content_hash() == merged.content_hash()
    with pytest.raises(GenomeError, match="kind"):
        Genome.from_dict({"kind": "other"})


def test_vector_round_trip():
    torch.manual_seed(2)
    g = Genome.merging(torch.rand(2, 3, 8), torch.randn(2, 3, 8), 2, groups=[(0, 1), (2,)])
    back = g.with_vector(g.to_vector().numpy())
    assert torch.equal(back.router_map, g.router_map) and torch.equal(back.merge, g.merge) and back.groups == g.groups


def test_one_hot_rows_that_repeat_an_expert_are_a_merging_genome():
    """Two rows one-hot at the same expert duplicate it: not a kept subset, and its JSON round-trips."""
    rows = torch.zeros(1, 2, 4)
    rows[0, :, 1] = 1.0
    genome = Genome.merging(rows, rows.clone(), 1)
    assert not genome.is_pruning and genome.kept(0) is None
    assert Genome.from_dict(genome.to_dict()).content_hash() == genome.content_hash()


def test_gate_rows_is_part_of_a_merging_genome_and_of_nothing_else():
    """``gate_rows`` names another model for a merging genome (hash, JSON, vector, worker payload carry it); for a
    pruning genome both rules are the pruned router, so the hash is the one of the probability rule."""
    import pickle

    from eep.parallel import payload

    torch.manual_seed(3)
    merged = Genome.merging(torch.rand(2, 3, 8), torch.randn(2, 3, 8), 2)
    gate = merged.with_gate_rows(True)
    assert gate != merged and gate.maps_gate_rows and gate.exports_exactly and not merged.exports_exactly
    assert Genome.from_json(gate.to_json()) == gate and Genome.from_json(gate.to_json()).gate_rows
    assert "gate_rows" not in merged.to_dict()
    assert gate.with_vector(gate.to_vector()) == gate and Genome(**payload(gate)) == gate
    pruned = Genome.pruning([[0, 1, 2], [3, 4, 5]], 8, 2)
    assert pruned.with_gate_rows(True) == pruned and pruned.with_gate_rows(True).exports_exactly
    old = pickle.loads(pickle.dumps(merged))   # a genome pickled before the field: no gate_rows in its state
    del old.__dict__["gate_rows"]
    assert old.gate_rows is False and old.with_matrices(old.router_map, old.merge) == merged
