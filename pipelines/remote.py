"""Saving pipelines so that diffusers' own ``DiffusionPipeline.from_pretrained(dir,
trust_remote_code=True)`` loads them without the caller importing gendistill.

diffusers imports third-party classes only from code that ships in the folder: a
``pipeline.py`` beside model_index.json, and ``<component>/<module>.py`` per component. Ours are
one-line modules that import the classes from the installed gendistill package.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

PIPELINE_MODULE = "pipeline"


def _shim(module: str, name: str) -> str:
    return (f'"""Loads {name} from the installed gendistill package (pip install gendistill)."""\n'
            f"from {module} import {name}  # noqa: F401\n")


def save_with_remote_code(pipe, folder: str | Path) -> Path:
    """``pipe.save_pretrained(folder)``, plus the small modules diffusers needs to find our
    classes; model_index.json then names those modules instead of python packages."""
    folder = Path(folder)
    pipe.save_pretrained(folder)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    cls = type(pipe)
    (folder / f"{PIPELINE_MODULE}.py").write_text(_shim("gendistill.pipelines", cls.__name__))
    index["_class_name"] = [PIPELINE_MODULE, cls.__name__]
    for name, component in pipe.components.items():
        entry = index.get(name)
        if component is None or not isinstance(entry, list) or entry[0] in ("diffusers",
                                                                             "transformers"):
            continue
        index[name] = _write_shim(folder / name, name, component)
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder


def _write_shim(directory: Path, name: str, component) -> list:
    """``<name>_module.py`` in the component's directory, importing its class; the component's
    model_index entry."""
    module_name = f"{name}_module"
    comp_cls = type(component)
    (directory / f"{module_name}.py").write_text(_shim(comp_cls.__module__, comp_cls.__name__))
    return [module_name, comp_cls.__name__]


def save_component(folder: str | Path, name: str, component) -> None:
    """Replace one component of a saved pipeline folder (None removes it) without writing the
    others again: its subfolder with its shim, and its model_index.json entry."""
    folder = Path(folder)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    if component is None:
        index[name] = [None, None]
    else:  # saved whole beside the old one, then swapped in
        staged = folder / f".{name}.tmp"
        shutil.rmtree(staged, ignore_errors=True)
        component.save_pretrained(staged)
        index[name] = _write_shim(staged, name, component)
        shutil.rmtree(folder / name, ignore_errors=True)
        staged.rename(folder / name)
    tmp = index_path.with_suffix(".json.tmp")  # written whole, then renamed
    tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    tmp.replace(index_path)
    if component is None:  # only once the index no longer names it
        shutil.rmtree(folder / name, ignore_errors=True)


def shims_are_ours(folder: str | Path) -> bool:
    """True when every code file the folder ships is exactly one of our one-line import shims,
    so loading it runs nothing but gendistill's own, installed code."""
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    for name, entry in index.items():
        if not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            continue
        module, cls_name = entry
        path = folder / f"{module}.py" if name == "_class_name" else folder / name / f"{module}.py"
        if not path.exists():
            continue
        text = path.read_text()
        lines = [line for line in text.splitlines() if line.startswith("from ")]
        if len(lines) != 1 or not lines[0].startswith("from gendistill.") \
                or text != _shim(lines[0].split()[1], cls_name):
            return False
    return True
