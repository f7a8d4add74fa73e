"""What a service is started with: the model, the replicas, batching and admission limits.

One `ServeOptions` comes from the command line (`python -m serve …`) or from the `args` of a Serve
config file (`serve/config.yaml`), and is what `serve.app.build_app` binds the deployments with.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass

DTYPES = ("float32", "float16", "bfloat16")
BACKENDS = ("auto", "torch", "measured", "onnxruntime", "tensorrt")  # UnCLIP's (this module stays light)

# The text encoder and the prior always run at this many images (`UnCLIP(prior_batch=...)`): a
# request's images then do not depend on what shares its call. Small, because a lone request
# pays for the padding rows (the prior's step is weight-bound, so few extra rows cost little) and
# a full call of --max-batch images runs the prior in --max-batch / this many calls.
DEFAULT_PRIOR_BATCH = 4


@dataclass(frozen=True)
class ServeOptions:
    """Settings of one service; None means "decided where it runs" (GPU count, cores)."""

    model: str | None = None  # our folder (config.json + model.safetensors); None: the shipped default
    karlo: str | None = None  # Kakao Brain's original files
    diffusers: str | None = None  # a diffusers unCLIP folder
    random_weights: str | None = None  # a config preset with random weights (load tests: speed, not images)
    engine_dir: str | None = None
    backend: str = "auto"
    device: str | None = None  # None: cuda when the replica has a GPU, else cpu
    dtype: str | None = None
    prior_dtype: str | None = None  # None: --dtype
    prior_batch: int | None = None  # None: DEFAULT_PRIOR_BATCH, at most max_batch (joined requests = lone ones)
    precision: str | None = None  # "fp8": UnCLIP(precision="fp8") (the model folder's calibrated scales, if any)
    replicas: int | None = None  # None: one per GPU of the cluster, one on a machine without GPUs
    cpus_per_replica: float | None = None  # None: 2 beside a GPU, else the machine's cores / replicas
    max_batch: int = 8  # images per generate call
    batch_wait_ms: float = 10.0  # how long a request may wait for others to share its call
    max_queued: int = 64  # accepted, unfinished requests per replica; beyond it: 429
    timeout_s: float = 120.0  # a request's deadline, from its arrival
    max_upload_mb: float = 4.0
    warmup: bool = True  # GPU replicas capture every batch size's graphs before serving
    host: str = "127.0.0.1"
    port: int = 8000
    address: str | None = None  # an existing Ray cluster ("auto" or host:port); None: a local instance

    def __post_init__(self) -> None:
        sources = [n for n in ("model", "karlo", "diffusers", "random_weights") if getattr(self, n)]
        if len(sources) > 1:
            raise ValueError(f"give one model source, not {' and '.join('--' + s.replace('_', '-') for s in sources)}")
        for name in ("dtype", "prior_dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPES:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(DTYPES)}, got {value!r}")
        if self.precision not in (None, "fp8"):
            raise ValueError(f"--precision must be fp8 or unset, got {self.precision!r}")
        for name, low in (("max_batch", 1), ("max_queued", 1), ("port", 0), ("prior_batch", 1)):
            value = getattr(self, name)
            if value is None and name == "prior_batch":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        if self.replicas is not None and (not isinstance(self.replicas, int) or self.replicas < 1):
            raise ValueError(f"--replicas must be an integer >= 1, got {self.replicas!r}")
        for name in ("batch_wait_ms", "timeout_s", "max_upload_mb"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < float("inf"):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"--timeout-s must be > 0, got {self.timeout_s!r}")

    @property
    def model_source(self) -> tuple[str, str | None]:
        """("model" | "karlo" | "diffusers" | "random_weights", folder or preset); ("model", None) is the
        shipped default."""
        for kind in ("karlo", "diffusers", "random_weights", "model"):
            if getattr(self, kind):
                return kind, getattr(self, kind)
        return "model", None

    @property
    def model_id(self) -> str:
        """The name `GET /v1/models` lists and requests may give as `model`."""
        kind, folder = self.model_source
        if folder is None:
            return "unclip-rt-default"
        if kind == "random_weights":
            return f"unclip-rt-random-{folder}"
        return f"unclip-rt-{os.path.basename(os.path.normpath(folder)) or kind}"

    @staticmethod
    def from_dict(values: dict) -> ServeOptions:
        """From a Serve config file's `args` (unknown keys refused, naming them)."""
        known = {f.name for f in dataclasses.fields(ServeOptions)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown service options: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return ServeOptions(**values)


def parse_args(argv: list[str] | None = None) -> ServeOptions:
    """`python -m serve [options]` → `ServeOptions` (argparse exits with a usage line on bad input)."""
    d = ServeOptions()
    p = argparse.ArgumentParser(prog="python -m serve", description="unCLIP images service (OpenAI Images API)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="folder with config.json + model.safetensors (default: the shipped model)")
    src.add_argument("--karlo", help="folder with Kakao Brain's original Karlo files")
    src.add_argument("--diffusers", help="diffusers unCLIP folder (e.g. kakaobrain/karlo-v1-alpha)")
    src.add_argument("--random-weights", metavar="CONFIG",
                     help="a config preset (karlo, default, tiny) with random weights: for load tests, not images")
    p.add_argument("--engine-dir", help="engine folder built by python -m export.build_engines")
    p.add_argument("--backend", default=d.backend, choices=BACKENDS)
    p.add_argument("--device", help="cuda or cpu (default: cuda on replicas with a GPU)")
    p.add_argument("--dtype", choices=DTYPES, help="network dtype (default float16 on a GPU, float32 on a CPU)")
    p.add_argument("--prior-dtype", choices=DTYPES, help="dtype of the text encoder and the prior (default: --dtype)")
    p.add_argument("--prior-batch", type=int,
                   help=f"batch the text encoder and the prior always run at (default {DEFAULT_PRIOR_BATCH}, at "
                        "most --max-batch), so that a request batched with others gets the images it would get alone")
    p.add_argument("--precision", choices=("fp8",), help="fp8: the super-res UNets in FP8 (docs/fp8.md)")
    p.add_argument("--replicas", type=int, help="model replicas (default: one per GPU; one without GPUs)")
    p.add_argument("--cpus-per-replica", type=float, help="CPU cores each replica reserves (and its torch threads)")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help=f"images per batched call ({d.max_batch})")
    p.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                   help=f"how long a request waits for others to batch with ({d.batch_wait_ms:g} ms)")
    p.add_argument("--max-queued", type=int, default=d.max_queued,
                   help=f"accepted unfinished requests per replica; more are answered 429 ({d.max_queued})")
    p.add_argument("--timeout-s", type=float, default=d.timeout_s, help=f"request deadline ({d.timeout_s:g} s)")
    p.add_argument("--max-upload-mb", type=float, default=d.max_upload_mb, help="largest image upload (4 MB)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="serve at once instead of first capturing each batch size's CUDA graphs")
    p.add_argument("--host", default=d.host, help=f"address to listen on ({d.host})")
    p.add_argument("--port", type=int, default=d.port, help=f"port ({d.port})")
    p.add_argument("--address", help="join this Ray cluster (e.g. auto, or HEAD:6379) instead of starting one")
    args = p.parse_args(argv)
    try:
        return ServeOptions(**{k: v for k, v in vars(args).items()})
    except ValueError as exc:
        p.error(str(exc))
        raise  # unreachable: p.error exits
