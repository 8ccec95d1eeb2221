"""The one training loop every recipe runs on.

A recipe is a network (everything that is checkpointed) and a list of stages; a stage has a fixed number of
optimiser steps, its parameters, its optimiser settings and a `loss(step)` that reads the batch of that step.
The engine runs the stages in one process or under `torchrun` (gradients averaged across ranks, see
`training.distributed`; with `sync_bn`, BatchNorm statistics over all ranks, see `training.sync_batchnorm`), with
fp16 autocast and a gradient scaler on GPU, warm-up + cosine learning rates, optional gradient clipping,
`metrics.jsonl` (and TensorBoard when installed), a progress bar with loss and throughput, atomic checkpoints
every `checkpoint_every` steps and at the end, and the recipe's export on rank 0.

Exact resume: a checkpoint stores the network, the current stage's optimiser, scheduler, gradient scaler and
stage state (queues, anchors), every rank's RNG states and the position (stage, step). Data positions are a
pure function of the step (`training.data.IndexStream`), so a resumed run reads, draws and computes exactly
what the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from hub.catalogue import get_variant
from hub.export import Provenance

from . import checkpoint, distributed
from .config import EngineSettings, OptimSettings
from .distributed import DistInfo
from .errors import CheckpointError, TrainingConfigError
from .sync_batchnorm import convert_sync_batchnorm, set_synchronised


class Stage(ABC):
    """One phase of a recipe with its own optimiser and schedule (e.g. MoCo, then continual multi-task)."""

    name: str
    num_steps: int
    optim: OptimSettings
    samples_per_step: int
    sync_bn = True  # with the engine's `sync_bn`: BatchNorm statistics over all ranks in this stage

    @abstractmethod
    def parameters(self) -> list[nn.Parameter]:
        """The parameters this stage's optimiser updates."""

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """Parameter groups of the optimiser (e.g. no weight decay on biases); default: one group of `parameters()`."""
        return [{"params": self.parameters()}]

    @abstractmethod
    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Read the batch of `step` and return the loss to minimise plus scalars to log."""

    def start(self) -> None:
        """Work when the stage begins at its first step (never when a run resumes inside it), e.g. snapshots of the
        previous stage's model; runs after the optimiser is built and outside autocast."""

    def after_step(self, step: int) -> None:
        """Work after the optimiser step (momentum encoders, queues)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""


class Recipe(ABC):
    name: str
    network: nn.Module

    @abstractmethod
    def stages(self) -> list[Stage]:
        """The stages in order; called once the network is on its device."""

    @abstractmethod
    def export(self, out_dir: Path) -> list[Path]:
        """Write the run's repos under `out_dir` (rank 0 only) and return their folders."""

    def signature(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed by this recipe."""
        return {"recipe": self.name}


class ManifestRecipe(Recipe):
    """A recipe of a catalogue variant (`settings.variant`) trained on `--data` manifests; its signature is its
    settings without `engine` (how it runs, not what it computes) and the manifests' names."""

    def __init__(self, settings: Any, manifests: list[Path], dist: DistInfo, data_needed: str = "manifest"):
        if not manifests:
            raise TrainingConfigError(f"the {self.name} recipe needs at least one --data {data_needed}")
        self.settings, self.manifests, self.dist = settings, [Path(m) for m in manifests], dist
        self.variant = get_variant(settings.variant)

    def signature(self) -> dict[str, Any]:
        settings = asdict(self.settings)
        settings.pop("engine")
        return {"recipe": self.name, "settings": settings, "data": [m.name for m in self.manifests]}

    def trained_provenance(self, description: str, training_data: str, **details: str) -> Provenance:
        """The exported repos' provenance: `details` follow the recipe, its seed and the variant."""
        facts = {"recipe": self.name, "seed": str(self.settings.seed), "variant": self.settings.variant, **details}
        return Provenance(kind="trained", description=description, training_data=training_data, details=facts)

    @contextlib.contextmanager
    def network_on_cpu(self) -> Iterator[None]:
        """The network on the CPU while the repos are written, back on the run's device afterwards."""
        self.network.cpu()
        try:
            yield
        finally:
            self.network.to(self.dist.device)


@dataclass
class RunResult:
    completed: bool
    global_step: int
    exported: list[Path] = field(default_factory=list)


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float):
    """LR multiplier: (step + 1) / warmup during warm-up, then cosine from 1 to `min_ratio` at the last step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def make_optimizer(
    parameters: list[nn.Parameter] | list[dict[str, Any]], optim: OptimSettings
) -> torch.optim.Optimizer:
    """`parameters`: a list of parameters or of parameter groups (a group's own settings override `optim`)."""
    if optim.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    betas = tuple(optim.betas)
    if optim.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=optim.lr, betas=betas, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(parameters, lr=optim.lr, betas=betas, weight_decay=optim.weight_decay)


def _complete_record_through(line: str, global_step: int) -> bool:
    """Whether a metrics.jsonl line is a whole record (a kill can cut the last one) at or before `global_step`."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    return (
        isinstance(record, dict) and isinstance(record.get("global_step"), int) and record["global_step"] <= global_step
    )


class _Logger:
    """metrics.jsonl on rank 0, plus TensorBoard when the `tensorboard` package is installed."""

    def __init__(self, run_dir: Path, enabled: bool, global_step: int):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if enabled:
            self._keep_through(global_step)
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.writer = None
            else:
                self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def _keep_through(self, global_step: int) -> None:
        """Drop the records past the step a run starts from (a resumed run logs those steps again), so that
        `metrics.jsonl` holds one record per step after any number of resumes; a fresh run starts it empty."""
        if not self.path.is_file():
            return
        kept = [
            line
            for line in self.path.read_text(encoding="utf-8").splitlines(keepends=True)
            if _complete_record_through(line, global_step)
        ]
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        temporary.write_text("".join(kept), encoding="utf-8")
        os.replace(temporary, self.path)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as stream:
            stream.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "global_step"):
                    self.writer.add_scalar(f"{record['stage']}/{key}", value, record["global_step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Engine:
    def __init__(self, run_dir: Path, settings: EngineSettings, dist_info: DistInfo):
        self.run_dir = Path(run_dir)
        self.settings = settings
        self.dist = dist_info
        self.amp = settings.amp and dist_info.device.type == "cuda"

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / checkpoint.CHECKPOINT_NAME

    def run(self, recipe: Recipe, resume: bool = False, stop_after: int | None = None) -> RunResult:
        """Train `recipe` to the end (or for `stop_after` more steps, then checkpoint and return)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.settings.sync_bn and self.dist.world > 1:
            convert_sync_batchnorm(recipe.network)
        recipe.network.to(self.dist.device)
        stages = recipe.stages()
        state = self._load(recipe) if resume else None
        start_stage = state["stage"] if state else 0
        start_step = state["step"] if state else 0
        global_step = state["global_step"] if state else 0
        total = sum(stage.num_steps for stage in stages)
        if self.dist.is_main:
            checkpoint.remove_stale_temporaries(self.checkpoint_path)
        logger = _Logger(self.run_dir, self.dist.is_main, global_step)
        bar = tqdm(
            total=total,
            initial=global_step,
            desc=recipe.name,
            unit="step",
            disable=not (self.settings.progress and self.dist.is_main),
        )
        steps_this_run = 0
        try:
            for index in range(start_stage, len(stages)):
                stage = stages[index]
                optimizer = make_optimizer(stage.optimizer_groups(), stage.optim)
                scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer, warmup_cosine(stage.num_steps, stage.optim.warmup_steps, stage.optim.min_lr_ratio)
                )
                scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
                first = start_step if index == start_stage else 0
                if state is not None and index == start_stage:
                    optimizer.load_state_dict(state["optimizer"])
                    scheduler.load_state_dict(state["scheduler"])
                    scaler.load_state_dict(state["scaler"])
                    stage.load_state_dict(state["stage_state"])
                    rng = state["rng"]
                    checkpoint.set_rng_state(rng[self.dist.rank] if len(rng) == self.dist.world else rng[0])
                    state = None
                set_synchronised(recipe.network, stage.sync_bn)
                if first == 0:
                    stage.start()
                tick, samples = time.perf_counter(), 0
                for step in range(first, stage.num_steps):
                    metrics = self._step(recipe, stage, step, optimizer, scheduler, scaler)
                    global_step += 1
                    steps_this_run += 1
                    samples += stage.samples_per_step
                    bar.update(1)
                    last = step + 1 == stage.num_steps
                    if global_step % self.settings.log_every == 0 or last:
                        elapsed = time.perf_counter() - tick
                        record = {
                            "stage": stage.name,
                            "step": step + 1,
                            "global_step": global_step,
                            "lr": scheduler.get_last_lr()[0],
                            "samples_per_s": samples / max(elapsed, 1e-9),
                            **metrics,
                        }
                        logger.log(record)
                        bar.set_postfix(loss=f"{metrics['loss']:.4f}", samples_s=f"{record['samples_per_s']:.1f}")
                        tick, samples = time.perf_counter(), 0
                    stopping = stop_after is not None and steps_this_run >= stop_after
                    if (
                        global_step % self.settings.checkpoint_every == 0
                        or stopping
                        or (last and index + 1 == len(stages))
                    ):
                        self._save(recipe, index, step + 1, global_step, optimizer, scheduler, scaler, stage)
                    if stopping and global_step < total:
                        return RunResult(False, global_step)
            exported = recipe.export(self.run_dir / "repos") if self.dist.is_main else []
            distributed.barrier()
            return RunResult(True, global_step, exported)
        finally:
            bar.close()
            logger.close()

    def _step(self, recipe: Recipe, stage: Stage, step: int, optimizer, scheduler, scaler) -> dict[str, float]:
        parameters = stage.parameters()
        distributed.broadcast_buffers(recipe.network)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.dist.device.type, dtype=torch.float16, enabled=self.amp):
            loss, metrics = stage.loss(step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{stage.name} step {step + 1}: loss is {loss.item()}; lower the learning rate")
        scaler.scale(loss).backward()
        distributed.average_gradients(parameters)
        if self.settings.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, self.settings.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        stage.after_step(step)
        return {"loss": float(loss.detach()), **metrics}

    def _save(
        self, recipe: Recipe, stage_index: int, step: int, global_step: int, optimizer, scheduler, scaler, stage: Stage
    ) -> None:
        rng = distributed.gather_objects(checkpoint.rng_state())
        if not self.dist.is_main:
            return
        state = {
            "signature": recipe.signature(),
            "stage": stage_index,
            "step": step,
            "global_step": global_step,
            "network": recipe.network.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "stage_state": stage.state_dict(),
            "rng": rng,
        }
        checkpoint.save_atomic(state, self.checkpoint_path)

    def _load(self, recipe: Recipe) -> dict[str, Any]:
        state = checkpoint.load(self.checkpoint_path)
        if state.get("signature") != recipe.signature():
            raise CheckpointError(
                f"checkpoint {self.checkpoint_path} was written by another configuration "
                f"({state.get('signature')}); resume with the same recipe, preset and config"
            )
        recipe.network.load_state_dict(state["network"])
        return state
