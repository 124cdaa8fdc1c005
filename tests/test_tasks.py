"""The shipped skills tasks: data, splits, lm-eval loading from any working directory."""
import pytest

import eep.tasks
from eep.evaluate.reference import task_manager
from eep.tasks.generate import SPLITS, make_splits, read_split
from eep.tasks.skills import MC_SKILLS, SKILLS, mc_choices
from eep.zoo.tokenizer import build_tokenizer


@pytest.mark.parametrize("skill", SKILLS)
def test_splits_are_disjoint_sized_and_regenerate_identically(skill):
    splits = {s: read_split(skill, s) for s in SPLITS}
    assert len(splits["search"]) >= 200 and len(splits["validation"]) >= 200 and len(splits["test"]) >= 500
    prompts = [{d["prompt"] for d in docs} for docs in splits.values()]
    assert sum(map(len, prompts)) == len(set().union(*prompts)), "a prompt appears twice across splits"
    assert splits == make_splits(skill), "committed data differs from `python -m eep.tasks.generate`"


def _solve(skill: str, prompt: str) -> str:
    """An independent solver of each skill's format (answers must be right, not just consistent)."""
    body = prompt.split("]", 1)[1].rstrip("=")
    if skill == "add":
        a, b = (int(x[::-1]) for x in body.split("+"))
        return str(a + b).zfill(4)[::-1]
    if skill == "reverse":
        return body[::-1]
    if skill == "sort":
        return "".join(sorted(body))
    if skill == "copy":
        return body
    query, rest = body.split("?")
    if skill == "lookup":
        return dict(zip(rest[::2], rest[1::2]))[query]
    return str(rest.count(query))


@pytest.mark.parametrize("skill", SKILLS)
def test_answers_are_correct(skill):
    for doc in read_split(skill, "test")[:100]:
        assert doc["prompt"].startswith(f"[{skill}]")
        assert doc["answer"] == _solve(skill, doc["prompt"]), doc


@pytest.mark.parametrize("skill", MC_SKILLS)
def test_mc_choices_contain_the_answer_once(skill):
    for doc in read_split(skill, "test")[:100]:
        choices = mc_choices(skill, doc)
        assert choices.count(doc["answer"]) == 1 and len(choices) >= 2


def test_every_task_loads_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manager = task_manager()
    group = manager.load(["skills_all"])
    assert set(group["group_map"]["skills_all"]) == {f"skills_{s}" for s in SKILLS}
    tasks = manager.load([n for n in eep.tasks.task_names() if n != "skills_all"])["tasks"]
    assert set(tasks) == set(eep.tasks.task_names()) - {"skills_all"}
    for name, task in tasks.items():
        docs = list(task.test_docs())
        assert len(docs) == 500, name
        if name.endswith("_mc"):
            assert task.OUTPUT_TYPE == "multiple_choice"
            assert docs[0]["choices"][docs[0]["target"]] == docs[0]["answer"]
        else:
            assert task.OUTPUT_TYPE == "generate_until"
            assert task.doc_to_text(docs[0]) == docs[0]["prompt"]


def test_unknown_task_names_the_known_ones():
    with pytest.raises(ValueError, match="skills_add.*eep ships: skills_add, skills_reverse"):
        eep.tasks.check_shipped(["skills_ad"])
    assert eep.tasks.check_shipped(["skills_sort", "skills_all"]) == ["skills_sort", "skills_all"]


def test_tokenizer_roundtrips_every_document():
    tok = build_tokenizer()
    for skill in SKILLS:
        for doc in read_split(skill, "search")[:50]:
            text = doc["prompt"] + doc["answer"] + "\n"
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids
            assert ids[0] == tok.convert_tokens_to_ids(f"[{skill}]")
            assert tok.decode(ids) == text
