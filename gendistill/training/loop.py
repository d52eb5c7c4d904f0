"""The training loop every method shares, on accelerate.

A method gives ``model`` (what the optimiser trains), ``loss(batch, step) -> (loss, logs)``
and ``export(ema_model, folder)``. A method with a second player (CTM's discriminator, DMD2's
fake score) also gives ``auxiliary = (module, optimiser)`` and ``auxiliary_loss(batch, step)``.
Either loss may be None: that player sits the iteration out (DMD2's generator steps every
``gen_update_ratio`` iterations). Both losses are computed, then both players step. The loop
does the rest: optimiser and warm-up, mixed precision, gradient clipping, EMA, sharding
(``train.fsdp``), tqdm progress, tensorboard logs, checkpoints and resume, and a NaN guard that
stops with the last good checkpoint intact.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed
from torch import nn
from tqdm.auto import tqdm

from ..config import FOLDER_KEYS, Config, ConfigError, changed_keys, folder_weights, to_dict
from ..models.networks import without_label_dropout
from .ema import EMA

log = logging.getLogger("gendistill")


class TrainingError(RuntimeError):
    pass


def unwrap(module: nn.Module) -> nn.Module:
    """The module itself, where the loop's ``accelerator.prepare`` wrapped it (DDP on several
    processes): a method's own calls reach its attributes and methods."""
    return getattr(module, "module", module)


@contextmanager
def frozen(module: nn.Module):
    """No gradient into ``module``'s weights from the graphs built inside: a generator's loss
    that reads a discriminator or fake score, whose weights only their own step may update
    (data-parallel training counts each weight's gradient once per step)."""
    trained = [p for p in module.parameters() if p.requires_grad]
    for p in trained:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in trained:
            p.requires_grad_(True)
        # an FSDP2 module that keeps its gathered weights after forward gathered them here
        # with no gradient, and would reuse them so in its own step: drop them
        reshard = getattr(module, "reshard", None)
        if callable(reshard):
            reshard()


def lr_decay(schedule: str, step: int, max_steps: int) -> float:
    """The lr factor after the warm-up at ``step`` of ``max_steps``: 1 (constant), or a cosine
    from 1 to 0 (cosine)."""
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(step, max_steps) / max_steps))


class StepCounter:
    """The global step and the training seconds spent to reach it (over every resume), saved
    with accelerate's checkpoints."""

    def __init__(self):
        self.step = 0
        self.seconds = 0.0

    def state_dict(self):
        return {"step": self.step, "seconds": self.seconds}

    def load_state_dict(self, state):
        self.step = int(state["step"])
        self.seconds = float(state.get("seconds", 0.0))  # older checkpoints kept no time


COMPLETE = "COMPLETE"  # written last into a checkpoint folder: everything before it is on disk


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder whose save was cut short has no marker)."""
    found = [p for p in (output_dir / "checkpoints").glob("step-*")
             if re.fullmatch(r"step-\d+", p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1] if found else None


def batches_from(accelerator, loader, step: int):
    """Batches from the one that an uninterrupted run would see at ``step`` on: epoch
    ``step // len(loader)`` (its order set through ``set_epoch``), its first batches skipped."""
    epoch, skip = divmod(step, len(loader))
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        elif hasattr(getattr(loader, "sampler", None), "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from accelerator.skip_first_batches(loader, skip) if skip else loader
        epoch, skip = epoch + 1, 0


def make_accelerator(cfg: Config, unused_parameters: bool = False) -> Accelerator:
    """``unused_parameters``: some trained weights sit out some steps (DMD2's adversarial head
    before stage 2), which data-parallel training must be told."""
    out = Path(cfg.output_dir)
    handlers = ([DistributedDataParallelKwargs(find_unused_parameters=True)]
                if unused_parameters else [])
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=cfg.train.cpu,
                              kwargs_handlers=handlers, log_with="tensorboard",
                              project_dir=str(out),
                              gradient_accumulation_steps=1,
                              # one scheduler step per update: accelerate's default steps it once
                              # per process, which made the warm-up N x shorter on N processes
                              step_scheduler_with_optimizer=False,
                              dynamo_backend="inductor" if cfg.train.compile else "no")
    return accelerator


