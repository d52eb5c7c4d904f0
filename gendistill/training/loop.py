"""The training loop every method shares, on accelerate.

A method gives ``model`` (what the optimiser trains), ``loss(batch, step) -> (loss, logs)``
and ``export(ema_model, folder)``. A method with a second player (CTM's discriminator) also
gives ``auxiliary = (module, optimiser)`` and ``auxiliary_loss(batch, step) -> (loss, logs)``
(None while the player sits out), stepped after the model on every iteration. The loop does
the rest: optimiser and warm-up, mixed
precision, gradient clipping, EMA, tqdm progress, tensorboard logs, checkpoints and resume,
and a NaN guard that stops with the last good checkpoint intact.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from ..config import Config, to_dict
from .ema import EMA

log = logging.getLogger("gendistill")


class TrainingError(RuntimeError):
    pass


class StepCounter:
    """The global step, saved with accelerate's checkpoints."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = int(state["step"])


def latest_checkpoint(output_dir: Path) -> Path | None:
    ckpts = sorted((output_dir / "checkpoints").glob("step-*"),
                   key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
    return ckpts[-1] if ckpts else None


def infinite_batches(loader):
    while True:
        yield from loader


def make_accelerator(cfg: Config) -> Accelerator:
    out = Path(cfg.output_dir)
    return Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=cfg.train.cpu,
                       log_with="tensorboard", project_dir=str(out),
                       gradient_accumulation_steps=1)


def train(cfg: Config, method, loader, accelerator: Accelerator | None = None) -> Path:
    """Run ``cfg.train.max_steps`` optimiser steps; return the exported model folder."""
    out = Path(cfg.output_dir)
    accelerator = accelerator or make_accelerator(cfg)
    set_seed(cfg.seed, device_specific=True)
    tc = cfg.train
    model = method.model
    optimizer = getattr(method, "optimizer", None) or torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=tc.lr,
        weight_decay=tc.weight_decay)
    warmup = max(tc.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    method.model = model
    auxiliary = getattr(method, "auxiliary", None)
    if auxiliary is not None:
        auxiliary = method.auxiliary = accelerator.prepare(*auxiliary)
    ema = EMA(accelerator.unwrap_model(model), tc.ema_decay).to(accelerator.device)
    method.ema = ema
    counter = StepCounter()
    # the method's own state (e.g. CTM's target network) is checkpointed with the rest
    accelerator.register_for_checkpointing(ema, counter, *getattr(method, "checkpointed", ()))

    if tc.resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise TrainingError(f"train.resume=true but {out / 'checkpoints'} holds no checkpoint")
        accelerator.load_state(str(ckpt))
        log.info("resumed from %s at step %d", ckpt, counter.step)

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    accelerator.init_trackers("logs")

    first_step = counter.step
    batches = infinite_batches(loader)
    bar = tqdm(total=tc.max_steps, initial=counter.step, desc=f"{cfg.method}",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    start = time.time()
    while counter.step < tc.max_steps:
        model.train()
        batch = next(batches)
        with accelerator.autocast():
            loss, logs = method.loss(batch, counter.step)
        if not torch.isfinite(loss):
            ckpt = latest_checkpoint(out)
            raise TrainingError(f"loss is {loss.item()} at step {counter.step}; stopped before "
                                f"updating weights (last checkpoint: {ckpt or 'none'})")
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        # the norm before clipping is logged: a clip that is active on every step shows here
        grad_norm = accelerator.clip_grad_norm_(
            model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        optimizer.step()
        scheduler.step()
        ema.update(accelerator.unwrap_model(model))
        if auxiliary is not None:
            with accelerator.autocast():
                aux_loss, aux_logs = method.auxiliary_loss(batch, counter.step)
            if aux_loss is not None:
                auxiliary[1].zero_grad(set_to_none=True)
                accelerator.backward(aux_loss)
                auxiliary[1].step()
                logs.update(aux_logs)
        if hasattr(method, "after_step"):
            method.after_step(counter.step)
        counter.step += 1
        bar.update(1)
        if counter.step % tc.log_every == 0 or counter.step == tc.max_steps:
            logs = {"loss": loss.item(), **{k: float(v) for k, v in logs.items()},
                    "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0]}
            accelerator.log(logs, step=counter.step)
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k != "lr"})
        if tc.checkpoint_every > 0 and counter.step % tc.checkpoint_every == 0 \
                and counter.step < tc.max_steps:
            save_checkpoint(accelerator, method, ema, out, counter.step)
    bar.close()
    accelerator.end_training()
    final = out / "model"
    if accelerator.is_main_process:
        export(method, ema, final)
        (out / "train_time.json").write_text(json.dumps(
            {"steps": tc.max_steps, "resumed_at": first_step,
             "seconds": round(time.time() - start, 1), "device": str(accelerator.device)}))
        log.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final


def export(method, ema: EMA, folder: Path):
    """Write the EMA weights as a diffusers folder, replacing an older one only when complete."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    method.export(ema.model, tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def save_checkpoint(accelerator, method, ema, out: Path, step: int):
    ckpt = out / "checkpoints" / f"step-{step}"
    accelerator.save_state(str(ckpt))
    if accelerator.is_main_process:
        export(method, ema, ckpt / "model")


