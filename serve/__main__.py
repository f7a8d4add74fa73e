"""`python -m serve [options]`: start the images service and keep it up until Ctrl-C / SIGTERM.

Without `--address` it starts a local Ray instance; with `--address auto` (or HEAD:6379) it joins
a cluster started by `ray start --head` and `ray start --address …`, and places replicas on all
of its nodes. Prints the URL once every replica has loaded its model.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading


def main(argv: list[str] | None = None) -> int:
    from serve.options import parse_args

    options = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import ray
    from ray import serve

    from serve.app import build_app

    if options.address:
        ray.init(address=options.address, logging_level=logging.WARNING)
    else:
        ray.init(address="local", logging_level=logging.WARNING, include_dashboard=False)
    try:
        serve.start(http_options={"host": options.host, "port": options.port})
        serve.run(build_app(options), name="unclip", route_prefix="/")
    except (ValueError, FileNotFoundError, TypeError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        ray.shutdown()
        return 2
    print(f"serving {options.model_id} on http://{options.host}:{options.port} (OpenAI Images API; Ctrl-C stops)",
          flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
