"""The images service: unCLIP behind OpenAI's Images API, on Ray Serve.

`python -m serve` (or `unclip-rt serve`) starts it; `serve.app.build_app` builds the Serve
application for `serve run` / `serve deploy` (see `serve/config.yaml`). Layers: an HTTP ingress
(`serve.http_api`: validation, admission, deadlines, retries) in front of model replicas
(`serve.worker`: one `runtime.UnCLIP` each, requests batched by `serve.batcher`).
"""
