"""Score the current (possibly patched) model on lm-eval tasks at the cost of the model calls alone.

Tasks, their requests (rendered and tokenised once), the batches of the model calls and the ``HFLM`` wrapper are
built once; per candidate only the model calls, the tasks' filters, ``process_results`` and lm-eval's own aggregation
run. The model calls go through :class:`~eep.evaluate.scoring.LoglikelihoodScorer` and
:class:`~eep.evaluate.generation.GenerationScorer`, which reproduce ``HFLM``'s batches and results exactly, or through
``HFLM`` itself for set-ups they do not reproduce. With the same model, task, split, limit and batch size the metrics
equal ``lm_eval.simple_evaluate``'s.
"""
from __future__ import annotations

import logging
import math
import time
from collections import defaultdict

import torch

from eep.evaluate.docs import fixed_docs
from eep.evaluate.generation import GenerationScorer
from eep.evaluate.reference import flat_metrics, manager_for
from eep.evaluate.score import WORST_FITNESS, Score  # noqa: F401 - Score re-exported
from eep.evaluate.scoring import LoglikelihoodScorer
from eep.evaluate.splits import ROLES, SplitRef, plan_splits
from eep.logs import quiet_harness

log = logging.getLogger(__name__)


class _FiniteCheck:
    """Forward hook on the model: remembers whether any output logits were NaN or infinite."""

    def __init__(self):
        self.bad = False

    def __call__(self, module, args, output):
        logits = getattr(output, "logits", None)
        if logits is not None and not self.bad and not torch.isfinite(logits).all():
            self.bad = True


