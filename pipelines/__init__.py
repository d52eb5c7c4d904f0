"""The inference layer: diffusers pipelines and components. Never imports training code."""
# diffusers loads third-party components only from modules already imported: the networks
# (gendistill.models, no training code) are imported here so every saved folder loads.
import gendistill.models.networks  # noqa: F401
import gendistill.models.msd  # noqa: F401
import gendistill.models.start  # noqa: F401
import gendistill.models.student  # noqa: F401
from .audio import HifiGanVocoder, MelVocoder
from .base import ConditionalPipeline, SamplesOutput
from .control import LoudnessControl, SpectralMaskControl
from .ctm import CTMPipeline, CTMScheduler, SoundCTMPipeline
from .msd import MSDPipeline
from .teacher import TeacherPipeline
from .text import TextEncoder, load_text_encoder

__all__ = ["CTMPipeline", "CTMScheduler", "ConditionalPipeline", "HifiGanVocoder",
           "LoudnessControl", "MSDPipeline", "MelVocoder", "SamplesOutput", "SoundCTMPipeline",
           "SpectralMaskControl", "TeacherPipeline", "TextEncoder", "load_pipeline",
           "load_text_encoder", "model_folder"]


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
    teacher = TeacherPipeline(unet=network, scheduler=pipe.scheduler,
                              vae=getattr(pipe, "vae", None), text_encoder=encoder,
                              tokenizer=tokenizer if encoder is not None else None)
    vocoder = getattr(pipe, "vocoder", None)
    if vocoder is not None:
        teacher.register_modules(vocoder=foreign_vocoder(index, name, vocoder, teacher))
    return teacher


def foreign_vocoder(index, name, vocoder, teacher):
    """A foreign audio teacher's vocoder as a component that also makes its data: AudioLDM's
    SpeechT5 HiFi-GAN, whose input width must be the mel bins the teacher's samples have."""
    from .base import data_shape

    if type(vocoder).__name__ != "SpeechT5HifiGan":
        raise ValueError(f"{index}: {name} has a {type(vocoder).__name__} vocoder; supported: "
                         f"SpeechT5HifiGan (AudioLDM) and gendistill's MelVocoder")
    _, frames, mels = data_shape(teacher)
    if mels != vocoder.config.model_in_dim:
        raise ValueError(f"{index}: {name}'s samples have {mels} mel bins, its vocoder "
                         f"(SpeechT5HifiGan) reads {vocoder.config.model_in_dim}")
    return HifiGanVocoder.wrap(vocoder, frames)


def check_text_encoder(index, name, pipe, network, encoder, tokenizer):
    """A foreign teacher's prompts are encoded by its own text encoder into the network's
    cross-attention (or, AudioLDM, its class embedding): one encoder with its tokenizer, whose
    width the network reads."""
    from .base import base_config
    from .text import reads_text_embeds

    extra = [key for key in ("text_encoder_2", "text_encoder_3")
             if getattr(pipe, key, None) is not None]
    if extra:
        raise ValueError(f"{index}: {name} has several text encoders ({', '.join(extra)}); "
                         f"teachers with one text encoder are supported")
    if tokenizer is None:
        raise ValueError(f"{index}: {name} has a text_encoder but no tokenizer")
    cfg = base_config(network)
    if reads_text_embeds(network):  # AudioLDM: CLAP's projected embedding as class embedding
        width, reads = cfg.get("projection_class_embeddings_input_dim"), "class embedding"
        gives = getattr(encoder.config, "projection_dim", None)
        if not hasattr(encoder, "text_projection"):
            raise ValueError(f"{index}: {name}'s network reads a projected text embedding, its "
                             f"text encoder ({type(encoder).__name__}) has no projection")
    else:
        width = cfg.get("caption_channels") or cfg.get("cross_attention_dim")  # PixArt: T5's
        reads, gives = "cross-attention", encoder.config.hidden_size
    if width != gives:
        raise ValueError(f"{index}: {name}'s text encoder ({type(encoder).__name__}) gives "
                         f"{gives}-wide states, its network's {reads} reads {width}")


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
