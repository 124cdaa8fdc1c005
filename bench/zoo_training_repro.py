"""How far the shipped models' first 100 training steps drift between CPU kernels: ``python bench/zoo_training_repro.py``.

For each shipped model, the recorded recipe is re-run for 100 steps (1 thread) three ways in fresh processes:
this CPU's default kernels, the same with torch / MKL / oneDNN held to AVX2 (``ATEN_CPU_CAPABILITY=avx2``,
``MKL_ENABLE_INSTRUCTIONS=AVX2``, ``ONEDNN_MAX_CPU_ISA=AVX2``: another kind of processor, simulated), and the
default kernels with the seed changed (a real change of the run, for scale). The mean losses at steps 50 and 100 and
their relative differences to the shipped curve go to ``bench/results/zoo_training_repro.json``; the tolerance in
``tests/test_zoo.py`` is set from these figures.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

VARIANTS = {
    "default": ({}, 0),
    "avx2": ({"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, 0),
    "seed+1": ({}, 1),
}
CHILD = """
import json, sys
from dataclasses import replace
import eep.zoo
from eep.zoo.train import Recipe, train
name, bump = sys.argv[1], int(sys.argv[2])
log = json.loads((eep.zoo.path(name) / "training_log.json").read_text())
recipe = Recipe(**log["recipe"])
out = train(name, replace(recipe, steps=100, seed=recipe.seed + bump), None, log["threads"], check_every=0, quiet=True)
print(json.dumps(out["loss_curve"]))
"""


def run(name: str, env: dict, bump: int) -> list:
    proc = subprocess.run([sys.executable, "-c", CHILD, name, str(bump)], env={**os.environ, **env},
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    import eep.zoo

    out = {"machine": f"{platform.machine()}, {open('/proc/cpuinfo').read().split('model name')[1].split(':')[1].splitlines()[0].strip()}, {os.cpu_count()} cores",
           "loadavg": open("/proc/loadavg").read().split()[:3], "models": {}}
    for name in eep.zoo.names():
        shipped = json.loads((eep.zoo.path(name) / "training_log.json").read_text())["loss_curve"][:2]
        rows = {}
        for variant, (env, bump) in VARIANTS.items():
            curve = run(name, env, bump)
            rows[variant] = {"curve": curve, "rel_diff": [abs(a[1] - b[1]) / b[1] for a, b in zip(curve, shipped)]}
            print(name, variant, curve, [f"{d:.2e}" for d in rows[variant]["rel_diff"]], flush=True)
        out["models"][name] = {"shipped": shipped, **rows}
    Path("bench/results/zoo_training_repro.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
