"""The service's parts without Ray: the batcher's grouping, waiting, cancellation and deadlines,
upload decoding (16-bit, empty, bomb-sized, damaged), the answers' image encoding, options and
replica placement."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from serve.batcher import Batcher, DeadlineExceeded, Job
from serve.encoding import encode, media_type
from serve.options import ServeOptions, parse_args
from serve.uploads import UploadTooLarge, decode_upload


def _recorder(delay: float = 0.0):
    calls, lock = [], threading.Lock()

    def run(key, payloads):
        with lock:
            calls.append((key, list(payloads)))
        time.sleep(delay)
        return [f"{key}:{p}" for p in payloads]

    return run, calls


def _job(key, images, payload, deadline_s=60.0, batchable=True):
    return Job(key, images, payload, time.monotonic() + deadline_s, batchable=batchable)


def test_jobs_of_one_key_share_a_call_up_to_max_images_in_arrival_order():
    run, calls = _recorder()

    async def main():
        batcher = Batcher(run, max_images=4, wait_s=0.2)
        jobs = [_job("a", 1, 1), _job("b", 1, 2), _job("a", 2, 3), _job("a", 2, 4), _job("a", 1, 5)]
        return await asyncio.gather(*(batcher.submit(j) for j in jobs))

    results = asyncio.run(main())
    assert [r[0] for r in results] == ["a:1", "b:2", "a:3", "a:4", "a:5"]
    # "a" 1+2 = 3 images, job 4 (2 images) does not fit but job 5 (1) does: 1+2+1 = 4
    assert calls[0] == ("a", [1, 3, 5])
    assert ("b", [2]) in calls and ("a", [4]) in calls and len(calls) == 3
    assert results[0][1].images == 4 and results[0][1].jobs == 3


def test_waiting_for_company_is_bounded_and_skipped_when_full_or_idle():
    run, calls = _recorder()

    async def timed(jobs, wait_s, gap_s=0.0):
        batcher = Batcher(run, max_images=3, wait_s=wait_s)
        start = time.monotonic()
        tasks = []
        for job in jobs:
            job.arrival = time.monotonic()
            tasks.append(asyncio.ensure_future(batcher.submit(job)))
            await asyncio.sleep(gap_s)
        await asyncio.gather(*tasks)
        return time.monotonic() - start

    # a request into an idle replica runs at once
    assert asyncio.run(timed([_job("a", 1, 1)], 5.0)) < 1.0
    # a request right behind another waits for company, at most the wait
    assert 0.25 <= asyncio.run(timed([_job("a", 1, 1), _job("a", 1, 2)], 0.3, gap_s=0.01)) < 1.5
    assert calls[-1] == ("a", [2]) or calls[-1] == ("a", [1, 2])
    # a full group does not wait
    assert asyncio.run(timed([_job("a", 1, i) for i in range(4)], 5.0)) < 1.0


def test_unbatchable_jobs_run_alone_without_waiting():
    run, calls = _recorder()

    async def main():
        batcher = Batcher(run, max_images=8, wait_s=5.0)
        start = time.monotonic()
        await asyncio.gather(*(batcher.submit(_job(("v",), 1, i, batchable=False)) for i in range(2)))
        return time.monotonic() - start

    assert asyncio.run(main()) < 1.0
    assert calls == [(("v",), [0]), (("v",), [1])]


def test_a_cancelled_job_is_dropped_before_it_runs():
    run, calls = _recorder(delay=0.3)

    async def main():
        batcher = Batcher(run, max_images=1, wait_s=0.0)
        first = asyncio.ensure_future(batcher.submit(_job("a", 1, "first")))
        await asyncio.sleep(0.05)  # first is running
        second = asyncio.ensure_future(batcher.submit(_job("a", 1, "second")))
        await asyncio.sleep(0.05)
        second.cancel()
        await first
        await asyncio.sleep(0.4)
        return second.cancelled()

    assert asyncio.run(main())
    assert calls == [("a", ["first"])]


def test_a_job_past_its_deadline_fails_and_never_runs():
    run, calls = _recorder(delay=0.3)

    async def main():
        batcher = Batcher(run, max_images=1, wait_s=0.0)
        first = asyncio.ensure_future(batcher.submit(_job("a", 1, "first")))
        await asyncio.sleep(0.05)
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(_job("a", 1, "late", deadline_s=0.1))
        await first

    asyncio.run(main())
    assert calls == [("a", ["first"])]


def test_a_failing_call_fails_its_jobs_and_the_next_call_runs():
    def run(key, payloads):
        if key == "bad":
            raise ValueError("broken")
        return payloads

    async def main():
        batcher = Batcher(run, max_images=4, wait_s=0.0)
        with pytest.raises(ValueError, match="broken"):
            await batcher.submit(_job("bad", 1, 1))
        return await batcher.submit(_job("good", 1, 2))

    assert asyncio.run(main())[0] == 2


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def test_a_16_bit_png_is_scaled_not_clipped():
    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    out = decode_upload(_png(ramp), 1 << 20)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    expected = np.rint(ramp / 65535 * 255).astype(np.uint8)
    assert np.array_equal(out[:, :, 0], expected)
    assert (out == 255).mean() < 0.01


def test_rgba_is_composited_on_white_and_rgb_kept():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    out = decode_upload(_png(rgba), 1 << 20)
    assert (out == 255).all()  # fully transparent: white
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert np.array_equal(decode_upload(_png(rgb), 1 << 20), rgb)


def test_bad_uploads_are_refused_with_the_reason():
    with pytest.raises(UploadTooLarge, match="over the 10-byte limit"):
        decode_upload(b"x" * 11, 10)
    with pytest.raises(ValueError, match="empty"):
        decode_upload(b"", 10)
    with pytest.raises(ValueError, match="not a readable"):
        decode_upload(b"GIF89a" + b"\0" * 40, 1 << 20)
    with pytest.raises(ValueError, match="damaged or truncated|not a readable"):
        decode_upload(_png(np.zeros((32, 32, 3), np.uint8))[:60], 1 << 20)
    # a header that claims 20000×10000 pixels: refused from the header, nothing decoded
    header = _png(np.zeros((1, 1, 3), np.uint8))
    bomb = header[:16] + (20000).to_bytes(4, "big") + (10000).to_bytes(4, "big") + header[24:]
    with pytest.raises(ValueError, match="pixel limit|not a readable"):
        decode_upload(bomb, 1 << 20)


def test_images_are_encoded_in_the_asked_format_and_quality():
    """PNG lossless whatever the compression says; JPEG and WebP at the asked quality (100 by
    default, as OpenAI's): near the pixels at 100, smaller and further at 10; bad asks refused."""
    import base64

    rng = np.random.default_rng(0)
    smooth = np.clip(np.add.outer(np.arange(256), np.arange(256))[..., None] // 2 + rng.integers(0, 8, (256, 256, 3)),
                     0, 255).astype(np.uint8)
    image = Image.fromarray(smooth)

    def back(text):
        raw = base64.b64decode(text)
        with Image.open(io.BytesIO(raw)) as im:
            return im.format, np.asarray(im.convert("RGB"), dtype=np.float64), len(raw)

    fmt, pixels, _ = back(encode(image))
    assert fmt == "PNG" and np.array_equal(pixels, smooth)
    assert encode(image, "png", 3) == encode(image, "png")  # lossless: the compression is ignored
    for name, pillow in (("jpeg", "JPEG"), ("webp", "WEBP")):
        fmt, best, best_bytes = back(encode(image, name))
        assert fmt == pillow and best.shape == (256, 256, 3)
        assert encode(image, name) == encode(image, name, 100)  # the default is 100
        _, worst, worst_bytes = back(encode(image, name, 10))
        best_err, worst_err = np.abs(best - smooth).mean(), np.abs(worst - smooth).mean()
        assert best_err < 3.0 and worst_err > best_err and worst_bytes < best_bytes, (name, best_err, worst_err)
        assert media_type(name) == f"image/{name}"
    with pytest.raises(ValueError, match="output_format") as refused:
        encode(image, "gif")
    assert refused.value.param == "output_format"
    for bad in (101, -1, 50.0, True):
        with pytest.raises(ValueError, match="output_compression") as refused:
            encode(image, "jpeg", bad)
        assert refused.value.param == "output_compression"


def test_options_are_checked_and_parsed():
    opts = parse_args(["--max-batch", "4", "--replicas", "2", "--port", "9000"])
    assert (opts.max_batch, opts.replicas, opts.port, opts.model_id) == (4, 2, 9000, "unclip-rt-default")
    assert ServeOptions(karlo="/w/karlo-v1").model_id == "unclip-rt-karlo-v1"
    with pytest.raises(ValueError, match="--max-batch"):
        ServeOptions(max_batch=0)
    with pytest.raises(ValueError, match="one model source"):
        ServeOptions(model="a", karlo="b")
    assert parse_args(["--prior-dtype", "float16"]).prior_dtype == "float16"
    with pytest.raises(ValueError, match="--prior-dtype must be one of"):
        ServeOptions(prior_dtype="float64")
    with pytest.raises(ValueError, match="unknown service options: bogus"):
        ServeOptions.from_dict({"bogus": 1})
    with pytest.raises(SystemExit):
        parse_args(["--replicas", "0"])


def test_a_replica_runs_the_text_encoder_and_the_prior_at_one_fixed_batch():
    """The service's batching rule (`serve.worker.load_pipelines`): the conditioning stages always
    run at `--prior-batch` rows (default `DEFAULT_PRIOR_BATCH`, at most `--max-batch`), so that a
    request batched with others gets the embedding it would get alone; `--prior-dtype` (default:
    `--dtype`) sets their dtype."""
    import torch

    from serve.options import DEFAULT_PRIOR_BATCH
    from serve.worker import load_pipelines

    pipes = load_pipelines(ServeOptions(random_weights="tiny", device="cpu", dtype="bfloat16", max_batch=6))
    assert {(p.dtype, p.prior_dtype, p.prior_batch) for p in pipes.values()} == {(torch.bfloat16, torch.bfloat16,
                                                                                  DEFAULT_PRIOR_BATCH)}
    assert load_pipelines(ServeOptions(random_weights="tiny", device="cpu", max_batch=2))["diffusion"].prior_batch == 2
    pipes = load_pipelines(ServeOptions(random_weights="tiny", device="cpu", dtype="bfloat16", prior_dtype="float32",
                                        prior_batch=3))
    assert (pipes["diffusion"].prior_dtype, pipes["diffusion"].prior_batch) == (torch.float32, 3)
    assert next(pipes["diffusion"].model.prior.parameters()).dtype == torch.float32
    assert parse_args(["--prior-batch", "4"]).prior_batch == 4
    with pytest.raises(ValueError, match="--prior-batch must be an integer >= 1"):
        ServeOptions(prior_batch=0)


def test_an_fp8_replica_converts_the_model_once_for_both_priors():
    from serve.worker import load_pipelines

    with pytest.raises(ValueError, match="--precision must be fp8"):
        ServeOptions(precision="int8")
    assert parse_args(["--precision", "fp8"]).precision == "fp8"
    pipes = load_pipelines(ServeOptions(device="cpu", precision="fp8"))  # the default model: both priors
    assert sorted(pipes) == ["ar", "diffusion"]
    assert pipes["ar"].model is pipes["diffusion"].model  # shared, not converted twice
    assert pipes["diffusion"].fp8_scales.startswith("calibrated") and pipes["ar"].fp8_scales == "as converted"
    assert {p.precision for p in pipes.values()} == {"fp8"}


def test_replicas_follow_the_gpus_and_cpus():
    from serve.app import plan_placement

    assert plan_placement(ServeOptions(), {"CPU": 64, "GPU": 4}) == plan_placement(
        ServeOptions(replicas=4), {"CPU": 64, "GPU": 4})
    gpu = plan_placement(ServeOptions(), {"CPU": 64, "GPU": 4})
    assert (gpu.replicas, gpu.gpus, gpu.cpus) == (4, 1.0, 2.0)
    cpu = plan_placement(ServeOptions(), {"CPU": 8})
    assert (cpu.replicas, cpu.gpus, cpu.cpus) == (1, 0.0, 8.0)
    assert plan_placement(ServeOptions(device="cpu"), {"CPU": 8, "GPU": 2}).gpus == 0.0
    with pytest.raises(ValueError, match="one replica per GPU"):
        plan_placement(ServeOptions(replicas=3), {"CPU": 8, "GPU": 2})
    with pytest.raises(ValueError, match="no GPUs"):
        plan_placement(ServeOptions(device="cuda"), {"CPU": 8})


def test_the_unclip_rt_command_dispatches_serve_and_keeps_the_runtime_cli(capsys):
    from serve.cli import main

    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0 and "python -m serve" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "unCLIP text-to-image" in capsys.readouterr().out


def test_the_serve_config_and_the_kuberay_example_name_a_buildable_app():
    import importlib
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parent.parent / "serve"
    config = yaml.safe_load((root / "config.yaml").read_text())
    service = yaml.safe_load((root / "kuberay.yaml").read_text())
    inner = yaml.safe_load(service["spec"]["serveConfigV2"])
    for cfg in (config, inner):
        (app,) = cfg["applications"]
        module, name = app["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module), name))
        options = ServeOptions.from_dict(app["args"])
        assert options.max_batch == 8 and options.timeout_s == 120
    assert service["kind"] == "RayService" and inner["applications"][0]["args"]["karlo"] == "/weights/karlo"
