"""The service's own Prometheus metrics, exported through Ray's metrics agent beside Ray Serve's.

Names: `unclip_queue_depth` (jobs waiting on a replica), `unclip_batch_images` (images per model
call), `unclip_stage_seconds{stage=queued|generate|encode}`, `unclip_images_total{kind}`,
`unclip_requests_total{route,code}` and `unclip_errors_total{kind}`. Outside a Ray worker (unit
tests) every metric is a no-op.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]
SECONDS_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


class _NoMetric:
    def inc(self, *args, **kwargs) -> None: ...
    def set(self, *args, **kwargs) -> None: ...
    def observe(self, *args, **kwargs) -> None: ...


def _make(kind: str, name: str, description: str, tag_keys: tuple[str, ...] = (), **kwargs):
    try:
        import ray
        from ray.serve import metrics

        if not ray.is_initialized():
            return _NoMetric()
        return getattr(metrics, kind)(name, description=description, tag_keys=tag_keys, **kwargs)
    except Exception as exc:  # metrics must never stop the service
        log.warning("metric %s not exported: %s", name, exc)
        return _NoMetric()


class WorkerMetrics:
    """Metrics of a model replica."""

    def __init__(self) -> None:
        self.queue_depth = _make("Gauge", "unclip_queue_depth", "jobs waiting for a model call on this replica")
        self.batch_images = _make("Histogram", "unclip_batch_images", "images per model call",
                                  boundaries=BATCH_BOUNDARIES)
        self.stage_seconds = _make("Histogram", "unclip_stage_seconds", "seconds per request and stage",
                                   ("stage",), boundaries=SECONDS_BOUNDARIES)
        self.images = _make("Counter", "unclip_images_total", "images served", ("kind",))


class IngressMetrics:
    """Metrics of the HTTP ingress."""

    def __init__(self) -> None:
        self.requests = _make("Counter", "unclip_requests_total", "HTTP requests answered", ("route", "code"))
        self.errors = _make("Counter", "unclip_errors_total", "requests answered with an error", ("kind",))
        self.request_seconds = _make("Histogram", "unclip_request_seconds", "seconds from arrival to answer",
                                     ("route",), boundaries=SECONDS_BOUNDARIES)
