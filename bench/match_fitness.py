"""``search.fitness=match+likelihood`` against ``task+likelihood``: same values? what cost? ``python bench/match_fitness.py``.

On each shipped model, one Session on all six skills (``task=skills_all``, the search split's 100 documents per
skill), the full model and ``--candidates`` random pruned candidates (a uniform draw of ``E/2``, ``E-2`` or ``E-1``
kept experts per layer, top-k 2): each scored by the two fitnesses in the same process, and generation's exact match
against the forced one per task. Recorded: the largest fitness difference, the documents where the two exact matches
differ (per-task difference x documents, summed), forward tokens and seconds of each, to
``bench/results/match_fitness.json``.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from record import load, write  # noqa: E402

MODELS = {"skills_mixtral": 8, "skills_olmoe": 32, "skills_qwen3": 64}


def measure(model: str, experts: int, candidates: int, seed: int) -> dict:
    from hydra import compose, initialize_config_dir

    import eep
    from eep.app.session import Session, fitness_scorer
    from eep.genome import Genome

    def cfg(fitness):
        with initialize_config_dir(version_base="1.3", config_dir=str(eep.conf_dir())):
            return compose("eep_search", [f"model={model}", "task=skills_all", f"search.fitness={fitness}"])

    session = Session(cfg("match+likelihood"))
    blend = fitness_scorer(cfg("task+likelihood"), session.search_tasks)
    docs = session.search_tasks.documents()
    rng, layers = random.Random(seed), len(session.mat.layers)
    out = {"model": model, "candidates": 0, "max_abs_fitness_diff": 0.0, "documents_differing": 0,
           "documents_scored": 0, "tokens": {"match": 0, "blend": 0}, "seconds": {"match": 0.0, "blend": 0.0}}
    for step in range(candidates + 1):
        if step:
            k = rng.choice([experts // 2, experts - 2, experts - 1])
            session.mat.apply(Genome.pruning([sorted(rng.sample(range(experts), k)) for _ in range(layers)],
                                             experts, 2))
        a, b = session.searcher.evaluate(), blend.evaluate()
        out["candidates"] += 1
        out["max_abs_fitness_diff"] = max(out["max_abs_fitness_diff"], abs(a.fitness - b.fitness))
        for name, n in docs.items():
            out["documents_differing"] += round(abs(a.metrics[name]["exact_match_forced"]
                                                    - b.metrics[name]["exact_match"]) * n)
            out["documents_scored"] += n
        for side, r in (("match", a), ("blend", b)):
            out["tokens"][side] += r.forward_tokens
            out["seconds"][side] += r.seconds
    out["tokens_ratio"] = round(out["tokens"]["match"] / out["tokens"]["blend"], 3)
    out["seconds_ratio"] = round(out["seconds"]["match"] / out["seconds"]["blend"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from eep.logs import quiet_third_party

    quiet_third_party(True)
    rows = [measure(m, MODELS[m], args.candidates, args.seed) for m in args.models.split(",")]
    for row in rows:
        print(json.dumps(row))
    write("match_fitness", {"rows": rows, "load": load()})


if __name__ == "__main__":
    main()
