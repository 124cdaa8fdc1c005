"""A task's evaluation documents read once per search, with their rendered targets, choices and texts memoised."""
from __future__ import annotations

_MEMOISED = ("doc_to_target", "doc_to_choice", "doc_to_text")


def _memoised(method, docs: list):
    """``method(doc)`` computed once per document of ``docs`` (recognised by identity); any other call is passed
    through unchanged."""
    mine = {id(doc): doc for doc in docs}
    memo: dict[int, object] = {}

    def call(doc, *args, **kwargs):
        key = id(doc)
        if args or kwargs or mine.get(key) is not doc:
            return method(doc, *args, **kwargs)
        if key not in memo:
            memo[key] = method(doc)
        return memo[key]

    call.eep_unmemoised = method
    return call


def fixed_docs(task, limit: int | None, samples: list[int] | None) -> list[tuple[int, object]]:
    """``(doc_id, doc)`` pairs as ``task.doc_iterator`` yields them (rank 0 of 1), read once.

    The task's ``doc_to_target``, ``doc_to_choice`` and ``doc_to_text`` are memoised for these documents: lm-eval's
    ``process_results`` renders them (a Jinja template compiled per call) for every document and candidate, though
    they depend on the document alone. A task's ``doc_to_*`` must depend on the document alone (true of templates, fields and plain functions).
    """
    docs = list(task.doc_iterator(rank=0, limit=None if samples else limit, world_size=1, samples=samples))
    for name in _MEMOISED:
        method = getattr(task, name)
        setattr(task, name, _memoised(getattr(method, "eep_unmemoised", method), [doc for _, doc in docs]))
    return docs
