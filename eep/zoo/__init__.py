"""The shipped, trained small MoE models ("zoo") and where they live."""
from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "models"
MODEL_NAMES: tuple[str, ...] = ("skills-mixtral", "skills-olmoe", "skills-qwen3")


def names() -> list[str]:
    """Names of the shipped models."""
    return list(MODEL_NAMES)


def path(name: str) -> Path:
    """Folder of shipped model ``name``, loadable with ``AutoModelForCausalLM.from_pretrained(folder)``."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown shipped model {name!r}; shipped models: {', '.join(MODEL_NAMES)} "
                         f"(for any other model pass its folder or hub id)")
    folder = MODELS_DIR / name
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"shipped model {name!r} is missing its files under {folder}; reinstall eep or "
                                f"retrain it with `python -m eep.zoo.train {name} --out {folder}`")
    return folder
