"""Teachers and distilled students shipped inside the package, trained by the project's own
configs (see Makefile: ``make teachers``, ``make students``)."""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"


def _shipped(kind: str, name: str, config: str) -> Path:
    path = ASSETS / kind / name
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"no shipped {kind[:-1]} for {name!r} at {path}; train one with "
                                f"`gendistill train configs/{config}/{name}.yaml`")
    return path


def builtin_teacher(name: str) -> Path:
    """The shipped teacher folder for a built-in dataset (``make teachers`` rebuilds them)."""
    return _shipped("teachers", name, "teacher")


def builtin_student(name: str) -> Path:
    """The shipped 1-step CTM student of a built-in dataset's shipped teacher
    (``make students`` rebuilds them)."""
    return _shipped("students", name, "ctm")
