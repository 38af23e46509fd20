"""The model actor: one or more model stages in one process, fed with their host work overlapped.

Ray Data runs this class as an actor pool (`ActorPoolStrategy`). Each call does
  1. host work in: decode the batch's bytes (the first actor of the pipeline only),
  2. the models: one batch at a time on a device; on the CPU up to `ray.cpu_replicas` batches at
     once (replicas), each in its own call thread with its share of the torch threads,
  3. host work out: drop what later operators do not need, bring the rest to the host.
With several calls in flight and true multi-threading (cafi/pipeline.py), Ray Data calls it from
that many threads: while the models work, the next batch is being decoded and its rows formatted,
so the models do not wait for the host. Each model section's start and end go to the run's
telemetry (busy time per actor, per replica).

Why replicas on the CPU: one model on N torch threads meets at a barrier after every operator, so a
thread pre-empted by another process (Ray's own, on a small node) stalls all N. N replicas of one
thread each stall only the pre-empted one's batch. They share one set of weights: inference reads
them only, and torch releases the GIL inside its operators, so a replica costs its activations.
torch's thread count is per calling thread once set (OpenMP's is), so each replica sets its own.
"""

from __future__ import annotations

import queue
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
        self.replicas = cpu_replicas(cfg, chosen) if cfg_on_cpu(cfg, [s for s in chosen if s.name in run]) else 1
        # torch threads of each replica's call; None: one replica, on the threads set below
        self.replica_threads = max(1, threads // self.replicas) if self.replicas > 1 else None
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
        self.free_replicas: queue.SimpleQueue[int] = queue.SimpleQueue()  # a call takes one, or waits
        for i in range(self.replicas):
            self.free_replicas.put(i)
        self.telemetry = Telemetry.of(run_id)
        self.deaths = DeathWatch(self.telemetry, cfg.ray.max_worker_deaths, cfg.image)

    @staticmethod
    def resources(cfg: JobConfig, stages) -> dict:
        """Ray map_batches arguments for an actor holding `stages` (specs): the largest demand."""
        sts = [s.resources(cfg) for s in stages]
        replicas = cpu_replicas(cfg, stages) if cfg_on_cpu(cfg, stages) else 1
        return pool_arguments(batch_size=min(s.batch_size for s in sts), num_cpus=max(s.num_cpus for s in sts),
                              num_gpus=max(s.num_gpus for s in sts), min_actors=max(s.min_actors for s in sts),
                              max_actors=max(s.max_actors for s in sts),
                              concurrency=replicas + cfg.ray.actor_concurrency - 1)

    def __call__(self, batch: dict) -> dict:
        with self.deaths.attempt(batch) as attempt:  # an input that keeps killing this worker: an error row
            if self.decode is not None:
                attempt.before_decode(batch)
                self.decode(batch)  # before taking a replica: overlaps the models working on other batches
            attempt.before_models(batch)
            replica = self.free_replicas.get()
            caller_threads = None
            try:
                if self.replica_threads is not None:
                    import torch

                    caller_threads = torch.get_num_threads()
                    torch.set_num_threads(self.replica_threads)  # this call thread's own OpenMP team
                start = time.time()
                for stage in self.stages:
                    stage(batch)
                self._sync()
                end = time.time()
            finally:
                if caller_threads is not None:  # a caller outside Ray (a test, a bench) keeps its own
                    torch.set_num_threads(caller_threads)
                self.free_replicas.put(replica)
        self.telemetry.busy(start, end, len(batch["uri"]), replica if self.replicas > 1 else None)
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


def cfg_on_cpu(cfg: JobConfig, stages) -> bool:
    """Whether the models of `stages` run on the CPU as planned (models.device, and GPUs reserved
    for auto); an actor that finds no CUDA falls back to the CPU with one replica."""
    device = cfg.models.device
    return device == "cpu" or (device == "auto" and all(s.resources(cfg).num_gpus == 0 for s in stages))


def cpu_replicas(cfg: JobConfig, stages) -> int:
    """Batches the CPU models of an actor holding `stages` run at once: ray.cpu_replicas, 0 = one per
    torch thread of the actor."""
    if not stages:
        return 1
    return cfg.ray.cpu_replicas or max(torch_threads(s.resources(cfg)) for s in stages)


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

