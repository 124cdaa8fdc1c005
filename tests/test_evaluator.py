"""The cached lm-eval evaluator: parity with simple_evaluate, disjoint splits, containment of failing candidates."""
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import eep.zoo
from eep.evaluate.docs import fixed_docs
from eep.evaluate.evaluator import WORST_FITNESS, Evaluator
from eep.evaluate.generation import GenerationScorer
from eep.evaluate.reference import simple_scores
from eep.evaluate.scoring import LoglikelihoodScorer, row_sums
from eep.evaluate.splits import SplitRef, plan_splits
from eep.genome import Genome
from eep.materialize import Materializer

TASKS = ["skills_count_mc", "skills_sort", "skills_lookup"]


@pytest.fixture(scope="module")
def shipped():
    folder = eep.zoo.path("skills-mixtral")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def evaluator(shipped):
    return Evaluator(*shipped, TASKS, role="test", limit=40, batch_size=16)


def test_scores_equal_simple_evaluate_for_full_and_pruned_models(shipped, evaluator):
    model, tok = shipped
    full = evaluator.evaluate()
    assert full.error is None
    assert full.metrics == simple_scores(model, tok, TASKS, limit=40, batch_size=16)
    mat = Materializer(model)
    mat.apply(Genome.pruning([[0, 2, 4, 6], [1, 3, 5, 7], [0, 1, 2, 3], [4, 5, 6, 7]], 8, 2))
    try:
        pruned = evaluator.evaluate()
        assert pruned.metrics == simple_scores(model, tok, TASKS, limit=40, batch_size=16)
    finally:
        mat.restore()
    assert pruned.metrics != full.metrics
    assert math.isclose(full.fitness, sum(full.metrics[t][m] for t, m in
                                          [("skills_count_mc", "acc"), ("skills_sort", "exact_match"),
                                           ("skills_lookup", "exact_match")]) / 3)


def _multi_token_requests(lm, prompts: list[str]) -> list:
    """Requests with 1- to many-token continuations: shared contexts, one context + continuation split at two points
    (one lm-eval group with continuations of different lengths), a duplicate, and one longer than the model's
    window (left truncation)."""
    requests = []
    for prompt in prompts:
        for answer in ("abc\n", "a", "zz", prompt[-3:] + "x"):
            ctx, cont = lm._encode_pair(prompt, answer)
            requests.append(((prompt, answer), ctx, cont))
        ctx, cont = lm._encode_pair(prompt, "abc\n")
        requests.append(((prompt, "bc\n"), ctx + cont[:1], cont[1:]))
    requests.append(requests[0])
    long_ctx, long_cont = lm._encode_pair(" ".join(prompts)[:200], "xyz")
    requests.append((("long", "xyz"), long_ctx, long_cont))
    return requests


@pytest.mark.parametrize("batch_size", [16, 5])
def test_loglikelihood_scorer_equals_hflm_bit_for_bit(shipped, evaluator, batch_size):
    model, tok = shipped
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device="cpu")
    single = evaluator.encoded  # skills_count_mc: one-token continuations, 9 per shared context
    prompts = [inst.args[0] for inst in evaluator.requests["generate_until"][:12]]
    multi = _multi_token_requests(lm, prompts)
    assert max(len(r[1]) + len(r[2]) for r in multi) > lm.max_length + 1
    assert {len(r[2]) for r in multi} >= {1, 2, 3, 4}
    for requests in (single, multi):
        expected = lm._loglikelihood_tokens(requests, disable_tqdm=True)
        assert LoglikelihoodScorer.build(lm, requests).run() == expected
    assert any(greedy for _, greedy in expected) and not all(greedy for _, greedy in expected)


def test_generation_scorer_equals_hflm_generate_until(shipped, evaluator):
    model, tok = shipped
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=7, device="cpu")
    reqs = evaluator.requests["generate_until"]
    texts = GenerationScorer.build(lm, reqs).run()
    assert texts == lm.generate_until(reqs, disable_tqdm=True)
    assert len(set(texts)) > 10


