"""Token batches from the documents an Evaluator scores: calibration for statistics, gate refits and measurements."""
from __future__ import annotations


def encode(tokenizer, texts: list[str], device, padding_side: str = "right") -> dict:
    """``{"input_ids", "attention_mask": long[B, S]}`` of ``texts`` on ``device``, padded on ``padding_side``
    (the tokenizer's own side is left as it was)."""
    side, tokenizer.padding_side = tokenizer.padding_side, padding_side
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


def reference_answer(task, doc) -> str:
    """A generation document's target as lm-eval renders it (the first of several; a choice index as its text)."""
    target = task.doc_to_target(doc)
    if isinstance(target, int) and task.config.doc_to_choice is not None:
        target = task.doc_to_choice(doc)[target]
    return str(target[0] if isinstance(target, list) else target)


def document_text(evaluator, inst) -> str:
    """A request's context with its continuation (loglikelihood) or its reference answer (generation)."""
    if inst.request_type == "loglikelihood":
        return inst.args[0] + inst.args[1]
    return inst.args[0] + reference_answer(evaluator.tasks[inst.task_name], inst.doc)


def calibration_tokens(evaluator, tokenizer, n: int = 64, padding_side: str = "right",
                       prompts_only: bool = False) -> dict:
    """``{"input_ids", "attention_mask"}`` of the first ``n`` requests the evaluator scores, with their answers
    (so that refit gates see the positions where answers are generated); ``prompts_only`` and left padding for
    generation. With several tasks the requests are taken from each task in turn (the first of every task, then
    the second, ...), so ``n`` requests of a six-skill group cover all six skills, not only the first."""
    by_task: dict[str, list] = {}
    for reqs in evaluator.requests.values():
        for inst in reqs:
            by_task.setdefault(inst.task_name, []).append(inst)
    queues = list(by_task.values())
    insts = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)][:n]
    texts = [inst.args[0] if prompts_only else document_text(evaluator, inst) for inst in insts]
    return encode(tokenizer, texts, next(evaluator.model.parameters()).device, padding_side)