def check_accelerator(cfg: Config, accelerator: Accelerator):
    """The process setup the loop supports (a caller's own accelerator is checked too)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        # e.g. an FSDP config on a machine without GPUs: every process would train alone
        raise ConfigError(
            f"launched as {launched} processes (WORLD_SIZE) but accelerate made "
            f"{accelerator.num_processes} of them ({accelerator.distributed_type.value}); "
            f"without GPUs launch with torchrun or accelerate --multi_gpu and train.cpu=true")
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        # they would shard the network but not its EMA and target copies, which the loop keeps
        raise ConfigError(f"accelerate's {accelerator.distributed_type.value} config is not "
                          f"supported; to shard the network launch with --multi_gpu and "
                          f"train.fsdp=true")
    if cfg.train.fsdp:
        check_shardable(cfg, accelerator)


@contextmanager
def run_lock(out: Path, is_main: bool):
    """``output_dir/.lock`` holds the training process's pid: a second training into the same
    folder stops with a clear message (a lock whose process is gone is taken over)."""
    lock = out / ".lock"
    if not is_main:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    if lock.is_file():
        try:
            pid = int(lock.read_text().strip())
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            pass  # stale: its process is gone
        except PermissionError:
            raise TrainingError(f"{out} is locked by another training (pid {pid}); "
                                f"wait for it or use another output_dir") from None
        else:
            if pid != os.getpid():
                raise TrainingError(f"{out} is locked by another training (pid {pid}); "
                                    f"wait for it or use another output_dir")
    lock.write_text(str(os.getpid()))
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


# A run trained beside other work when the machine's 1-minute load average, less the cores the
# run's own processes kept busy, exceeded this on average (another busy thread adds about one).
# The load average lags by a minute, so it is read from the run's second minute on.
OTHER_LOAD_MARGIN = 0.75
LOAD_LAG_SECONDS = 60.0


def is_first_process() -> bool:
    """Rank 0 of a multi-process launch (torchrun, accelerate), or a single process: the one
    that says things once."""
    return os.environ.get("RANK", "0") == "0"


def machine_load() -> float | None:
    """The 1-minute load average (threads running or waiting for a core); None where the OS
    has none (Windows)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


class LoadRecord:
    """The machine's load while this process trains, and the cores the run itself used."""

    def __init__(self):
        self.start = time.time()
        self.loads, self.first = [], None  # first: (wall, cpu) clocks at the first reading

    def read(self):
        load = machine_load()
        if load is None or time.time() - self.start < LOAD_LAG_SECONDS:
            return
        if self.first is None:
            self.first = (time.time(), time.process_time())
        self.loads.append(load)

    def summary(self) -> dict:
        """mean_load, own_cores (this node's training processes) and quiet; None where the
        run was too short or the OS gives no load."""
        if self.first is None or len(self.loads) < 2:
            return {"mean_load": None, "own_cores": None, "quiet": None}
        wall, cpu = time.time() - self.first[0], time.process_time() - self.first[1]
        own = cpu / max(wall, 1e-9) * int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        mean_load = sum(self.loads) / len(self.loads)
        return {"mean_load": round(mean_load, 2), "own_cores": round(own, 2),
                "quiet": mean_load - own <= OTHER_LOAD_MARGIN}


