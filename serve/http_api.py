"""The HTTP ingress: OpenAI's Images API in front of the model replicas.

Routes: `POST /v1/images/generations`, `POST /v1/images/variations`, `GET /v1/models`,
`GET /health`, and the web page at `/`. Every request is checked here against the model's facts
(its size, its priors) before a replica sees it; errors use OpenAI's body with 400 (bad input),
413 (upload too large), 429 + Retry-After (this ingress holds `max_queued` × replicas unfinished
requests, or the replicas' queues are full), 504 (past the deadline) and 500 (our fault). A
request whose replica dies is sent again (same seed, so the same images) until its deadline; a
client that disconnects has its queued work cancelled. One log line per request.
"""

import asyncio
import json
import logging
import math
import secrets
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import ValidationError
from ray import serve

from serve.encoding import DEFAULT_FORMAT, media_type
from serve.metrics import IngressMetrics
from serve.options import ServeOptions
from serve.schemas import APIError, GenerationRequest, VariationRequest, validation_error
from serve.uploads import UploadTooLarge, decode_upload

log = logging.getLogger("ray.serve")

PAGE = Path(__file__).with_name("static") / "index.html"
TIMEOUT_HEADER = "x-unclip-timeout-s"  # a client's own deadline, shorter than the server's
MODEL_ALIASES = ("dall-e-2",)  # what OpenAI clients send by default: served by this model

app = FastAPI(title="unclip-rt images", docs_url=None, redoc_url=None)


def _replica_lost_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean the replica died or vanished mid-request: the request is sent again."""
    import ray.exceptions
    from ray.serve import exceptions as serve_exceptions

    kinds = [ray.exceptions.RayActorError]
    for name in ("ActorUnavailableError", "ActorDiedError"):
        if hasattr(ray.exceptions, name):
            kinds.append(getattr(ray.exceptions, name))
    for name in ("ReplicaUnavailableError", "DeploymentUnavailableError"):
        if hasattr(serve_exceptions, name):
            kinds.append(getattr(serve_exceptions, name))
    return tuple(kinds)


def _encoding(body: GenerationRequest | VariationRequest) -> dict:
    """How the replica encodes the request's images (`serve.encoding`): the format and its quality."""
    return {"output_format": body.output_format or DEFAULT_FORMAT, "output_compression": body.output_compression}


def _model_entry(info: dict) -> dict:
    return {"id": info["model_id"], "object": "model", "created": info["created"], "owned_by": "unclip-rt",
            "image_size": info["size"], "image_sizes": info["sizes"], "priors": info["priors"]}


