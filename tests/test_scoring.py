"""Vectorised per-document metrics (eep/evaluate/metrics.py): every value equals lm-eval's own ``process_results``,
and its aggregation equals lm-eval's, on the shipped tasks and on lm-eval task set-ups the shipped ones do not use;
a metric not covered goes through lm-eval's own code."""
import json
import random
from collections import defaultdict

import numpy as np
import pytest
import torch
from lm_eval.api.metrics import exact_match_hf_evaluate
from lm_eval.evaluator_utils import _process_results
from transformers import AutoModelForCausalLM, AutoTokenizer

import eep.zoo
from eep.evaluate.evaluator import Evaluator
from eep.evaluate.reference import flat_metrics, simple_scores
from eep.evaluate.metrics import ChoiceMetrics, GenerationMetrics, exact_match_scores, task_metrics
from eep.evaluate.scoring import LoglikelihoodResults
from eep.genome import Genome
from eep.materialize import Materializer

SHIPPED = ["skills_add_mc", "skills_count_mc", "skills_lookup_mc", "skills_add", "skills_copy", "skills_count",
           "skills_lookup", "skills_reverse", "skills_sort"]
LIMIT = 40


@pytest.fixture(scope="module")
def shipped():
    folder = eep.zoo.path("skills-mixtral")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def pruned(shipped):
    """The shipped model with half its experts: right and wrong documents in 8 of the 9 shipped tasks (skills_add
    scores 0 at limit 40), so a wrong value shows."""
    mat = Materializer(shipped[0])
    mat.apply(Genome.pruning([[0, 1, 4, 5], [2, 3, 6, 7], [0, 1, 6, 7], [2, 3, 4, 5]], 8, 2))
    yield shipped
    mat.restore()


def _both_ways(ev: Evaluator):
    """Run the model once; per task the raw per-document metrics lm-eval's ``process_results`` gives and the
    vectorised ones, and both aggregated by lm-eval."""
    for reqs in ev.requests.values():
        for inst in reqs:
            inst.resps = []
    ll = ev._loglikelihood.run_tensors() if ev.encoded else None
    if ll is not None:
        for inst, res in zip(ev.requests["loglikelihood"], ll.pairs(), strict=True):
            inst.resps.append(res)
    if "generate_until" in ev.requests:
        for inst, text in zip(ev.requests["generate_until"], ev._generation.run(), strict=True):
            inst.resps.append(text)
    lm_eval_raw, eep_raw = {}, {}
    for name, task in ev.tasks.items():
        lm_eval_raw[name] = defaultdict(list)
        ev._collect(name, task, lm_eval_raw[name])  # no vectorised metrics given: lm-eval's process_results
        vector = task_metrics(task, ev._docs[name], ev.requests.get("loglikelihood", []))
        assert vector is not None, f"{name}: not vectorised"
        eep_raw[name] = defaultdict(list)
        assert vector.collect(eep_raw[name], ll)
    return lm_eval_raw, eep_raw, ev


def _aggregate(ev, raw):
    acc = {name: {"task": t, "raw_metrics": raw[name], "logged_samples": []} for name, t in ev.tasks.items()}
    return flat_metrics(_process_results(acc, ev.groups, bootstrap_iters=0)._to_eval_results()["results"])


def _assert_identical(lm_eval_raw, eep_raw):
    for name in lm_eval_raw:
        assert list(eep_raw[name]) == list(lm_eval_raw[name]), name  # same metrics, filters, order
        for key, values in lm_eval_raw[name].items():
            assert eep_raw[name][key] == values, (name, key)


