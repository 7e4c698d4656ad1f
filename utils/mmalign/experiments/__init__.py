"""Each chapter's reference experiment, runnable in any profile, and the committed results files.

``python -m mmalign.experiments 00`` (what ``make results CHAPTER=00`` runs with MMALIGN_PROFILE=full)
runs chapter 00's experiment and writes ``results/00_tour.json`` with the profile, date, machine and
seed. A chapter shows that reference table beside the numbers of its live (CI-profile) run.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import platform
from pathlib import Path

import torch

from ..config import Config, load_config, results_dir
from ..data.cache import atomic_write_text

CHAPTERS = {"00": "tour", "01": "dual_encoders", "02": "loss_zoo", "03": "sampling", "04": "memory",
            "05": "depth", "06": "languages", "07": "lightcrl", "08": "codis", "09": "scaling"}


def results_path(chapter: str) -> Path:
    if chapter not in CHAPTERS:
        raise ValueError(f"unknown chapter {chapter!r}; known: {sorted(CHAPTERS)}")
    return results_dir() / f"{chapter}_{CHAPTERS[chapter]}.json"


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.system()} {cpu}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}"


def run_chapter(chapter: str, cfg: Config | None = None, progress: bool = True) -> dict:
    """Run a chapter's experiment in ``cfg``'s profile: ``{"table": {row: {column: value}}, ...}``."""
    if chapter not in CHAPTERS:
        raise ValueError(f"unknown chapter {chapter!r}; known: {sorted(CHAPTERS)}")
    module = importlib.import_module(f".{CHAPTERS[chapter]}", __name__)
    return module.run(cfg or load_config(), progress=progress)


def write_results(chapter: str, result: dict, cfg: Config, seconds: float) -> Path:
    """Write ``result`` with its provenance to the chapter's committed results file."""
    payload = {
        "chapter": chapter, "profile": cfg.profile, "seed": cfg.seed,
        "date": _dt.date.today().isoformat(), "machine": machine_description(),
        "seconds": round(seconds, 1), **result,
    }
    path = results_path(chapter)
    atomic_write_text(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")  # never half a file
    return path


def load_results(chapter: str) -> dict:
    """The committed reference results of a chapter (written by the full profile)."""
    path = results_path(chapter)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make results CHAPTER={chapter}` to create it")
    return json.loads(path.read_text())