def train(cfg: Config, method, loader, accelerator: Accelerator | None = None) -> Path:
    """Run ``cfg.train.max_steps`` optimiser steps; return the exported model folder."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {out} is a file, not a folder")
    accelerator = accelerator or make_accelerator(cfg, getattr(method, "unused_parameters",
                                                                False))
    check_accelerator(cfg, accelerator)
    with run_lock(out, accelerator.is_main_process), TerminationRequest() as terminate:
        return train_locked(cfg, method, loader, accelerator, terminate)


class TerminationRequest:
    """Catches SIGTERM during training so that the loop can checkpoint before it exits."""

    def __init__(self):
        self.flag = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, _signum, _frame):
        self.flag = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    def requested(self, accelerator) -> bool:
        """True on every rank once any rank was asked to stop (they checkpoint together)."""
        if accelerator.num_processes == 1:
            return self.flag
        flag = torch.tensor(float(self.flag), device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum") > 0)


def train_locked(cfg: Config, method, loader, accelerator: Accelerator,
                 terminate: TerminationRequest) -> Path:
    out = Path(cfg.output_dir)
    set_seed(cfg.seed, device_specific=True)
    tc = cfg.train
    model = method.model
    auxiliary = getattr(method, "auxiliary", None)
    for trained in (model, *(auxiliary[:1] if auxiliary is not None else ())):
        without_label_dropout(trained)
    optimizer = getattr(method, "optimizer", None) or torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=tc.lr,
        weight_decay=tc.weight_decay)
    # before any sharding: FSDP modules cannot be deep-copied
    ema = EMA(unwrap(model), tc.ema_decay)
    method.ema = ema
    template = None  # rank 0's unsharded copy, that a sharded run's exports gather into
    if tc.fsdp:  # FSDP2 needs torch 2.6 (check_shardable said so); moves each unit itself
        from .fsdp import FullState, full_copy, shard_training

        copies = [ema.model, *(held.model for held in getattr(method, "checkpointed", ())
                               if isinstance(held, EMA))]  # CTM's target network
        template = shard_training([(model, optimizer), *([auxiliary] if auxiliary else [])],
                                  copies, accelerator)
    else:
        ema.to(accelerator.device)
    warmup = max(tc.warmup_steps, 1)
    counter = StepCounter()
    # the warm-up counts the model's own updates (DMD2's generator steps 1 in N); the decay
    # reads the run's step, restored on resume, so it ends at max_steps whatever steps the model
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup)
        * lr_decay(tc.lr_schedule, counter.step, tc.max_steps))
    # the method's own state (e.g. CTM's target network) is checkpointed with the rest
    checkpointed = (ema, counter, *getattr(method, "checkpointed", ()))
    if tc.fsdp:  # sharded weights are checkpointed gathered, the optimiser's state with them
        loader = accelerator.prepare(loader)
        checkpointed = (FullState(model, optimizer), scheduler,
                        *([FullState(*auxiliary)] if auxiliary else []),
                        *(FullState(held) if isinstance(held, EMA) else held
                          for held in checkpointed))
    else:
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader,
                                                                  scheduler)
        if auxiliary is not None:
            auxiliary = method.auxiliary = accelerator.prepare(*auxiliary)
    method.model = model
    accelerator.register_for_checkpointing(*checkpointed)

    def ema_model() -> nn.Module | None:
        """The EMA network to export, whole (on rank 0; every rank must call this)."""
        return full_copy(ema.model, template) if tc.fsdp else ema.model

    if tc.resume:
        check_resumable(out, cfg)
        resume_from_checkpoint(accelerator, out, counter)
        if counter.step >= tc.max_steps:
            raise TrainingError(f"train.max_steps={tc.max_steps} but the checkpoint is at step "
                                f"{counter.step}: nothing to train (the finished model/ is kept)")
    elif checkpoints(out) and not tc.overwrite:
        raise TrainingError(f"{out} holds another run's checkpoints; resume it with "
                            f"train.resume=true, or start afresh with train.overwrite=true")

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if tc.overwrite and not tc.resume:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        if not tc.resume:  # what the input folders held, for a later resume to check
            (out / "inputs.json").write_text(json.dumps(folder_weights(cfg), indent=2))
    accelerator.init_trackers("logs")

    first_step = counter.step
    batches = batches_from(accelerator, loader, counter.step)
    bar = tqdm(total=tc.max_steps, initial=counter.step, desc=f"{cfg.method}",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    start, seconds_before = time.time(), counter.seconds
    load = LoadRecord()  # quiet, or beside other work

    def checkpoint():
        counter.seconds = seconds_before + time.time() - start
        save_checkpoint(accelerator, method, ema_model, out, counter.step,
                        tc.keep_checkpoints)

    nonfinite_in_a_row, nonfinite_total = 0, 0
    loss = grad_norm = torch.tensor(float("nan"))  # logged values until the model first steps
    # what is logged: under the two time-scale rule the logged iteration can be one where
    # only the auxiliary network stepped
    latest = {}
    clip = tc.grad_clip if tc.grad_clip > 0 else float("inf")
    while counter.step < tc.max_steps:
        model.train()
        batch = next(batches)
        with accelerator.autocast():
            step_loss, logs = method.loss(batch, counter.step)
        # a loss of None: the model sits this iteration out (DMD2's two time-scale rule)
        players = [] if step_loss is None else [(step_loss, model, optimizer, scheduler)]
        if auxiliary is not None:
            with accelerator.autocast():
                aux_loss, aux_logs = method.auxiliary_loss(batch, counter.step)
            if aux_loss is not None:
                players.append((aux_loss, auxiliary[0], auxiliary[1], None))
                logs.update(aux_logs)
        finite = True
        for player_loss, module, player_optimizer, _ in players:
            player_optimizer.zero_grad(set_to_none=True)
            accelerator.backward(player_loss)
            # the norm before clipping is logged: a clip active on every step shows here
            norm = accelerator.clip_grad_norm_(module.parameters(), clip)
            if tc.fsdp and hasattr(norm, "full_tensor"):  # a sharded norm: each rank's part
                norm = norm.full_tensor()
            finite = finite and bool(torch.isfinite(player_loss) and torch.isfinite(norm))
            if module is model:
                loss, grad_norm = player_loss, norm
        if not finite:
            # skip the update; a run that keeps producing NaN/Inf stops with its last good
            # checkpoint untouched
            nonfinite_in_a_row += 1
            nonfinite_total += 1
            accelerator.log({"nonfinite_steps": nonfinite_total}, step=counter.step)
            log.warning("step %d: loss %s, grad norm %s: update skipped", counter.step,
                        float(players[0][0]), float(grad_norm))
            if nonfinite_in_a_row >= tc.max_nonfinite:
                raise TrainingError(
                    f"{nonfinite_in_a_row} steps in a row with a non-finite loss or gradient "
                    f"(loss {float(players[0][0])} at step {counter.step}); stopped (last "
                    f"checkpoint: {latest_checkpoint(out) or 'none'})")
            continue
        nonfinite_in_a_row = 0
        # the generator's newest logs (kept while only the auxiliary network steps), with the
        # auxiliary network's of this iteration: a finished phase's keys drop out
        latest = dict(logs) if step_loss is not None else {**latest, **logs}
        for _loss, module, player_optimizer, player_scheduler in players:
            player_optimizer.step()
            if player_scheduler is not None:
                player_scheduler.step()
            if module is model:
                ema.update(accelerator.unwrap_model(model))
        if hasattr(method, "after_step"):
            method.after_step(counter.step)
        counter.step += 1
        bar.update(1)
        load.read()
        if counter.step % tc.log_every == 0 or counter.step == tc.max_steps:
            logs = {"loss": loss.item(), **{k: float(v) for k, v in latest.items()},
                    "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0]}
            accelerator.log(logs, step=counter.step)
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k != "lr"})
        if tc.checkpoint_every > 0 and counter.step % tc.checkpoint_every == 0 \
                and counter.step < tc.max_steps:
            checkpoint()
        if terminate.requested(accelerator) and counter.step < tc.max_steps:
            # preempted (a cluster's SIGTERM): save where we are, then stop
            if not (out / "checkpoints" / f"step-{counter.step}").is_dir():
                checkpoint()
            raise TrainingError(f"stopped by SIGTERM at step {counter.step}; checkpoint saved, "
                                f"continue with train.resume=true")
    bar.close()
    if not tc.fsdp:  # sharded ranks hold different parts by design
        check_ranks_agree(accelerator, accelerator.unwrap_model(model), ema,
                          *([] if auxiliary is None else [accelerator.unwrap_model(auxiliary[0])]))
    final = out / "model"
    exported = ema_model()
    if accelerator.is_main_process:
        export(method, exported, final)
        # seconds: the whole run's training time, over every resume; seconds_this_run: this
        # process's part, from resumed_at
        this_run = time.time() - start
        (out / "train_time.json").write_text(json.dumps(
            {"steps": tc.max_steps, "resumed_at": first_step,
             "seconds": round(seconds_before + this_run, 2),
             "seconds_this_run": round(this_run, 2), "device": str(accelerator.device),
             **load.summary()}))  # of this part (seconds_this_run)
        log.info("saved %s", final)
    accelerator.wait_for_everyone()  # every rank returns once the model is exported
    # the trackers end here; the process group stays for what the run does next (MSD's next
    # student, its assembly) and is torn down by the CLI on its way out
    for tracker in accelerator.trackers:
        tracker.finish()
    return final


def check_shardable(cfg: Config, accelerator):
    """train.fsdp=true needs several processes, and the settings the sharded loop supports."""
    if accelerator.num_processes < 2:
        raise ConfigError("train.fsdp=true shards the network over processes, but this run has "
                          "one; launch with torchrun --nproc_per_node N or accelerate launch "
                          "--multi_gpu --num_processes N")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        raise ConfigError(f"train.fsdp=true needs torch 2.6 or newer (FSDP2's fully_shard); "
                          f"this is torch {torch.__version__}") from None
    if cfg.train.mixed_precision == "fp16":  # its loss scaler steps accelerate's optimisers
        raise ConfigError("train.fsdp=true needs train.mixed_precision no or bf16, got fp16")
    if cfg.train.compile:
        raise ConfigError("train.fsdp=true and train.compile=true cannot be combined")


def check_ranks_agree(accelerator, *modules):
    """Data-parallel ranks must end with the same weights (rank 0 alone saves them): a rank
    that drifted (a missed all-reduce, a rank-local update) stops the run instead."""
    if accelerator.num_processes == 1:
        return
    digest = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square()
                                       .sum()]) for m in modules for p in m.parameters()])
    every = accelerator.gather(digest.flatten().to(accelerator.device)[None])
    if not (every == every[:1]).all():
        raise TrainingError(f"the {accelerator.num_processes} ranks ended with different "
                            f"weights; nothing was saved")
    if accelerator.is_main_process:
        log.info("all %d ranks hold the same weights", accelerator.num_processes)


# keys a resume may change freely: how long, how often, where it runs; the batch size only
# with train.allow_config_change=true; everything else (network, data, method) never
RESUME_FREE_KEYS = {"output_dir", "train.max_steps", "train.resume", "train.checkpoint_every",
                    "train.log_every", "train.keep_checkpoints", "train.max_nonfinite",
                    "train.threads", "train.overwrite", "train.allow_config_change", "train.cpu",
                    "train.xformers", "train.compile", "msd.student"}
RESUME_GUARDED_KEYS = {"train.batch_size", "train.lr", "train.warmup_steps",
                       "train.lr_schedule"}


def read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TrainingError(f"{path}: invalid JSON ({e}); cannot check {what}") from None


def check_resumable(out: Path, cfg: Config):
    """Refuse to resume a run under a config that differs in anything that matters, or whose
    teacher (or other input folder) now holds other weights than the run started with."""
    saved_file, inputs_file = out / "config.json", out / "inputs.json"
    if not saved_file.is_file():
        return
    saved = read_json(saved_file, "the resume")
    free = set(RESUME_FREE_KEYS)
    if inputs_file.is_file():  # the folders' weights were recorded: a moved folder is fine
        free.update(FOLDER_KEYS)
        started, now = read_json(inputs_file, "the resume's inputs"), folder_weights(cfg)
        for key in sorted(started.keys() | now.keys()):
            before, after = started.get(key, {}), now.get(key, {})
            if before.get("weights") != after.get("weights"):
                raise TrainingError(
                    f"cannot resume: {key} {after.get('path')} holds other weights than the "
                    f"run started with ({before.get('path')}); a run continues against the "
                    f"inputs it began with")
    changed = changed_keys(saved, cfg, free)
    if cfg.train.allow_config_change:
        changed = {k: v for k, v in changed.items() if k not in RESUME_GUARDED_KEYS}
    if changed:
        hint = (" (train.allow_config_change=true allows batch size and lr schedule)"
                if set(changed) <= RESUME_GUARDED_KEYS else "")
        raise TrainingError("cannot resume: the config differs from the run's in "
                            + ", ".join(changed.values()) + hint)


def resume_from_checkpoint(accelerator, out: Path, counter: StepCounter):
    """Load the newest complete checkpoint; one that fails to load is passed over for the
    next older one, saying so."""
    found = checkpoints(out)
    if not found:
        raise TrainingError(f"train.resume=true but {out / 'checkpoints'} holds no complete "
                            f"checkpoint")
    for ckpt in reversed(found):
        try:
            accelerator.load_state(str(ckpt))
        except Exception as e:  # a truncated or corrupt file: torch, safetensors, pickle
            log.warning("checkpoint %s is unreadable (%s); trying an older one", ckpt,
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
            continue
        log.info("resumed from %s at step %d", ckpt, counter.step)
        return ckpt
    raise TrainingError(f"no readable checkpoint in {out / 'checkpoints'} (newest: "
                        f"{found[-1]})")


def export(method, model: nn.Module, folder: Path):
    """Write ``model`` (the EMA network) as a diffusers folder, replacing an older one only
    when complete."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    method.export(model, tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def save_checkpoint(accelerator, method, ema_model, out: Path, step: int, keep: int = 0):
    """Write into ``step-N.tmp``, fsync, mark complete, then rename: a kill mid-save leaves
    only a .tmp folder that resume never reads. Keeps the newest ``keep`` (0 = all).
    ``ema_model()`` gives the network to export (every rank calls it)."""
    ckpt = out / "checkpoints" / f"step-{step}"
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    exported = ema_model()
    if accelerator.is_main_process:
        export(method, exported, tmp / "model")
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        (tmp / COMPLETE).write_text(str(step))
        shutil.rmtree(ckpt, ignore_errors=True)
        tmp.rename(ckpt)
        if keep > 0:
            for old in checkpoints(out)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