@pytest.mark.parametrize("model", ["shipped", "pruned"])
def test_shipped_tasks_vectorised_equal_lm_eval_process_results(request, model):
    ev = Evaluator(*request.getfixturevalue(model), SHIPPED, role="test", limit=LIMIT, batch_size=16)
    lm_eval_raw, eep_raw, ev = _both_ways(ev)
    _assert_identical(lm_eval_raw, eep_raw)
    assert _aggregate(ev, eep_raw) == _aggregate(ev, lm_eval_raw)
    if model == "pruned":  # the counts are not trivial: right and wrong documents in all tasks but skills_add
        mixed = {name for name, raw in lm_eval_raw.items() if all(0 < sum(v) < len(v) for v in raw.values())}
        assert mixed == set(SHIPPED) - {"skills_add"}


def test_evaluate_takes_the_vectorised_path_and_equals_simple_evaluate(pruned, monkeypatch):
    model, tok = pruned
    tasks = [t for t in SHIPPED if t.endswith("_mc")] + ["skills_all"]  # the group: all generation tasks
    ev = Evaluator(model, tok, tasks, role="test", limit=LIMIT, batch_size=16)
    calls = []
    from lm_eval.api.task import ConfigurableTask
    original = ConfigurableTask.process_results
    monkeypatch.setattr(ConfigurableTask, "process_results", lambda self, doc, results: (
        calls.append(self.config.task), original(self, doc, results))[1])
    score = ev.evaluate()
    assert score.error is None and not calls  # no document went through lm-eval's process_results
    monkeypatch.undo()
    assert set(score.metrics) == set(SHIPPED) | {"skills_all"}
    assert score.metrics == simple_scores(model, tok, tasks, limit=LIMIT, batch_size=16)


