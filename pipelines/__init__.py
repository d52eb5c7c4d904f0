"""The inference layer: diffusers pipelines and components. Never imports training code."""
# diffusers loads third-party components only from modules already imported: the networks
# (gendistill.models, no training code) are imported here so every saved folder loads.
import gendistill.models.networks  # noqa: F401
import gendistill.models.msd  # noqa: F401
import gendistill.models.student  # noqa: F401
from .audio import MelVocoder
from .base import ConditionalPipeline, SamplesOutput
from .control import LoudnessControl, SpectralMaskControl
from .ctm import CTMPipeline, CTMScheduler, SoundCTMPipeline
from .msd import MSDPipeline
from .teacher import TeacherPipeline
from .text import TextEncoder, load_text_encoder

__all__ = ["CTMPipeline", "CTMScheduler", "ConditionalPipeline", "LoudnessControl",
           "MSDPipeline", "MelVocoder", "SamplesOutput", "SoundCTMPipeline", "SpectralMaskControl",
           "TeacherPipeline", "TextEncoder", "load_pipeline", "load_text_encoder", "model_folder"]


def load_pipeline(path, **kwargs):
    """Load a model folder: a gendistill pipeline by the class in its model_index.json, or any
    diffusers pipeline with a ``unet`` (or a ``transformer``: DiT) and a ``scheduler`` (DDPM,
    DDIM, flow matching, EDM, ...) and optionally a ``vae`` (a latent teacher) wrapped as a
    ``TeacherPipeline``. A training run's ``output_dir`` stands for its
    ``model/``."""
    import json

    path = model_folder(path)
    index = path / "model_index.json"
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{index}: not a valid model index ({e})") from None
    if not name:
        raise ValueError(f"{index}: no _class_name (which pipeline the folder holds)")
    if isinstance(name, list):  # saved with import shims: [module, class]
        name = name[1]
    classes = {cls.__name__: cls for cls in (TeacherPipeline, CTMPipeline, SoundCTMPipeline,
                                             MSDPipeline)}
    if name in classes:
        return classes[name].from_pretrained(path, **kwargs)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    network = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if network is None or not hasattr(pipe, "scheduler"):
        raise ValueError(f"{index}: {name} has no unet (or transformer) and scheduler to use "
                         f"as a teacher")
    encoder = getattr(pipe, "text_encoder", None)
    if encoder is not None:
        from .text import MINILM

        raise ValueError(f"{index}: {name}'s text encoder ({type(encoder).__name__}) is not "
                         f"supported; gendistill's text-conditional teachers encode prompts with "
                         f"{MINILM}")
    return TeacherPipeline(unet=network, scheduler=pipe.scheduler,
                           vae=getattr(pipe, "vae", None))


def model_folder(path):
    """``path`` itself when it holds a model_index.json, else a training run's ``path/model``."""
    from pathlib import Path

    path = Path(path)
    if (path / "model_index.json").is_file():
        return path
    if (path / "model" / "model_index.json").is_file():
        return path / "model"
    raise FileNotFoundError(f"not a model folder (no model_index.json in {path} or "
                            f"{path / 'model'})")
