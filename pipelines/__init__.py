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
    encoder, tokenizer = getattr(pipe, "text_encoder", None), getattr(pipe, "tokenizer", None)
    if encoder is not None:
        check_text_encoder(index, name, pipe, network, encoder, tokenizer)
    return TeacherPipeline(unet=network, scheduler=pipe.scheduler,
                           vae=getattr(pipe, "vae", None), text_encoder=encoder,
                           tokenizer=tokenizer if encoder is not None else None)


def check_text_encoder(index, name, pipe, network, encoder, tokenizer):
    """A foreign teacher's prompts are encoded by its own text encoder into the network's
    cross-attention: one encoder with its tokenizer, whose width the network reads."""
    from .base import base_config

    extra = [key for key in ("text_encoder_2", "text_encoder_3")
             if getattr(pipe, key, None) is not None]
    if extra:
        raise ValueError(f"{index}: {name} has several text encoders ({', '.join(extra)}); "
                         f"teachers with one text encoder are supported")
    if tokenizer is None:
        raise ValueError(f"{index}: {name} has a text_encoder but no tokenizer")
    cfg = base_config(network)
    width = cfg.get("caption_channels") or cfg.get("cross_attention_dim")  # PixArt: T5 width
    if width != encoder.config.hidden_size:
        raise ValueError(f"{index}: {name}'s text encoder ({type(encoder).__name__}) gives "
                         f"{encoder.config.hidden_size}-wide states, its network's "
                         f"cross-attention reads {width}")


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
