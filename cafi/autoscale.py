"""GPU actor pools that reach `max_actors` on a cluster whose GPU workers autoscale from zero.

On such a cluster the GPU nodes do not exist until something asks for them, and Ray Data
does not ask for enough:

* Ray Data grows an actor pool only within the resources the cluster has *now*
  (ray-project/ray#59144). With no GPU worker up, a GPU pool never grows past its minimum,
  so the autoscaler never sees the demand that would add the workers.
* An up-front `ray.autoscaler.sdk.request_resources(bundles=...)` does not survive either:
  Ray Data's autoscaling coordinator owns that cluster-wide request and replaces it with its
  own as soon as a dataset executes (with Ray 2.60 the request reads `[]` a moment later), and
  registering with the coordinator instead would reserve the GPUs away from Ray Data's own
  budget.

What the cluster autoscaler always honours (KubeRay or the cluster launcher, v1 or v2) is
actors waiting for resources. So on such a cluster cafi starts every GPU pool at its full
size: `min_actors` is raised to `max_actors` (capped by the work there is, so a run of ten
images does not order eight GPU nodes). All the pool's actors are requested when the run
starts, the pending ones make the autoscaler add GPU workers, and Ray Data never shrinks a
pool below its minimum, so its resource budget cannot hold them back. When the input is
consumed Ray Data shuts the pools down; the GPU workers go idle and the autoscaler removes
them after its idle timeout. Nothing stays requested after the run.

Knob: `ray.scale_gpu_pools` (configs/default.yaml) -- `auto` does this only when the job
joined an existing Ray cluster (a submitted job, `ray.address` set), never on the embedded
local Ray a laptop run starts; `always`; `never`. cluster/README.md explains how to size
`max_actors` against the GPU worker group.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

from cafi.config import JobConfig
from cafi.stages.specs import actor_groups

log = logging.getLogger("cafi")

MODES = ("auto", "always", "never")


@dataclass(frozen=True)
class GpuPool:
    """One actor pool that holds GPUs: what each actor asks for, and the pool bounds."""

    name: str
    num_cpus: float
    num_gpus: float
    min_actors: int
    max_actors: int
    keys: tuple[str, ...]  # the models.<section> stage configs the pool is built from

    @property
    def bundle(self) -> dict[str, float]:
        return {"CPU": self.num_cpus, "GPU": self.num_gpus}


def gpu_pools(cfg: JobConfig) -> list[GpuPool]:
    """The actor pools of this config that ask for GPUs: each with the largest demand of its stages
    (stages.FusedModels.resources)."""
    pools = []
    for group in actor_groups(cfg):
        sections = tuple(dict.fromkeys(s.section for s in group))
        sts = [getattr(cfg.models, k) for k in sections]
        gpus = max(s.num_gpus for s in sts)
        if gpus > 0:
            name = "fused" if cfg.ray.fuse_models else group[0].name
            pools.append(GpuPool(name, max(s.num_cpus for s in sts), gpus, max(s.min_actors for s in sts),
                                 max(s.max_actors for s in sts), sections))
    return pools


def bundles_at_max(cfg: JobConfig) -> list[dict[str, float]]:
    """One resource bundle per GPU actor with every GPU pool at `max_actors`."""
    return [pool.bundle for pool in gpu_pools(cfg) for _ in range(pool.max_actors)]


def joined_existing_cluster() -> bool:
    """True when this driver connected to a running Ray cluster rather than starting its own."""
    import ray

    if not ray.is_initialized():
        return False
    node = getattr(ray._private.worker.global_worker, "node", None)  # the driver's Ray node handle
    return node is not None and not getattr(node, "head", False)


def active(cfg: JobConfig) -> bool:
    """Whether GPU pools start at full size for this run (see the module docstring)."""
    mode = cfg.ray.scale_gpu_pools
    if mode == "never" or not gpu_pools(cfg):
        return False
    return mode == "always" or joined_existing_cluster()


def sized(cfg: JobConfig, rows: int | None = None) -> JobConfig:
    """The config the pipeline builds its actor pools from.

    When `active`, a copy in which every GPU pool has a fixed size, started at once and kept for
    the run: `max_actors`, or one actor per `batch_size` rows when `rows` (the number of inputs to
    score) is smaller. Otherwise `cfg` itself.
    """
    if not active(cfg):
        return cfg
    fixed: dict = {}
    described = []
    for pool in gpu_pools(cfg):
        for key in pool.keys:
            st = getattr(cfg.models, key)
            target = st.max_actors
            if rows is not None:
                target = min(target, max(1, math.ceil(rows / st.batch_size)))
            size = max(st.min_actors, target)
            # a fixed-size pool: no scale-up lag inside Ray Data, none to wait for
            fixed[key] = dataclasses.replace(st, min_actors=size, max_actors=size)
        start = max(fixed[key].min_actors for key in pool.keys)
        described.append(f"{pool.name} {start} x {pool.bundle}")
    out = dataclasses.replace(cfg, models=dataclasses.replace(cfg.models, **fixed))
    log.info("ray.scale_gpu_pools=%s: GPU actor pools start at full size so the cluster autoscaler adds GPU "
             "workers for them: %s", cfg.ray.scale_gpu_pools, ", ".join(described))
    return out
