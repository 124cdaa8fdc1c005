"""``eep-zoo`` (in process) and the model config group shipped in eep's config folder."""
import os

import pytest

import eep
from eep.models import model_config
from eep.zoo.cli import main


def test_model_configs_ship_with_the_package():
    names = sorted(p.stem for p in (eep.conf_dir() / "model").glob("*.yaml"))
    assert names == ["hub", "skills_mixtral", "skills_olmoe", "skills_qwen3"]
    cfg = model_config("skills_olmoe")
    assert cfg.location() == str(eep.zoo.path("skills-olmoe"))
    if os.environ.get("CI"):  # CI installs eep as a wheel: the tests must exercise the installed copy
        assert "site-packages" in eep.__file__ and "site-packages" in str(eep.conf_dir())


def test_eval_prints_a_score_per_task(capsys):
    assert main(["eval", "skills_mixtral", "--tasks", "skills_copy,skills_count_mc", "--limit", "20"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: float(line.split()[2]) for line in out.splitlines() if line.startswith("skills_")}
    assert set(rows) == {"skills_copy", "skills_count_mc"}
    assert all(0.0 <= v <= 1.0 for v in rows.values())


@pytest.mark.parametrize("argv, message", [
    (["eval", "skills_llama"], "unknown model config 'skills_llama'; known: hub, skills_mixtral, skills_olmoe, "
                                  "skills_qwen3"),
    (["eval", "--tasks", "skills_ad", "--limit", "1"], "unknown lm-eval task 'skills_ad'. Did you mean skills_add"),
])
def test_user_errors_are_one_line_and_exit_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
