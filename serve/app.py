"""The Serve application: the HTTP ingress bound to the model replicas, sized for the cluster.

`build_app(options)` is what `python -m serve` runs; `app_builder(args)` is the entry of a Serve
config file (`serve/config.yaml`: `import_path: serve.app:app_builder`) for `serve run` and
`serve deploy`, and of the KubeRay example. Each replica reserves one GPU where the cluster has
GPUs (Ray places it and sets its visible device), so replicas spread over GPUs and nodes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ray import serve
from ray.serve import Application

from serve.http_api import ImagesAPI
from serve.options import ServeOptions
from serve.worker import ImageWorker

log = logging.getLogger("serve.app")

GPU_REPLICA_CPUS = 2.0  # noise drawing and PNG encoding beside a GPU replica


@dataclass(frozen=True)
class Placement:
    """How many model replicas, and what each reserves."""

    replicas: int
    cpus: float
    gpus: float


def plan_placement(options: ServeOptions, cluster: dict[str, float]) -> Placement:
    """Replicas and their resources from the options and the cluster's resources (`ray.cluster_resources()`)."""
    gpus = int(cluster.get("GPU", 0))
    use_gpu = gpus > 0 and (options.device is None or options.device.startswith("cuda"))
    if options.device and options.device.startswith("cuda") and gpus == 0:
        raise ValueError("--device cuda: the Ray cluster has no GPUs")
    replicas = options.replicas or (gpus if use_gpu else 1)
    if use_gpu and replicas > gpus:
        raise ValueError(f"--replicas {replicas}: the cluster has {gpus} GPUs (one replica per GPU)")
    cpus_total = float(cluster.get("CPU", 1))
    if options.cpus_per_replica is not None:
        cpus = options.cpus_per_replica
    elif use_gpu:
        cpus = min(GPU_REPLICA_CPUS, max(1.0, cpus_total // replicas))
    else:
        cpus = max(1.0, cpus_total // replicas)
    return Placement(replicas, cpus, 1.0 if use_gpu else 0.0)


def build_app(options: ServeOptions, cluster: dict[str, float] | None = None) -> Application:
    """The application for `serve.run`; `cluster` defaults to the connected Ray cluster's resources."""
    if cluster is None:
        import ray

        cluster = ray.cluster_resources()
    placement = plan_placement(options, cluster)
    log.info("%d model replica(s), each %g CPU and %g GPU", placement.replicas, placement.cpus, placement.gpus)
    worker = serve.deployment(
        ImageWorker, name="ImageWorker", num_replicas=placement.replicas,
        ray_actor_options={"num_cpus": placement.cpus, "num_gpus": placement.gpus},
        # every accepted request reaches a replica's batcher; beyond that the handle refuses (429)
        max_ongoing_requests=options.max_queued, max_queued_requests=options.max_queued,
        health_check_period_s=2.0, health_check_timeout_s=30.0, graceful_shutdown_timeout_s=options.timeout_s,
    ).bind(options, placement.cpus)
    ingress = serve.deployment(
        ImagesAPI, name="ImagesAPI", num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=options.max_queued * placement.replicas * 2 + 64,
    )
    return ingress.bind(worker, options, placement.replicas)


def app_builder(args: dict) -> Application:
    """Entry of a Serve config file: `args` are `ServeOptions` fields."""
    return build_app(ServeOptions.from_dict(dict(args or {})))
