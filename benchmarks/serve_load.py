"""A bounded load generator for the images service (`python -m serve`), on the loopback or a network.

    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --concurrency 1 16 64 --requests 64
    python benchmarks/serve_load.py --concurrency 16 --duration 60 --n 1 2 4 --out docs/results/load.json

Closed loop: at each concurrency level, that many clients each send `POST /v1/images/generations`
back to back until the level's request count (or duration) is reached; `--n` values are cycled
through the requests (mixed sizes). Per level it reports throughput (images/s and requests/s over
the level's wall time), latency p50/p95/p99 of the successful requests, the batch sizes the server
reported (`x-unclip-batch-images`), and errors by HTTP status. `--warmup` requests per level
(not counted) let the replicas capture their CUDA graphs first. Prints a table and writes JSON
(atomically). The load itself uses the standard library only, so it runs wherever Python does.

`--offline CONFIG` first times the runtime alone in this process on the same GPU (random weights
of CONFIG, fp16, the server's steps from `--extra`): a lone `UnCLIP.generate` of one image and one
call of `--offline-batch` images, so the served figures come with their offline reference from the
same run (served images/s over offline images/s, served p50 over the lone call). The reference is
the runtime's fastest setting, every network in fp16 at the call's own batch; the same calls with
the service's settings as its /health reports them (the text encoder and the prior at the fixed
`prior_batch`, in `prior_dtype`) are timed beside it ("service_settings"), so that the cost of
those settings shows apart from the service's own.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import http.client
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

SERVER_PARTS = ("queued", "run", "encode")  # the replica's x-unclip-*-ms response headers


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the service (default http://127.0.0.1:8000)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16], help="clients per level (default 1 16)")
    p.add_argument("--requests", type=int, default=32, help="requests per level (default 32)")
    p.add_argument("--duration", type=float, help="seconds per level instead of a request count")
    p.add_argument("--warmup", type=int, default=2, help="uncounted requests per client before a level (default 2)")
    p.add_argument("--n", type=int, nargs="+", default=[1], help="images per request, cycled (default 1)")
    p.add_argument("--prompt", default="a high-resolution photograph of a red fox sitting in fresh snow")
    p.add_argument("--extra", default="{}", help="JSON merged into every request body (steps, guidance, seed)")
    p.add_argument("--timeout", type=float, default=600, help="client timeout per request, seconds")
    p.add_argument("--offline", metavar="CONFIG", help="also time UnCLIP.generate in this process (random weights)")
    p.add_argument("--offline-batch", type=int, nargs="+", default=[1, 8], help="offline call sizes (default 1 8)")
    p.add_argument("--offline-threads", type=int, help="torch CPU threads for the offline calls (default torch's; "
                   "a GPU replica runs with 2)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    if min(args.concurrency) < 1 or args.requests < 1 or min(args.n) < 1:
        p.error("--concurrency, --requests and --n take positive integers")
    try:
        args.extra = json.loads(args.extra)
    except json.JSONDecodeError as exc:
        p.error(f"--extra is not JSON: {exc}")
    if not isinstance(args.extra, dict):
        p.error("--extra must be a JSON object")
    return args


class Client:
    """One keep-alive HTTP connection per thread."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host, self.port, self.timeout = parts.hostname, parts.port or 80, timeout
        self.local = threading.local()

    def post(self, path: str, body: dict) -> tuple[int, dict[str, str], bytes]:
        for attempt in range(2):  # a dropped keep-alive connection is reopened once
            conn = getattr(self.local, "conn", None)
            if conn is None:
                conn = self.local.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
                response = conn.getresponse()
                data = response.read()
                return response.status, {k.lower(): v for k, v in response.getheaders()}, data
            except (ConnectionError, http.client.HTTPException):
                conn.close()
                self.local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def run_level(client: Client, args: argparse.Namespace, concurrency: int) -> dict:
    sizes = itertools.cycle(args.n)
    lock = threading.Lock()
    seeds = itertools.count(1)

    def body() -> dict:
        with lock:
            n, seed = next(sizes), next(seeds)
        return {"prompt": args.prompt, "n": n, "seed": seed, "response_format": "b64_json", **args.extra}

    def one() -> dict:
        b = body()
        start = time.perf_counter()
        try:
            status, headers, _ = client.post("/v1/images/generations", b)
        except OSError as exc:
            return {"status": f"client:{type(exc).__name__}", "seconds": time.perf_counter() - start, "n": b["n"]}
        return {"status": status, "seconds": time.perf_counter() - start, "n": b["n"],
                "batch": int(headers.get("x-unclip-batch-images", 0) or 0),
                **{part: float(headers.get(f"x-unclip-{part}-ms", "nan")) for part in SERVER_PARTS}}

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda _: one(), range(args.warmup * concurrency)))
        issued = itertools.count()
        stop_at = time.perf_counter() + args.duration if args.duration else None

        def client_loop() -> list[dict]:
            done = []
            while True:
                if stop_at is not None:
                    if time.perf_counter() >= stop_at:
                        return done
                elif next(issued) >= args.requests:
                    return done
                done.append(one())

        start = time.perf_counter()
        records = [r for part in pool.map(lambda _: client_loop(), range(concurrency)) for r in part]
        wall = time.perf_counter() - start
    ok = [r for r in records if r["status"] == 200]
    latencies = [r["seconds"] for r in ok]
    errors = collections.Counter(str(r["status"]) for r in records if r["status"] != 200)
    batches = collections.Counter(r["batch"] for r in ok)
    return {
        "concurrency": concurrency, "requests": len(records), "ok": len(ok), "wall_s": wall,
        "images_per_s": sum(r["n"] for r in ok) / wall, "requests_per_s": len(ok) / wall,
        "latency_s": {"p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95),
                      "p99": percentile(latencies, 0.99), "mean": statistics.fmean(latencies) if latencies else None},
        "batch_images_seen": {str(k): v for k, v in sorted(batches.items())}, "errors": dict(errors),
        "median_ms": split_latency(ok),
    }