@serve.ingress(app)
class ImagesAPI:
    """The ingress deployment (`serve.app` binds it to the worker deployment's handle)."""

    def __init__(self, worker, options: ServeOptions, replicas: int) -> None:
        from ray.serve.exceptions import BackPressureError

        self.worker, self.options, self.replicas = worker, options, replicas
        self.max_in_flight = options.max_queued * replicas
        self.in_flight = 0
        self.mean_seconds = 1.0  # running mean of request seconds, for Retry-After
        self.info: dict | None = None
        self.metrics = IngressMetrics()
        self.backpressure = BackPressureError
        self.replica_lost = _replica_lost_errors()

    # --- helpers ----------------------------------------------------------------------------
    async def model_info(self) -> dict:
        if self.info is None:
            try:
                self.info = await asyncio.wait_for(self.worker.info.remote(), timeout=30)
            except Exception as exc:
                raise APIError(503, f"no model replica answered ({type(exc).__name__})", type="server_error",
                               code="unavailable", headers={"Retry-After": "5"}) from exc
        return self.info

    def _retry_after(self) -> str:
        per_slot = self.mean_seconds / max(1, self.options.max_batch)
        return str(max(1, math.ceil(per_slot * self.in_flight / max(1, self.replicas))))

    def _check_model(self, model: str | None, info: dict) -> None:
        if model is not None and model != info["model_id"] and model not in MODEL_ALIASES:
            raise APIError(404, f"The model '{model}' does not exist (this server has '{info['model_id']}').",
                           param="model", code="model_not_found")

    def _check_size(self, size: str | None, info: dict, any_stage: bool = True) -> str:
        """The request's size as "SxS": the model's default (none given, or "auto" as OpenAI's newer
        models take it), or with `any_stage` the size after the decoder or any super-res stage of
        its chain."""
        own = f"{info['size']}x{info['size']}"
        allowed = [f"{s}x{s}" for s in info["sizes"]] if any_stage else [own]
        if size == "auto":
            return own
        if size is not None and size not in allowed:
            raise APIError(400, f"size must be one of {allowed} (this model's sizes; default '{own}'), got {size!r}",
                           param="size", code="invalid_size")
        return size or own

    async def _call(self, method: str, payload: dict, deadline: float) -> dict:
        """The worker's answer, sent again while replicas die, until the deadline."""
        late = APIError(504, "the request did not finish within its deadline", type="timeout",
                        code="deadline_exceeded")
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise late
            response = getattr(self.worker, method).remote({**payload, "timeout_s": remaining})
            try:
                result = await asyncio.wait_for(response, remaining)
            except TimeoutError:
                response.cancel()
                raise late from None
            except asyncio.CancelledError:  # the client went away: drop its queued work
                response.cancel()
                raise
            except self.backpressure:
                raise APIError(429, "the server is at capacity; retry later", type="server_busy",
                               code="queue_full", headers={"Retry-After": self._retry_after()}) from None
            except self.replica_lost as exc:
                attempt += 1
                log.warning("replica lost during a request (%s); sending it again (attempt %d)",
                            type(exc).__name__, attempt + 1)
                await asyncio.sleep(min(0.2 * attempt, 2.0))
                continue
            if "error" in result:
                e = result["error"]
                status = 504 if e.get("code") == "deadline_exceeded" else 400
                raise APIError(status, e["message"], type=e.get("type", "invalid_request_error"),
                               param=e.get("param"), code=e.get("code"))
            return result

    def _deadline(self, request: Request, start: float) -> float:
        """The request's deadline: the server's `timeout_s`, or sooner if the client's
        `x-unclip-timeout-s` header asks for it."""
        timeout = self.options.timeout_s
        asked = request.headers.get(TIMEOUT_HEADER)
        if asked is not None:
            try:
                value = float(asked)
            except ValueError:
                value = float("nan")
            if not 0 < value < float("inf"):
                raise APIError(400, f"{TIMEOUT_HEADER} must be a number of seconds > 0, got {asked!r}",
                               param=TIMEOUT_HEADER, code="invalid_value")
            timeout = min(timeout, value)
        return start + timeout

    async def _admit(self, route: str, request: Request, handler) -> JSONResponse:
        """Admission control, timing, error bodies and the log line around one request."""
        start = time.monotonic()
        request_id = uuid.uuid4().hex[:16]
        code, images, batch = 500, 0, None
        if self.in_flight >= self.max_in_flight:
            code = 429
            error = APIError(429, f"the server holds {self.in_flight} unfinished requests, its limit; retry later",
                             type="server_busy", code="queue_full", headers={"Retry-After": self._retry_after()})
            response = JSONResponse(error.body(), status_code=429, headers=error.headers)
            self._record(route, request_id, code, images, batch, start, "queue_full")
            return response
        self.in_flight += 1
        kind = None
        try:
            body, headers = await handler(self._deadline(request, start))
            images, batch = len(body["data"]), headers.get("x-unclip-batch-images")
            code = 200
            return JSONResponse(body, headers={"x-unclip-request-id": request_id, **headers})
        except APIError as exc:
            code, kind = exc.status, exc.code or exc.type
            return JSONResponse(exc.body(), status_code=exc.status, headers={"x-unclip-request-id": request_id,
                                                                               **exc.headers})
        except asyncio.CancelledError:
            code, kind = 499, "client_disconnected"
            raise
        except Exception as exc:  # a bug or an unexpected replica failure: a 500 in OpenAI's shape
            log.exception("request %s failed", request_id)
            kind = type(exc).__name__
            error = APIError(500, f"internal error ({type(exc).__name__}); the request id is {request_id}",
                             type="server_error", code="internal_error")
            return JSONResponse(error.body(), status_code=500, headers={"x-unclip-request-id": request_id})
        finally:
            self.in_flight -= 1
            seconds = time.monotonic() - start
            if code == 200:
                self.mean_seconds = 0.9 * self.mean_seconds + 0.1 * seconds
            self._record(route, request_id, code, images, batch, start, kind)

    def _record(self, route, request_id, code, images, batch, start, kind) -> None:
        seconds = time.monotonic() - start
        self.metrics.requests.inc(tags={"route": route, "code": str(code)})
        self.metrics.request_seconds.observe(seconds, tags={"route": route})
        if kind is not None:
            self.metrics.errors.inc(tags={"kind": str(kind)})
        log.info("request id=%s route=%s code=%s images=%d batch=%s seconds=%.3f%s", request_id, route, code, images,
                 batch or "-", seconds, f" error={kind}" if kind else "")

    @staticmethod
    def _images_body(result: dict, response_format: str | None, size: str) -> tuple[dict, dict]:
        as_url = (response_format or "url") == "url"
        fmt = result["output_format"]
        data = [
            {"url": f"data:{media_type(fmt)};base64,{b64}"} if as_url else {"b64_json": b64}
            for b64 in result["images"]
        ]
        for index, item in enumerate(data):
            item.update({"seed": result["seed"], "index": index})
        headers = {"x-unclip-replica": str(result["replica"]), "x-unclip-node": str(result["node_id"]),
                   "x-unclip-batch-images": str(result["batch_images"]),
                   "x-unclip-queued-ms": f"{result['queued_s'] * 1e3:.1f}",
                   "x-unclip-run-ms": f"{result['run_s'] * 1e3:.1f}",
                   "x-unclip-encode-ms": f"{result['encode_s'] * 1e3:.1f}",
                   "x-unclip-batch-requests": str(result["batch_requests"])}
        return {"created": int(time.time()), "data": data, "size": size, "output_format": fmt}, headers

    # --- routes -----------------------------------------------------------------------------
    @app.post("/v1/images/generations")
    async def generations(self, request: Request) -> JSONResponse:
        async def handle(deadline: float):
            try:
                raw = await request.body()
                values = json.loads(raw or b"null")
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise APIError(400, f"the body is not valid JSON ({exc})", code="invalid_json") from None
            if not isinstance(values, dict):
                raise APIError(400, "the body must be a JSON object with at least 'prompt'", code="invalid_json")
            try:
                body = GenerationRequest.model_validate(values)
            except ValidationError as exc:
                raise validation_error(exc) from None
            info = await self.model_info()
            self._check_model(body.model, info)
            size = self._check_size(body.size, info)
            prior = body.prior or "diffusion"
            if prior not in info["priors"]:
                raise APIError(400, f"prior '{prior}' is not available: this model has {', '.join(info['priors'])}",
                               param="prior", code="invalid_value")
            if prior == "ar":
                wrong = [k for k in ("prior_steps", "prior_guidance_scale") if getattr(body, k) is not None]
                if wrong:
                    raise APIError(400, f"{', '.join(wrong)} apply to the diffusion prior, not prior='ar'",
                                   param=wrong[0], code="invalid_value")
            seed = body.seed if body.seed is not None else secrets.randbelow(2**63)
            settings = {k: getattr(body, k) for k in ("prior_steps", "decoder_steps", "super_res_steps",
                                                      "prior_guidance_scale", "decoder_guidance_scale")
                        if getattr(body, k) is not None}
            settings["size"] = int(size.split("x")[0])
            payload = {"prompt": body.prompt, "n": body.n or 1, "seed": seed, "prior": prior, "settings": settings,
                       **_encoding(body)}
            result = await self._call("generate", payload, deadline)
            return self._images_body(result, body.response_format, size)

        return await self._admit("generations", request, handle)

    @app.post("/v1/images/variations")
    async def variations(self, request: Request) -> JSONResponse:
        async def handle(deadline: float):
            limit = int(self.options.max_upload_mb * 1024 * 1024)
            # An upload somewhat over the limit is read to its end before the 413, so that the client,
            # still sending, gets the answer rather than a reset connection; far over it, the
            # connection is cut as soon as that is known.
            hard_cap = 4 * limit + (1 << 20)
            too_large = APIError(413, f"the upload is over {limit} bytes, the limit for images", param="image",
                                 code="payload_too_large")
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > hard_cap:
                raise too_large
            raw, size = bytearray(), 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > hard_cap:
                    raise too_large
                if size <= limit + 65536:
                    raw.extend(chunk)
            if size > limit + 65536:
                raise too_large
            request._body = bytes(raw)  # the form parser reads the body already received
            try:
                form = await request.form(max_files=1, max_fields=16)
            except Exception as exc:  # not multipart, or malformed
                raise APIError(400, f"expected a multipart/form-data body with an 'image' file ({exc})",
                               param="image", code="invalid_form") from None
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise APIError(400, "Missing required parameter: 'image' (a PNG file).", param="image",
                               code="missing_required_parameter")
            fields = {k: v for k, v in form.items() if k != "image"}
            try:
                body = VariationRequest.model_validate(fields)
            except ValidationError as exc:
                raise validation_error(exc) from None
            data = await upload.read()
            try:
                image = decode_upload(data, limit, "image")
            except UploadTooLarge as exc:
                raise APIError(413, str(exc), param="image", code="payload_too_large") from None
            except ValueError as exc:
                raise APIError(400, str(exc), param="image", code="invalid_image") from None
            info = await self.model_info()
            self._check_model(body.model, info)
            size = self._check_size(body.size, info, any_stage=False)  # variations: the default size
            seed = body.seed if body.seed is not None else secrets.randbelow(2**63)
            payload = {"image": image, "n": body.n or 1, "seed": seed, "steps": body.decoder_steps,
                       "decoder_guidance_scale": body.decoder_guidance_scale, **_encoding(body)}
            result = await self._call("variations", payload, deadline)
            return self._images_body(result, body.response_format, size)

        return await self._admit("variations", request, handle)

    @app.get("/v1/models")
    async def models(self) -> JSONResponse:
        try:
            info = await self.model_info()
        except APIError as exc:
            return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
        return JSONResponse({"object": "list", "data": [_model_entry(info)]})

    @app.get("/v1/models/{model_id}")
    async def model(self, model_id: str) -> JSONResponse:
        info = await self.model_info()
        if model_id != info["model_id"]:
            error = APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
            return JSONResponse(error.body(), status_code=404)
        return JSONResponse(_model_entry(info))

    @app.get("/health")
    async def health(self) -> JSONResponse:
        try:
            info = await asyncio.wait_for(self.worker.info.remote(), timeout=10)
        except Exception as exc:
            return JSONResponse({"status": "unavailable", "reason": type(exc).__name__}, status_code=503)
        # the answering replica's facts (`ImageWorker.info`), and this ingress's
        return JSONResponse({"status": "ok", "model": info["model_id"], **info, "replicas": self.replicas,
                             "in_flight": self.in_flight})

    @app.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))