def test_fallback_to_hflm_gives_the_same_metrics(shipped, evaluator, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    model, tok = shipped
    assert LoglikelihoodScorer.build(HFLM(pretrained=model, tokenizer=tok, batch_size="auto", device="cpu"),
                                     evaluator.encoded) is None
    fast = evaluator.evaluate()
    monkeypatch.setattr(evaluator, "_loglikelihood", None)
    monkeypatch.setattr(evaluator, "_generation", None)
    slow = evaluator.evaluate()
    assert slow.error is None and slow.metrics == fast.metrics


def test_row_sums_equal_lone_row_sums():
    torch.manual_seed(0)
    for length in range(1, 200):
        values = torch.randn(50, length) * 3 - 5
        assert torch.equal(row_sums(values), torch.stack([values[i:i + 1].clone().sum() for i in range(50)]))


def test_weighted_fitness_and_group_metrics(shipped):
    ev = Evaluator(*shipped, ["skills_all"], role="search", limit=10, batch_size=32,
                   weights={"skills_all,exact_match": 2.0})
    score = ev.evaluate()
    assert set(score.metrics) == {"skills_all"} | {f"skills_{s}" for s in
                                                   ("add", "reverse", "sort", "copy", "lookup", "count")}
    assert score.fitness == pytest.approx(2.0 * score.metrics["skills_all"]["exact_match"])
    assert ev.describe()["skills_add"]["search"] == {"split": "search", "docs": None, "partition": False}
    # calibration from a group takes each task's documents in turn: 12 requests = the first two of all six skills
    from eep.evaluate.calibration import calibration_tokens, document_text

    tok = shipped[1]
    batch = calibration_tokens(ev, tok, n=12)
    texts = tok.batch_decode([ids[mask.bool()] for ids, mask in zip(batch["input_ids"], batch["attention_mask"])])
    firsts = {name: [document_text(ev, inst) for inst in ev.tasks[name].instances[:2]] for name in ev.tasks}
    assert sorted(texts) == sorted(t for pair in firsts.values() for t in pair)


def test_failing_candidates_get_the_worst_fitness_and_the_evaluator_recovers(shipped, evaluator, monkeypatch):
    model, _ = shipped
    head = model.lm_head.weight
    saved = head.data.clone()
    head.data[0, 0] = float("nan")
    bad = evaluator.evaluate()
    head.data.copy_(saved)
    assert bad.fitness == WORST_FITNESS and bad.error == "non-finite logits"

    def boom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(evaluator.lm, "_model_call", boom)
    failed = evaluator.evaluate()
    assert failed.fitness == WORST_FITNESS and "simulated" in failed.error
    monkeypatch.undo()
    assert evaluator.evaluate().error is None


class _CountingTask:
    """A task whose documents are dicts and whose ``doc_to_*`` count their calls."""

    def __init__(self):
        self.calls = 0

    def doc_iterator(self, *, rank, limit, world_size, samples):
        return iter([(i, {"q": str(i)}) for i in (samples or range(limit))])

    def doc_to_target(self, doc, doc_to_target=None):
        self.calls += 1
        return doc["q"] + "!"

    doc_to_choice = doc_to_text = doc_to_target


def test_fixed_docs_render_each_document_once_and_pass_other_documents_through():
    task = _CountingTask()
    docs = fixed_docs(task, limit=3, samples=None)
    assert [i for i, _ in docs] == [0, 1, 2]
    for _ in range(4):
        assert [task.doc_to_target(doc) for _, doc in docs] == ["0!", "1!", "2!"]
    assert task.calls == 3
    assert task.doc_to_target({"q": "0"}) == "0!" and task.calls == 4  # an equal but other document
    assert task.doc_to_target(docs[0][1], "x") == "0!" and task.calls == 5  # other arguments
    again = fixed_docs(task, limit=None, samples=[2])  # memoised again: for the new documents only
    assert task.doc_to_target(again[0][1]) == "2!" and task.doc_to_target(docs[1][1]) == "1!" and task.calls == 7


class _FakeTask:
    """Just what plan_splits reads: a config with split names and a dataset with split lengths."""

    def __init__(self, training=None, validation=None, test=None, sizes=None):
        self.config = type("C", (), {"task": "fake", "training_split": training, "validation_split": validation,
                                     "test_split": test})()
        self.dataset = {name: [0] * n for name, n in (sizes or {}).items()}


def test_split_plans_are_disjoint_and_partition_missing_splits():
    own = plan_splits(_FakeTask("train", "validation", "test"))
    assert own == {"search": SplitRef("train"), "validation": SplitRef("validation"), "test": SplitRef("test")}
    only_val = plan_splits(_FakeTask("train", "validation", None, sizes={"validation": 101}), seed=3)
    assert only_val["search"] == SplitRef("train")
    val, test = only_val["validation"].indices, only_val["test"].indices
    assert not set(val) & set(test) and len(val) + len(test) == 101
    assert plan_splits(_FakeTask("train", "validation", None, sizes={"validation": 101}), seed=3) == only_val
    only_test = plan_splits(_FakeTask(None, None, "test", sizes={"test": 90}))
    assert sorted(i for r in only_test.values() for i in r.indices) == list(range(90))


def test_overlapping_splits_are_refused():
    with pytest.raises(ValueError, match="search and validation splits are both 'validation'"):
        plan_splits(_FakeTask("train", "validation", "test"), {"search": "validation", "validation": "validation"})


def test_unknown_task_and_role_are_clear_errors(shipped):
    with pytest.raises(ValueError, match="unknown lm-eval task 'skills_sorted'"):
        Evaluator(*shipped, ["skills_sorted"])
    with pytest.raises(ValueError, match="role='dev'"):
        Evaluator(*shipped, ["skills_sort"], role="dev")


def test_export_rescoring_on_a_shipped_model(tmp_path):
    """Pruned export scores exactly as the in-place candidate. A merged export reports both scores and the overlap:
    here ``W_RM`` is one-hot on 16 distinct experts per layer (``W_EM`` = that plus noise), so the refit gate is
    exact (overlap 1: see tests/test_materialize.py) and both reported scores equal ``lm_eval.simple_evaluate``'s
    accuracy of the in-place candidate and of the reloaded checkpoint, which are equal."""
    folder = eep.zoo.path("skills-olmoe")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    from eep.export import export

    def rescore(m):
        return Evaluator(m, tok, ["skills_count_mc"], role="test", limit=30, batch_size=32).evaluate().fitness

    kept = [list(range(0, 32, 2))] * 4
    pruned = export(model, Genome.pruning(kept, 32, 4), tmp_path / "pruned", tok, rescore=rescore)
    assert pruned.exact and pruned.exported_score == pruned.in_place_score
    with Materializer(model).applied(Genome.pruning(kept, 32, 4)):
        assert pruned.in_place_score == simple_scores(model, tok, ["skills_count_mc"], limit=30,
                                                      batch_size=32)["skills_count_mc"]["acc"] < 1.0
    torch.manual_seed(0)
    rm = torch.zeros(4, 16, 32)
    rm[:, torch.arange(16), torch.arange(16) * 2] = 1.0
    em = rm + 0.05 * torch.rand(4, 16, 32)
    calib = tok([d for d in ["[count]a?abca=1\n", "[sort]dcba=abcd\n"] * 8], return_tensors="pt", padding=True)
    merged = export(model, Genome.merging(rm, em, 4), tmp_path / "merged", tok, rescore=rescore,
                    calibration={"input_ids": calib["input_ids"], "attention_mask": calib["attention_mask"]})
    assert not merged.exact and merged.router_top_k_overlap == 1.0
    mat = Materializer(model)
    with mat.applied(Genome.merging(rm, em, 4)):
        in_place = simple_scores(model, tok, ["skills_count_mc"], limit=30, batch_size=32)["skills_count_mc"]["acc"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    exported = simple_scores(reloaded, tok, ["skills_count_mc"], limit=30, batch_size=32)["skills_count_mc"]["acc"]
    assert merged.in_place_score == in_place and merged.exported_score == exported == in_place
    assert rescore(model) == 1.0 > in_place  # the merged candidate is a different model (measured 28 of 30 correct vs 30 of 30)
    assert "score in place" in (tmp_path / "merged" / "README.md").read_text()