def split_latency(ok: list[dict]) -> dict[str, float | None]:
    """Where a request's time went, medians in ms: the replica's own account (queued, run, encode,
    from its response headers) and the rest of the round trip (HTTP, Ray's hops, the body's bytes)."""
    if not ok:
        return {}
    out: dict[str, float | None] = {part: statistics.median(r[part] for r in ok) for part in SERVER_PARTS}
    out["outside_replica"] = statistics.median(r["seconds"] * 1e3 - sum(r[part] for part in SERVER_PARTS)
                                               for r in ok)
    return {k: (None if v != v else round(v, 2)) for k, v in out.items()}  # NaN: a server without the headers


def offline(config: str, batches: list[int], extra: dict, prompt: str, runs: int = 5,
            threads: int | None = None, prior_dtype: str | None = None, prior_batch: int | None = None) -> dict:
    """Median wall ms of `UnCLIP.generate` per batch size, in this process, fp16 on the GPU (the
    text encoder and the prior in `prior_dtype`, default fp16 too, at `prior_batch` rows, default
    the call's own)."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from models.configs import get_config
    from models.unclip import UnCLIPModel
    from runtime import UnCLIP

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = UnCLIPModel(get_config(config))
    pipe = UnCLIP(model, device="cuda", dtype=torch.float16, progress=False,
                  prior_dtype=getattr(torch, prior_dtype) if prior_dtype else None, prior_batch=prior_batch)
    steps = {k: v for k, v in extra.items() if k.endswith(("_steps", "_scale"))}
    out = {}
    for n in batches:
        times = []
        for i in range(runs + 2):
            torch.cuda.synchronize()
            start = time.perf_counter()
            pipe.generate(prompt, num_images_per_prompt=n, seed=i, output_type="pil", **steps)
            torch.cuda.synchronize()
            if i >= 2:  # two warm-up calls: graph capture
                times.append(time.perf_counter() - start)
        ms = statistics.median(times) * 1e3
        out[str(n)] = {"ms": ms, "images_per_s": n / ms * 1e3, "runs_ms": [t * 1e3 for t in times]}
    del pipe, model
    torch.cuda.empty_cache()
    return out


def table(levels: list[dict]) -> str:
    head = f"{'clients':>7} {'ok/sent':>9} {'images/s':>9} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7}  batches  errors"
    rows = [head]
    for lv in levels:
        lat = lv["latency_s"]
        fmt = lambda v: f"{v:7.3f}" if v is not None else "      -"  # noqa: E731
        rows.append(f"{lv['concurrency']:>7} {lv['ok']:>4}/{lv['requests']:<4} {lv['images_per_s']:9.2f} "
                    f"{fmt(lat['p50'])} {fmt(lat['p95'])} {fmt(lat['p99'])}  {lv['batch_images_seen']}  "
                    f"{lv['errors'] or '-'}")
        if lv.get("median_ms"):
            rows.append(f"{'':>7} median ms: {', '.join(f'{k} {v}' for k, v in lv['median_ms'].items())}")
    return "\n".join(rows)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    client = Client(args.url, args.timeout)
    try:
        with urllib.request.urlopen(args.url + "/health", timeout=30) as r:
            health = json.loads(r.read())
    except OSError as exc:
        print(f"error: no service at {args.url} ({exc}); start one with python -m serve", file=sys.stderr)
        return 2
    reference = None
    if args.offline:
        reference = offline(args.offline, args.offline_batch, args.extra, args.prompt, threads=args.offline_threads)
        service_settings = offline(args.offline, args.offline_batch, args.extra, args.prompt,
                                   threads=args.offline_threads, prior_dtype=health.get("prior_dtype"),
                                   prior_batch=health.get("prior_batch"))
    levels = [run_level(client, args, c) for c in args.concurrency]
    result = {"url": args.url, "server": health, "n": args.n, "extra": args.extra, "levels": levels}
    if reference is not None:
        result["offline"] = {"config": args.offline, "torch_threads": args.offline_threads, "batches": reference,
                             "service_settings": service_settings}
        for lv in levels:
            lone, full = reference[str(min(args.offline_batch))], reference[str(max(args.offline_batch))]
            p50 = lv["latency_s"]["p50"]
            lv["vs_offline"] = {"images_per_s_ratio": lv["images_per_s"] / full["images_per_s"],
                                "p50_over_lone": p50 * 1e3 / lone["ms"] if p50 else None}
        settings = f"prior batch {health.get('prior_batch')}, prior {health.get('prior_dtype')}"
        for name, runs in (("offline", reference), (f"offline, the service's settings ({settings})", service_settings)):
            print(f"{name}:", {k: f"{v['ms']:.1f} ms, {v['images_per_s']:.2f} images/s" for k, v in runs.items()})
    print(table(levels))
    if reference is not None:
        print("vs offline:", [(lv["concurrency"], lv["vs_offline"]) for lv in levels])
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
