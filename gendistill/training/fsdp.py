"""Fully sharded data parallel training (``train.fsdp=true``): PyTorch's FSDP2 ``fully_shard``.

Each of N processes holds 1/N of the trained network's weights, gradients and optimiser state,
of its EMA and target copies, and of a second player (a fake score, a discriminator); a block's
weights are gathered for its forward and backward and freed after. The loop shards the network
itself, so FSDP runs under any launcher (torchrun, ``accelerate launch --multi_gpu``) and on CPU
processes with gloo. Checkpoints and exports hold full tensors: every rank joins the gather,
rank 0 writes. Needs torch 2.6 (``fully_shard``); the loop imports this module only with
``train.fsdp``.
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

# rank 0 alone receives the gathered tensors, on CPU (accelerate writes rank 0's state)
GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
# every rank reads the same file and keeps its own shard
SCATTER = StateDictOptions(full_state_dict=True)

log = logging.getLogger("gendistill")


def is_sharded(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def shard(module: nn.Module, mesh: DeviceMesh, trained: bool) -> nn.Module:
    """Shard ``module`` in place: each entry of its outermost ModuleLists (a UNet's down / up
    blocks, a DiT's transformer blocks) is one unit, gathered only while it runs; the root holds
    the rest.

    The trained network's root keeps its weights gathered from its forward to its backward:
    the ones the graph holds (CTM's adaptive weight differentiates by the last layer's). A copy
    that is never trained (EMA, target) frees them after every forward, so that it is shards
    again when it is averaged. fully_shard moves the weights to the mesh's device one unit at
    a time as it shards them, so a GPU never receives the whole network."""
    for sub in list(module.modules()):
        if isinstance(sub, nn.ModuleList):
            for block in sub:
                if list(block.parameters()) and not is_sharded(block):
                    fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh, reshard_after_forward=not trained)
    return module


def point_optimizer_at(optimizer: torch.optim.Optimizer, names: dict[int, str],
                       module: nn.Module):
    """Give a fresh optimiser (no state yet) ``module``'s sharded parameters in place of the
    ones it was built with, keeping its groups and settings; ``names`` maps each old
    parameter's id to its name (sharding keeps the names)."""
    if optimizer.state:
        raise ValueError("the optimiser has stepped already: shard before training")
    sharded = dict(module.named_parameters())
    for group in optimizer.param_groups:
        group["params"] = [sharded[names[id(p)]] for p in group["params"]]


def shard_training(players: list[tuple[nn.Module, torch.optim.Optimizer]],
                   copies: list[nn.Module], accelerator) -> nn.Module | None:
    """Shard each trained network (the model, and a second player such as DMD2's fake score),
    pointing its fresh optimiser at the shards, and the copies that are never trained (EMA,
    target) alike. Returns rank 0's unsharded copy of the model (the first player), for
    exports to gather into (None on the other ranks)."""
    model = players[0][0]
    template = copy.deepcopy(model).cpu() if accelerator.is_main_process else None
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    for module, optimizer in players:
        names = {id(p): name for name, p in module.named_parameters()}
        shard(module, mesh, trained=True)
        point_optimizer_at(optimizer, names, module)
    for held in copies:
        shard(held, mesh, trained=False)
    if accelerator.is_main_process:
        log.info("sharded over %d processes: rank 0 holds %d of the network's %d weights",
                 accelerator.num_processes, sum(p.to_local().numel() for p in model.parameters()),
                 sum(p.numel() for p in model.parameters()))
    return template


def full_copy(module: nn.Module, template: nn.Module | None) -> nn.Module | None:
    """Gather a sharded module's weights into ``template`` (an unsharded copy of it, held by
    rank 0); every rank must call it. Returns the template (None on the other ranks)."""
    state = get_model_state_dict(module, options=GATHER)
    if template is None:
        return None
    template.load_state_dict(state)
    return template


class FullState:
    """A sharded module, with its optimiser where given, checkpointed as full tensors through
    accelerate's ``register_for_checkpointing`` (it asks every rank for ``state_dict`` and
    writes rank 0's).

    An optimiser that has not stepped yet (a discriminator before its phase) is saved as None
    and left fresh on load: torch's gather would first step it once at lr 0, and that step
    would count in Adam's bias correction."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer | None = None):
        self.module, self.optimizer = module, optimizer

    def state_dict(self) -> dict:
        if self.optimizer is None or not self.optimizer.state:
            return {"model": get_model_state_dict(self.module, options=GATHER),
                    "optimizer": None}
        model, optimizer = get_state_dict(self.module, self.optimizer, options=GATHER)
        return {"model": model, "optimizer": optimizer}

    def load_state_dict(self, state: dict):
        if state.get("optimizer") is None:
            set_model_state_dict(self.module, state["model"], options=SCATTER)
        else:
            set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"], options=SCATTER)
