"""Raw networks F(x, timestep, cond) in the diffusers calling convention.

Images use diffusers' own UNets (``UNet2DModel`` for class labels, ``UNet2DConditionModel`` for
text cross-attention) or transformers (``network.type=dit``: ``DiTTransformer2DModel`` for class
labels, ``PixArtTransformer2DModel`` for text); vectors use ``MLPNet``. The adapters that turn
any of them into a denoiser live in ``gendistill.diffusion.teachers``.
"""
from __future__ import annotations

import torch
from diffusers import (DiTTransformer2DModel, ModelMixin, PixArtTransformer2DModel,
                       UNet2DConditionModel, UNet2DModel)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import LabelEmbedding, TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn


class MLPBlock(nn.Module):
    """Residual MLP block: the (time + class) embedding is added after the first layer."""

    def __init__(self, width: int, emb_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.emb = nn.Linear(emb_dim, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        r = nn.functional.silu(self.fc1(self.norm(h)) + self.emb(emb))
        return h + self.fc2(r)


class MLPNet(ModelMixin, ConfigMixin):
    """MLP for vector data (e.g. 2-D points), called like a diffusers UNet."""

    @register_to_config
    def __init__(self, in_dim: int = 2, width: int = 256, depth: int = 4, emb_dim: int = 128,
                 num_class_embeds: int | None = None):
        super().__init__()
        self.time_proj = Timesteps(emb_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(emb_dim, emb_dim)
        self.class_embedding = nn.Embedding(num_class_embeds, emb_dim) if num_class_embeds else None
        self.conv_in = nn.Linear(in_dim, width)
        self.hidden_layers = nn.ModuleList(MLPBlock(width, emb_dim) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width)
        self.conv_out = nn.Linear(width, in_dim)

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                return_dict: bool = True):
        t = torch.as_tensor(timestep, device=sample.device, dtype=sample.dtype)
        t = t.expand(sample.shape[0]) if t.ndim == 0 else t
        emb = self.time_embedding(self.time_proj(t).to(sample.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels must be given to a class-conditional MLPNet")
            emb = emb + self.class_embedding(class_labels)
        h = self.conv_in(sample)
        for block in self.hidden_layers:
            h = block(h, emb)
        out = self.conv_out(nn.functional.silu(self.norm_out(h)))
        return UNet2DOutput(sample=out) if return_dict else (out,)


NETWORK_CLASSES = {c.__name__: c for c in (UNet2DModel, UNet2DConditionModel, MLPNet,
                                            DiTTransformer2DModel, PixArtTransformer2DModel)}
NETWORK_TYPES = ("unet", "dit")


def without_label_dropout(net: nn.Module) -> nn.Module:
    """DiT's label embedding drops 10 % of the labels itself in training mode; gendistill drops
    conditions where the method says so (the teacher's CFG dropout), never inside a student."""
    for module in net.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    return net


def build_transformer(data_shape: tuple[int, ...], num_classes: int | None,
                      text_dim: int | None, width: int, depth: int, heads: int,
                      patch_size: int) -> ModelMixin:
    """A diffusers DiT of ``depth`` blocks of ``width`` channels on ``patch_size`` patches:
    ``DiTTransformer2DModel`` (class labels; its label table's extra row is the null class) or
    ``PixArtTransformer2DModel`` (text token states, projected to the width)."""
    channels_in, height, _width = data_shape
    if width % heads:
        raise ValueError(f"network.width ({width}) must be a multiple of network.heads ({heads})")
    if height % patch_size:
        raise ValueError(f"network.patch_size ({patch_size}) must divide the sample size "
                         f"({height})")
    common = dict(num_attention_heads=heads, attention_head_dim=width // heads,
                  in_channels=channels_in, out_channels=channels_in, num_layers=depth,
                  sample_size=height, patch_size=patch_size)
    if text_dim:
        return PixArtTransformer2DModel(cross_attention_dim=width, caption_channels=text_dim,
                                        use_additional_conditions=False, **common)
    if not num_classes:
        raise ValueError("network.type=dit needs class labels or prompts (DiTTransformer2DModel "
                         "is class-conditional)")
    return DiTTransformer2DModel(num_embeds_ada_norm=num_classes, **common)


def build_network(data_shape: tuple[int, ...], num_classes: int | None = None,
                  cross_attention_dim: int | None = None, channels=(32, 64), layers_per_block=1,
                  attention: bool = True, width: int = 256, depth: int = 4,
                  network_type: str = "unet", heads: int = 4, patch_size: int = 2
                  ) -> ModelMixin:
    """The raw network for one sample shape: MLP for vectors, a diffusers UNet or DiT
    (``network_type``) for (C, H, W).

    Class-conditional networks get one extra class embedding, the null class used by CFG.
    """
    num_class_embeds = num_classes + 1 if num_classes else None
    if len(data_shape) == 1:
        return MLPNet(in_dim=data_shape[0], width=width, depth=depth,
                      num_class_embeds=num_class_embeds)
    if len(data_shape) != 3:
        raise ValueError(f"cannot build a network for samples of shape {tuple(data_shape)}")
    if network_type not in NETWORK_TYPES:
        raise ValueError(f"network.type must be one of {', '.join(NETWORK_TYPES)}, got "
                         f"{network_type!r}")
    if network_type == "dit":
        return build_transformer(data_shape, num_classes, cross_attention_dim, width, depth,
                                 heads, patch_size)
    channels_in, height, _width = data_shape
    channels = tuple(int(c) for c in channels)
    groups = min(8, channels[0])
    common = dict(sample_size=height, in_channels=channels_in, out_channels=channels_in,
                  block_out_channels=channels, layers_per_block=layers_per_block,
                  norm_num_groups=groups, attention_head_dim=8)
    n = len(channels)
    if cross_attention_dim:
        down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
        up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
        return UNet2DConditionModel(down_block_types=down, up_block_types=up,
                                    cross_attention_dim=cross_attention_dim, **common)
    attn_down = "AttnDownBlock2D" if attention else "DownBlock2D"
    attn_up = "AttnUpBlock2D" if attention else "UpBlock2D"
    down = ("DownBlock2D",) + (attn_down,) * (n - 1)
    up = (attn_up,) * (n - 1) + ("UpBlock2D",)
    return UNet2DModel(down_block_types=down, up_block_types=up,
                       num_class_embeds=num_class_embeds, **common)


WIDENABLE = (UNet2DModel, MLPNet)


@torch.no_grad()
def widen_network(network: nn.Module, factor: int, noise: float = 0.1,
                  generator: torch.Generator | None = None) -> nn.Module:
    """The network with ``factor`` times its channels (UNet) or hidden width (MLP) computing
    the same function (Net2WiderNet, Chen et al. 2016): every unit becomes ``factor`` adjacent
    copies, and a layer reading copies splits each weight among them. The split is uneven by
    a zero-sum noise of ``noise`` times the weights' spread, so the copies' gradients differ
    and they learn apart; the output is still the network's exactly (up to rounding).

    GroupNorm keeps its group count, so each group holds the copies of one original group and
    sees its statistics; a UNet's attention heads grow ``factor``-fold with k scaled by
    1 / sqrt(factor), which keeps q.k / sqrt(head dim); the sinusoidal time features grow to the
    same frequencies and more, the new ones unread at first."""
    if not isinstance(network, WIDENABLE):
        raise ValueError(f"widening supports {', '.join(c.__name__ for c in WIDENABLE)}, "
                         f"got {type(network).__name__}")
    k = int(factor)
    if k != factor or k < 1:
        raise ValueError(f"the widening factor must be a whole number >= 1, got {factor}")
    config = dict(network.config)
    if isinstance(network, MLPNet):
        config["width"] *= k
    else:
        if config.get("time_embedding_type") != "positional" or config.get("freq_shift"):
            raise ValueError("widening a UNet needs its positional time embedding with "
                             "freq_shift 0")
        if config.get("time_embedding_dim") is not None:
            config["time_embedding_dim"] *= k
        config["block_out_channels"] = [c * k for c in config["block_out_channels"]]
        if config.get("attention_head_dim"):  # None: one head as wide as the block already
            config["attention_head_dim"] *= k
    wide = type(network).from_config(config)
    old = dict(network.named_modules())
    keys = {id(module.to_k) for module in wide.modules() if hasattr(module, "to_k")}
    for name, module in wide.named_modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        source = old[name]
        if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
            module.weight.copy_(repeat_units(source.weight, module.weight.shape, 0))
            module.bias.copy_(repeat_units(source.bias, module.bias.shape, 0))
        elif isinstance(module, nn.Embedding):
            module.weight.copy_(repeat_units(source.weight, module.weight.shape, 1))
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            if name == "time_embedding.linear_1" and isinstance(network, UNet2DModel):
                weight = sinusoid_columns(source.weight, module.weight.shape[1], k)
            else:
                weight = split_inputs(source.weight, module.weight.shape[1], noise, generator)
            weight = repeat_units(weight, module.weight.shape, 0)
            bias = None if source.bias is None else repeat_units(source.bias,
                                                                 module.bias.shape, 0)
            if id(module) in keys:
                weight, bias = weight / k ** 0.5, None if bias is None else bias / k ** 0.5
            module.weight.copy_(weight)
            if bias is not None:
                module.bias.copy_(bias)
        else:
            raise ValueError(f"cannot widen {name} ({type(module).__name__})")
    return wide


def repeat_units(tensor: torch.Tensor, shape: torch.Size, dim: int) -> torch.Tensor:
    """Each entry along ``dim`` as adjacent copies, up to ``shape[dim]`` (unchanged if equal)."""
    copies = shape[dim] // tensor.shape[dim]
    return tensor.repeat_interleave(copies, dim=dim) if copies > 1 else tensor


def split_inputs(weight: torch.Tensor, width: int, noise: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """A weight reading ``width`` inputs, each old input now ``width / n`` adjacent copies:
    each copy gets 1 / copies of the weight plus a noise that sums to zero over the copies."""
    copies = width // weight.shape[1]
    if copies == 1:
        return weight
    shape = (weight.shape[0], weight.shape[1], copies) + weight.shape[2:]
    jitter = torch.randn(shape, generator=generator, dtype=weight.dtype)
    jitter = (jitter - jitter.mean(2, keepdim=True)) * noise * weight.std() / copies
    split = weight.unsqueeze(2) / copies + jitter.to(weight.device)
    return split.flatten(1, 2)


def sinusoid_columns(weight: torch.Tensor, width: int, k: int) -> torch.Tensor:
    """The first time layer's weight for ``width`` sinusoids [cos | sin] (or [sin | cos]) with
    frequencies exp(-ln(1e4) j / (width/2)): the old frequency i is the new k i."""
    half_old, half_new = weight.shape[1] // 2, width // 2
    wide = weight.new_zeros(weight.shape[0], width)
    index = torch.arange(half_old, device=weight.device) * k
    wide[:, index] = weight[:, :half_old]
    wide[:, half_new + index] = weight[:, half_old:]
    return wide
