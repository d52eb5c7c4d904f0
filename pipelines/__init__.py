"""The inference layer: diffusers pipelines and components. Never imports training code."""
# diffusers loads third-party components only from modules already imported: the networks
# (gendistill.models, no training code) are imported here so every saved folder loads.
import gendistill.models.networks  # noqa: F401
import gendistill.models.student  # noqa: F401
from .audio import MelVocoder
from .base import ConditionalPipeline, SamplesOutput
from .ctm import CTMPipeline, CTMScheduler
from .teacher import TeacherPipeline
from .text import TextEncoder, load_text_encoder

__all__ = ["CTMPipeline", "CTMScheduler", "ConditionalPipeline", "MelVocoder", "SamplesOutput", "TeacherPipeline", "load_pipeline",
           "TextEncoder", "load_text_encoder"]


def load_pipeline(path, **kwargs):
    """Load a model folder: a gendistill pipeline by the class in its model_index.json, or any
    diffusers pipeline with a ``unet`` and a ``scheduler`` (DDPM, DDIM, flow matching, EDM, ...)
    wrapped as a ``TeacherPipeline``."""
    import json
    from pathlib import Path

    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"not a model folder (no model_index.json): {path}")
    name = json.loads(index.read_text()).get("_class_name")
    if isinstance(name, list):  # saved with import shims: [module, class]
        name = name[1]
    classes = {cls.__name__: cls for cls in (TeacherPipeline, CTMPipeline)}
    if name in classes:
        return classes[name].from_pretrained(path, **kwargs)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    if not hasattr(pipe, "unet") or not hasattr(pipe, "scheduler"):
        raise ValueError(f"{index}: {name} has no unet and scheduler to use as a teacher")
    return TeacherPipeline(unet=pipe.unet, scheduler=pipe.scheduler)
