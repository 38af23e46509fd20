"""The model actor: one or more model stages in one process, fed with their host work overlapped.

Ray Data runs this class as an actor pool (`ActorPoolStrategy`). Each call does
  1. host work in: decode the batch's bytes (the first actor of the pipeline only),
  2. the models, serialised by a lock: one batch on the device at a time,
  3. host work out: drop what later operators do not need, bring the rest to the host.
With `max_concurrent_calls_per_actor: 2` and true multi-threading (cafi/pipeline.py), Ray Data
calls it from two threads: while one batch is in the models the next one is being decoded and
its rows formatted, so the models do not wait for the host. Each model section's start and end
go to the run's telemetry (busy time per actor).
"""

from __future__ import annotations

import threading
import time

import numpy as np

from cafi.config import JobConfig
from cafi.stages.base import ModelStage, torch_threads
from cafi.stages.deaths import DeathWatch
from cafi.stages.specs import specs_for, stage_columns
from cafi.telemetry import Telemetry

# Columns only the model actors use: never written, dropped before the rows leave the last one.
PIXEL_COLUMNS = ("data", "image", "face_mask")


class FusedModels:
    """Stages (by spec name) run in order in this actor: `stages` with their models, `take_over`
    without (their every row reuses earlier results). `decode`: this actor turns bytes into pixels.
    `last`: no model actor follows, so the pixels are dropped here."""

    def __init__(self, cfg: JobConfig, stages: list[str] | None = None, take_over: list[str] | None = None,
                 decode: bool = True, last: bool = True, run_id: str | None = None):
        from cafi.models.runtime import configure_torch
        from cafi.stages.decode import Decode

        self.cfg = cfg
        specs = specs_for(cfg)
        run = set(stages if stages is not None else [s.name for s in specs])
        copy = set(take_over or [])
        chosen = [s for s in specs if s.name in run | copy]
        threads = max(torch_threads(s.resources(cfg)) for s in chosen) if chosen else 1
        self.stages: list[ModelStage] = []
        for s in chosen:
            stage = s.stage(s, cfg, load=s.name in run, outputs=stage_columns(s, cfg))
            if stage.loaded:
                configure_torch(stage.device, threads)
            self.stages.append(stage)
        loaded = [s for s in self.stages if s.loaded]
        device = loaded[0].device if loaded else None
        self.decode = Decode(self.cfg.image, device, threads) if decode else None
        self.last = last
        self.model_lock = threading.Lock()
        self.telemetry = Telemetry.of(run_id)
        self.deaths = DeathWatch(self.telemetry, cfg.ray.max_worker_deaths, cfg.image)

    @staticmethod
    def resources(cfg: JobConfig, stages) -> dict:
        """Ray map_batches arguments for an actor holding `stages` (specs): the largest demand."""
        sts = [s.resources(cfg) for s in stages]
        return pool_arguments(batch_size=min(s.batch_size for s in sts), num_cpus=max(s.num_cpus for s in sts),
                              num_gpus=max(s.num_gpus for s in sts), min_actors=max(s.min_actors for s in sts),
                              max_actors=max(s.max_actors for s in sts), concurrency=cfg.ray.actor_concurrency)

    def __call__(self, batch: dict) -> dict:
        with self.deaths.attempt(batch) as attempt:  # an input that keeps killing this worker: an error row
            if self.decode is not None:
                attempt.before_decode(batch)
                self.decode(batch)  # outside the lock: overlaps the models working on the previous batch
            attempt.before_models(batch)
            with self.model_lock:
                start = time.time()
                for stage in self.stages:
                    stage(batch)
                self._sync()
                end = time.time()
        self.telemetry.busy(start, end, len(batch["uri"]))
        return self._leave(batch)

    def _sync(self) -> None:
        """Device work is asynchronous: wait for it, so the busy time is the device's."""
        devices = {s.device for s in self.stages if s.loaded and s.device.type == "cuda"}
        if devices:
            import torch

            for device in devices:
                torch.cuda.synchronize(device)

    def _leave(self, batch: dict) -> dict:
        from cafi.models.runtime import to_host

        batch.pop("data", None)
        for col in PIXEL_COLUMNS:
            if col in batch:
                if self.last:
                    del batch[col]
                else:  # bool tensors do not survive Ray's Arrow tensor columns: masks travel as uint8
                    batch[col] = to_host(batch[col])
                    if batch[col].dtype == bool:
                        batch[col] = batch[col].view(np.uint8)
        return batch


def pool_arguments(batch_size: int, num_cpus: float, num_gpus: float, min_actors: int, max_actors: int,
                   concurrency: int) -> dict:
    """map_batches arguments of a model actor pool. With concurrency > 1 the UDF runs in that many
    threads at once (`enable_true_multi_threading`): FusedModels serialises its models itself."""
    from ray.data import ActorPoolStrategy

    fixed = min_actors == max_actors
    strategy = ActorPoolStrategy(
        **({"size": min_actors} if fixed else {"min_size": min_actors, "max_size": max_actors}),
        max_concurrent_calls_per_actor=concurrency,
        enable_true_multi_threading=concurrency > 1,
        # Enough queued batches that the next one is always there when the models free up.
        max_tasks_in_flight_per_actor=max(2, 2 * concurrency),
    )
    return {"batch_size": batch_size, "num_cpus": num_cpus, "num_gpus": num_gpus, "compute": strategy,
            "zero_copy_batch": False}


def take_over_only(batch: dict, cfg: JobConfig, stages: list[str]) -> dict:
    """Stages left out of the actors because every row reuses their results: copy the results
    over without loading any model (a CPU task)."""
    for s in specs_for(cfg):
        if s.name in stages:
            s.stage(s, cfg, load=False, outputs=stage_columns(s, cfg))(batch)
    return batch