class Evaluator:
    """Scores the model it was built with, in whatever state it is (patched or not), on one role's documents.

    ``tasks``: lm-eval task or group names (the shipped ``skills_*`` ones, the harness's own, or from
    ``include_paths``); ``role``: ``search``, ``validation`` or ``test`` (see :func:`plan_splits`); ``limit``: first
    documents per task; ``weights``: ``{"task": w}`` or ``{"task,metric": w}`` (default: every leaf task's first
    metric, weight 1 / number of tasks).
    """

    def __init__(self, model, tokenizer, tasks: list[str], *, role: str = "search", limit: int | None = None,
                 batch_size: int = 64, include_paths: tuple[str, ...] = (), split_overrides: dict | None = None,
                 split_seed: int = 0, weights: dict[str, float] | None = None, num_fewshot: int | None = None,
                 apply_chat_template: bool = False, fewshot_as_multiturn: bool = False,
                 system_instruction: str | None = None, device: str | None = None, progress: bool = False,
                 fewshot_seed: int = 1234):
        from lm_eval.models.huggingface import HFLM

        if role not in ROLES:
            raise ValueError(f"role={role!r}; choose one of {', '.join(ROLES)}")
        manager = manager_for(tasks, tuple(include_paths))
        self.model, self.role, self.limit, self.progress = model, role, limit, progress
        # lm-eval warns at every task load (custom dataset) and HFLM(pretrained=<live model>), which is how eep
        # hands its patched model over: known harmless, quiet unless verbose (eep.logs)
        with quiet_harness(progress):
            loaded = manager.load(tasks)
            self.tasks, self.groups = loaded["tasks"], loaded["groups"]
            self.plans = {name: plan_splits(t, split_overrides, split_seed) for name, t in self.tasks.items()}
            device = device or str(next(model.parameters()).device)
            self.lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
            self.weights = self._weights(weights)
            self._build(num_fewshot, fewshot_seed, apply_chat_template, fewshot_as_multiturn, system_instruction)

    # ------------------------------------------------------------------ set-up (once)
    def _build(self, num_fewshot, fewshot_seed, apply_chat_template, fewshot_as_multiturn, system_instruction):
        self.requests: dict[str, list] = defaultdict(list)
        self._docs: dict[str, list] = {}
        for name, task in self.tasks.items():
            ref: SplitRef = self.plans[name][self.role]
            task.config.test_split = ref.name
            if num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=fewshot_seed)
            samples = None if ref.indices is None else list(ref.indices[: self.limit])
            task.build_all_requests(
                limit=None if samples is not None else self.limit, samples=samples, rank=0, world_size=1,
                system_instruction=system_instruction, apply_chat_template=bool(apply_chat_template),
                fewshot_as_multiturn=fewshot_as_multiturn,
                chat_template=self.lm.apply_chat_template if apply_chat_template else None,
                tokenizer_name=self.lm.tokenizer_name if apply_chat_template else "")
            self._docs[name] = _doc_instances(task, fixed_docs(task, self.limit, samples))
            for inst in task.instances:
                self.requests[inst.request_type].append(inst)
        unsupported = set(self.requests) - {"loglikelihood", "generate_until"}
        if unsupported:
            raise ValueError(f"request types {sorted(unsupported)} are not supported for search fitness; use "
                             f"multiple_choice or generate_until tasks")
        self.encoded = [self._encode(inst.args) for inst in self.requests.get("loglikelihood", [])]
        self._loglikelihood = LoglikelihoodScorer.build(self.lm, self.encoded) if self.encoded else None
        generation = self.requests.get("generate_until", [])
        self._generation = GenerationScorer.build(self.lm, generation) if generation else None

    def _encode(self, args: tuple[str, str]):
        """Tokenise one loglikelihood request exactly as ``TemplateLM.loglikelihood`` does."""
        context, continuation = args
        lm = self.lm
        if context == "":
            cont = lm.tok_encode(continuation, add_special_tokens=False)
            ctx, cont = ([lm.prefix_token_id], cont) if lm.prefix_token_id != cont[0] else (cont[:1], cont[1:])
        else:
            ctx, cont = lm._encode_pair(context, continuation)
        return (context, continuation), ctx, cont

    def _weights(self, weights: dict[str, float] | None) -> dict[tuple[str, str], float]:
        if not weights:
            return {(t, self._first_metric(t)): 1.0 / len(self.tasks) for t in self.tasks}
        out = {}
        for key, w in weights.items():
            task, _, metric = key.partition(",")
            if task not in self.tasks and task not in self.groups:
                raise ValueError(f"fitness weight for {task!r}, which is not among the tasks {sorted(self.tasks)}")
            out[(task, metric or self._first_metric(task))] = float(w)
        return out

    def _first_metric(self, task: str) -> str:
        if task in self.groups:
            return self.groups[task].config.aggregate_metric_list[0].metric
        return next(iter(self.tasks[task].aggregation()))

    # ------------------------------------------------------------------ per candidate
    @torch.no_grad()
    def evaluate(self) -> Score:
        """Score the model as it is now; never raises for a failing candidate (worst fitness, reason recorded)."""
        start = time.perf_counter()
        check = _FiniteCheck()
        handle = self.model.register_forward_hook(check)
        try:
            metrics = self._run()
            if check.bad:
                return Score(WORST_FITNESS, metrics, "non-finite logits", time.perf_counter() - start)
            fitness = sum(w * metrics[t][m] for (t, m), w in self.weights.items())
            if not math.isfinite(fitness):
                return Score(WORST_FITNESS, metrics, "non-finite fitness", time.perf_counter() - start)
            return Score(fitness, metrics, None, time.perf_counter() - start, forward_tokens=self.forward_tokens())
        except Exception as err:  # containment: one bad candidate must not end a search
            log.warning("candidate evaluation failed: %r", err)
            return Score(WORST_FITNESS, {}, f"{type(err).__name__}: {err}", time.perf_counter() - start)
        finally:
            handle.remove()

    def _run(self) -> dict[str, dict[str, float]]:
        from lm_eval.evaluator_utils import _process_results

        from eep.evaluate.metrics import task_metrics
        from eep.evaluate.scoring import LoglikelihoodResults

        quiet = not self.progress
        vectorised = self.__dict__.get("_vectorised")
        if vectorised is None:  # once: the tasks whose process_results runs vectorised (None: lm-eval's own)
            lls = self.requests.get("loglikelihood", [])
            vectorised = self._vectorised = {name: task_metrics(task, self._docs[name], lls)
                                             for name, task in self.tasks.items()}
        for reqs in self.requests.values():
            for inst in reqs:
                inst.resps = []
        ll = None
        if self.encoded:
            ll = (self._loglikelihood.run_tensors(self.progress) if self._loglikelihood else
                  LoglikelihoodResults.from_pairs(self.lm._loglikelihood_tokens(self.encoded, disable_tqdm=quiet)))
            if any(vectorised[name] is None for name, t in self.tasks.items() if t.OUTPUT_TYPE != "generate_until"):
                for inst, res in zip(self.requests["loglikelihood"], ll.pairs(), strict=True):
                    inst.resps.append(res)
        if "generate_until" in self.requests:
            reqs = self.requests["generate_until"]
            texts = (self._generation.run(self.progress) if self._generation
                     else self.lm.generate_until(reqs, disable_tqdm=quiet))
            for inst, res in zip(reqs, texts, strict=True):
                inst.resps.append(res)
        acc = {name: {"task": t, "raw_metrics": defaultdict(list), "logged_samples": []}
               for name, t in self.tasks.items()}
        for name, task in self.tasks.items():
            self._collect(name, task, acc[name]["raw_metrics"], vectorised[name], ll)
        return flat_metrics(_process_results(acc, self.groups, bootstrap_iters=0)._to_eval_results()["results"])

    def _collect(self, name: str, task, raw: dict, vectorised=None, ll=None) -> None:
        """Per-document metrics, as ``lm_eval.evaluator.evaluate`` computes them: vectorised
        (``eep.evaluate.metrics.task_metrics``, the same values) where that covers the task, else lm-eval's own
        ``process_results`` per document."""
        if vectorised is not None and vectorised.collect(raw, ll):
            return
        task.apply_filters()
        for filter_key in task.instances[0].filtered_resps:
            for doc, insts in self._docs[name]:
                values = task.process_results(doc, [i.filtered_resps[filter_key] for i in insts])
                for metric, value in values.items():
                    raw[(metric, filter_key)].append(value)

    def documents(self) -> dict[str, int]:
        """The number of documents scored per task."""
        return {name: len(docs) for name, docs in self._docs.items()}

    def forward_tokens(self) -> int:
        """Token positions the last evaluation ran through the model (loglikelihood batches, and the generation
        batches' prompts and generated steps; where HFLM's own methods ran, the requests' unpadded tokens)."""
        total = 0
        if self.encoded:
            total += (self._loglikelihood.forward_tokens if self._loglikelihood else
                      sum(len(ctx) + len(cont) for _, ctx, cont in self.encoded))
        if "generate_until" in self.requests:
            total += (self._generation.forward_tokens if self._generation else
                      sum(len(self.lm.tok_encode(i.args[0])) for i in self.requests["generate_until"]))
        return total

    def generation_scorer(self):
        """The prepared generation batches (a :class:`~eep.evaluate.generation.GenerationScorer`), or None where
        HFLM's own ``generate_until`` runs."""
        return self._generation

    def describe(self) -> dict:
        """The split plan per task (for reports): role -> split, number of docs, partition or not."""
        return {name: {role: ref.describe() for role, ref in plan.items()} for name, plan in self.plans.items()}


def _doc_instances(task, docs: list[tuple[int, object]]) -> list[tuple[object, list]]:
    """Each document with its instances in request order, as ``lm_eval.evaluator.evaluate`` pairs them."""
    by_doc = defaultdict(list)
    for inst in task.instances:
        by_doc[inst.doc_id].append(inst)
    return [(doc, sorted(by_doc[doc_id], key=lambda inst: inst.idx)) for doc_id, doc in docs]
