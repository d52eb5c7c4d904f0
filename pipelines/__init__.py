"""The inference layer: diffusers pipelines and components. Never imports training code."""
from .audio import MelVocoder
from .base import ConditionalPipeline, SamplesOutput
from .teacher import TeacherPipeline
from .text import TextEncoder, load_text_encoder

__all__ = ["ConditionalPipeline", "MelVocoder", "SamplesOutput", "TeacherPipeline", "load_pipeline",
           "TextEncoder", "load_text_encoder"]


def load_pipeline(path, **kwargs):
    """Load any gendistill pipeline folder by the class named in its model_index.json."""
    import json
    from pathlib import Path

    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"not a model folder (no model_index.json): {path}")
    name = json.loads(index.read_text()).get("_class_name")
    classes = {cls.__name__: cls for cls in (TeacherPipeline,)}
    if name not in classes:
        raise ValueError(f"{index}: unknown pipeline class {name!r} "
                         f"(known: {', '.join(classes)})")
    return classes[name].from_pretrained(path, **kwargs)