# ------------------------------------------------------------------ lm-eval set-ups the shipped tasks do not use
def _write_tasks(folder) -> None:
    """Local-JSON tasks: multiple choice with 2-6 choices of different lengths, gold as an index, as a string and as
    several targets, the six metrics vectorised (f1 on a two-choice task: lm-eval's f1 is binary); loglikelihood
    (perplexity, acc); generation with exact_match's options and two filter pipelines; and one with a
    metric eep does not vectorise (brier_score)."""
    rng = random.Random(0)
    prompts = [json.loads(line)["prompt"]
               for line in (_data_dir() / "add" / "test.jsonl").read_text().splitlines()][:LIMIT]
    rows = []
    for prompt in prompts:
        n = rng.randint(2, 6)
        choices = list(dict.fromkeys("".join(rng.choice("0123456789") for _ in range(rng.randint(1, 5)))
                                     for _ in range(n + 4)))[:n]
        label = rng.randrange(len(choices))
        rows.append({"prompt": prompt, "choices": choices, "label": label, "gold": choices[label],
                     "pair": choices[:2], "label2": label % 2,
                     "golds": sorted(rng.sample(range(len(choices)), rng.randint(1, len(choices)))),
                     "answer": rng.choice(["1", "12", "0", "A1", "a1.", "3,0"])})
    (folder / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = "".join(f"    {split}: {folder / 'docs.jsonl'}\n" for split in ("train", "validation", "test"))
    base = ("dataset_path: json\ndataset_kwargs:\n  data_files:\n" + files +  # a test split of its own
            "training_split: train\nvalidation_split: validation\ntest_split: test\n"
            "doc_to_text: \"{{prompt}}\"\ntarget_delimiter: \"\"\nmetadata:\n  version: 1.0\n")
    mc = "output_type: multiple_choice\ndoc_to_choice: choices\n"
    five = "".join(f"  - metric: {m}\n" for m in ("acc", "acc_norm", "acc_bytes", "exact_match", "mcc"))
    tasks = {
        "eep_t_mc_index": base + mc + "doc_to_target: label\nmetric_list:\n" + five,
        "eep_t_mc_string": base + mc + "doc_to_target: gold\nmetric_list:\n" + five,
        "eep_t_mc_binary": base + "output_type: multiple_choice\ndoc_to_choice: pair\ndoc_to_target: label2\n"
        "metric_list:\n  - metric: f1\n" + five,  # lm-eval's f1 aggregation is binary
        "eep_t_mc_targets": base + mc + "doc_to_target: golds\nmetric_list:\n"
        + "".join(f"  - metric: {m}\n" for m in ("acc", "acc_norm", "acc_bytes", "exact_match")),
        "eep_t_gen": base + "output_type: generate_until\ndoc_to_target: answer\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  do_sample: false\n  max_gen_toks: 6\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        "    ignore_case: true\n    ignore_punctuation: true\n    regexes_to_ignore: [\"0\", \"^9\"]\n"
        "filter_list:\n  - name: digits\n    filter:\n      - function: regex\n        regex_pattern: \"(\\\\d)\"\n"
        "      - function: take_first\n  - name: whole\n    filter:\n      - function: take_first\n",
        "eep_t_ll": base + "output_type: loglikelihood\ndoc_to_target: gold\n"
        "metric_list:\n  - metric: perplexity\n  - metric: acc\n",
        "eep_t_mc_brier": base + "output_type: multiple_choice\ndoc_to_choice: pair\ndoc_to_target: label2\n"
        "metric_list:\n  - metric: acc\n  - metric: brier_score\n",  # lm-eval's brier_score needs equal choices
    }
    for name, text in tasks.items():
        (folder / f"{name}.yaml").write_text(f"task: {name}\n" + text)


def _data_dir():
    from eep.tasks.harness.loader import DATA_DIR

    return DATA_DIR


COVERED = ["eep_t_mc_index", "eep_t_mc_string", "eep_t_mc_targets", "eep_t_mc_binary", "eep_t_gen", "eep_t_ll"]


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    _write_tasks(folder)
    return folder


def test_other_lm_eval_set_ups_vectorised_equal_lm_eval(pruned, task_folder):
    model, tok = pruned
    ev = Evaluator(model, tok, COVERED, role="test", limit=LIMIT, batch_size=16, include_paths=(str(task_folder),))
    assert ev.tasks["eep_t_mc_targets"].multiple_target
    lm_eval_raw, eep_raw, ev = _both_ways(ev)
    _assert_identical(lm_eval_raw, eep_raw)
    assert set(lm_eval_raw["eep_t_gen"]) == {("exact_match", "digits"), ("exact_match", "whole")}
    assert _aggregate(ev, eep_raw) == _aggregate(ev, lm_eval_raw)
    score = ev.evaluate()
    assert score.metrics == simple_scores(model, tok, COVERED, limit=LIMIT, batch_size=16,
                                          include_paths=(str(task_folder),))
    assert set(score.metrics["eep_t_ll"]) == {"perplexity", "acc"}
    assert set(score.metrics["eep_t_mc_binary"]) == {"acc", "acc_norm", "acc_bytes", "exact_match", "f1", "mcc"}


def test_ties_nan_and_infinities_give_lm_eval_predictions(shipped, task_folder):
    """argmax over padded rows: ties (first wins), NaN (first NaN wins), -inf and +inf, as numpy's over one row."""
    ev = Evaluator(*shipped, COVERED[:4], role="test", limit=LIMIT, batch_size=16, include_paths=(str(task_folder),))
    rng = np.random.default_rng(0)
    n = len(ev.requests["loglikelihood"])
    for trial in range(20):
        values = rng.choice([-1.0, -2.0, -0.5, -3.25, np.nan, -np.inf, np.inf, 0.0], size=n,
                            p=[.3, .2, .2, .1, .05, .05, .05, .05] if trial % 2 else None)
        greedy = rng.random(n) < 0.5
        ll = LoglikelihoodResults(torch.tensor(values, dtype=torch.float32), torch.tensor(greedy))
        for inst, res in zip(ev.requests["loglikelihood"], ll.pairs(), strict=True):
            inst.resps = [res]
        for name, task in ev.tasks.items():
            expected, got = defaultdict(list), defaultdict(list)
            ev._collect(name, task, expected)
            vector = task_metrics(task, ev._docs[name], ev.requests["loglikelihood"])
            assert isinstance(vector, ChoiceMetrics) and vector.collect(got, ll)
            assert list(got) == list(expected)
            for key in expected:
                assert [str(v) for v in got[key]] == [str(v) for v in expected[key]], (name, key)


def test_a_metric_not_covered_falls_back_to_lm_eval(pruned, task_folder, monkeypatch):
    model, tok = pruned
    tasks = ["eep_t_mc_brier", "eep_t_mc_index"]
    ev = Evaluator(model, tok, tasks, role="test", limit=LIMIT, batch_size=16, include_paths=(str(task_folder),))
    assert task_metrics(ev.tasks["eep_t_mc_brier"], ev._docs["eep_t_mc_brier"], ev.requests["loglikelihood"]) is None
    calls = []
    from lm_eval.api.task import ConfigurableTask
    original = ConfigurableTask.process_results
    monkeypatch.setattr(ConfigurableTask, "process_results", lambda self, doc, results: (
        calls.append(self.config.task), original(self, doc, results))[1])
    score = ev.evaluate()
    monkeypatch.undo()
    assert set(calls) == {"eep_t_mc_brier"} and len(calls) == LIMIT  # only the task not covered, per document
    assert score.error is None
    assert score.metrics == simple_scores(model, tok, tasks, limit=LIMIT, batch_size=16,
                                          include_paths=(str(task_folder),))
    assert set(score.metrics["eep_t_mc_brier"]) == {"acc", "brier_score"}


def test_a_non_string_response_falls_back_for_that_candidate(shipped):
    ev = Evaluator(*shipped, ["skills_sort"], role="test", limit=8, batch_size=8)
    vector = task_metrics(ev.tasks["skills_sort"], ev._docs["skills_sort"], [])
    assert isinstance(vector, GenerationMetrics)
    for inst in ev.requests["generate_until"]:
        inst.resps = [["not", "a", "string"]]
    raw = defaultdict(list)
    assert vector.collect(raw, None) is False and not raw


@pytest.mark.parametrize("kwargs", [{}, {"ignore_case": True}, {"ignore_punctuation": True}, {"ignore_numbers": True},
                                    {"regexes_to_ignore": ["a", "^x"]},
                                    {"regexes_to_ignore": ["\\s"], "ignore_case": True, "ignore_punctuation": True,
                                     "ignore_numbers": True}])
def test_exact_match_scores_equal_lm_eval_pair_by_pair(kwargs):
    """Awkward strings included: 'İ' (lower() lengthens it, numpy cuts it to the array's width), trailing NULs
    (numpy drops them), case, punctuation, digits, empty strings, non-ASCII."""
    words = ["", "a", "A", "İ", "i̇", "i", "ab\x00", "ab", "x1,2", "X12", "12", " a ", "a.b", "ab", "ΣΑΣ",
             "σας", "0", "a\x00b", "İİ", "ii"]
    preds = [p for p in words for _ in words]
    refs = [r for _ in words for r in words]
    expected = [exact_match_hf_evaluate(predictions=[p], references=[r], **kwargs)["exact_match"]
                for p, r in zip(preds, refs, strict=True)]
    got = exact_match_scores(preds, refs, **kwargs)
    assert got.tolist() == [float(e) for e in expected]
    assert 0 < got.sum() < len(got)


def test_match_fitness_refuses_exact_match_with_options_or_filters(pruned, task_folder):
    """``search.fitness=match+likelihood`` reads plain exact match off a teacher-forced pass: a generation task
    whose exact match ignores case and punctuation behind regex filters is named with the reason (``auto`` then
    runs task+likelihood)."""
    from eep.evaluate.dense import match_refusal

    model, tok = pruned
    ev = Evaluator(model, tok, ["eep_t_gen"], role="test", limit=8, batch_size=8, include_paths=(str(task_folder),))
    reason = match_refusal(ev)
    assert reason.startswith("task eep_t_gen is not scored by plain exact_match (metrics ['exact_match'], options")
    assert "'ignore_case': True" in reason and reason.endswith("filters True)")
