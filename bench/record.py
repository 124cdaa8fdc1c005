"""What every benchmark writes beside its figures: the machine, the code, the command and the load, as raw JSON in
``bench/results/`` (imported by the scripts of this folder: ``python bench/<name>.py`` puts it on the path)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load() -> list[float]:
    """The 1, 5 and 15 minute load averages (``/proc/loadavg``): beside every measurement, since the cores may be
    shared."""
    return [round(x, 2) for x in os.getloadavg()]


def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if v}


def _git(*args: str) -> str:
    """The command's output with trailing white space removed (leading space is meaningful in ``status``)."""
    root = Path(__file__).resolve().parent.parent
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.rstrip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def machine() -> dict:
    """CPU model and cores (``lscpu``), the cores this process may use, memory, Python, torch and its threads."""
    import torch

    cpu = _lscpu()
    mem = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), None) if Path("/proc/meminfo").exists() else None
    return {"cpu_model": cpu.get("Model name", platform.processor() or platform.machine()),
            "cpus": cpu.get("CPU(s)"), "threads_per_core": cpu.get("Thread(s) per core"),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "memory_gib": round(int(mem) / 2**20, 1) if mem else None, "machine": platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def code() -> dict:
    """The commit measured and whether the tree differed from it (the files that did)."""
    changed = [line[3:] for line in _git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"commit": _git("rev-parse", "HEAD"), "changed_files": changed}


def write(name: str, data: dict) -> Path:
    """``bench/results/<name>.json`` with ``data`` and the command, time, machine and code around it."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    record = {"command": "python " + " ".join([os.path.relpath(sys.argv[0], RESULTS.parent.parent), *sys.argv[1:]]),
              "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "code": code(), **data}
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"raw results: {path}")
    return path
