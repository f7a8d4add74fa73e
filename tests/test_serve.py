"""The images service end to end on the CPU: `python -m serve` with the shipped default model,
driven by the official `openai` client and by raw HTTP. Each request's images equal a lone
`UnCLIP.generate`/`variations` with its seed, bit for bit (same torch thread count); concurrent
requests are batched; bad input gets OpenAI's error body; overload gets 429 with Retry-After; a
killed replica loses no accepted request; a client that leaves has its queued work dropped; a
request past its deadline gets 504 and never runs."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import signal
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from runtime import UnCLIP
from tests.serve_harness import Server

pytestmark = pytest.mark.slow

FAST = {"prior_steps": 2, "decoder_steps": 2, "super_res_steps": 2}
MAX_QUEUED = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    srv = Server(["--max-batch", "8", "--batch-wait-ms", "400", "--max-queued", str(MAX_QUEUED),
                  "--timeout-s", "180"], log)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def lone(server):
    """The reference: `UnCLIP` in this process at the replica's torch thread count."""
    health = server.get("/health")
    assert health["backend"] == "torch" and health["stage_backends"] == {}  # what the replica says runs it
    threads = health["torch_threads"]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    yield UnCLIP(device="cpu", progress=False)
    torch.set_num_threads(before)


def post(server, path: str, body: dict | bytes, headers: dict | None = None, timeout: float = 180):
    """(status, headers, JSON body) of a POST."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def decode(b64: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG" and image.size == (256, 256) and image.mode == "RGB"
    return np.asarray(image)


def lone_images(lone, prompt: str, n: int, seed: int, **kw) -> list[np.ndarray]:
    return [np.asarray(im) for im in lone.generate(prompt, num_images_per_prompt=n, seed=seed, **kw).images]


def test_openai_client_generates_the_lone_images(server, lone):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    result = client.images.generate(model="unclip-rt-default", prompt="a red circle", n=2, size="256x256",
                                    response_format="b64_json", extra_body={"seed": 11, **FAST})
    got = [decode(d.b64_json) for d in result.data]
    want = lone_images(lone, "a red circle", 2, 11, **FAST)
    assert len(got) == 2 and all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    assert [d.model_extra["seed"] for d in result.data] == [11, 11]
    assert [d.model_extra["index"] for d in result.data] == [0, 1]
    models = client.models.list()
    assert [m.id for m in models.data] == ["unclip-rt-default"]


def test_openai_client_variations_are_the_lone_variations(server, lone, tmp_path):
    from openai import OpenAI

    source = lone.generate("a blue square", seed=3, **FAST).images[0]
    path = tmp_path / "in.png"
    source.save(path)
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with open(path, "rb") as f:
        result = client.images.create_variation(image=f, n=2, size="256x256", response_format="b64_json",
                                                extra_body={"seed": 4, "decoder_steps": 2})
    got = [decode(d.b64_json) for d in result.data]
    want = [np.asarray(im) for im in lone.variations(np.asarray(source), 2, seed=4, steps=2).images]
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))


def test_concurrent_requests_are_batched_and_each_equals_its_lone_generate(server, lone):
    jobs = [("a red circle", 1, 21), ("a green triangle", 2, 22), ("a blue square", 1, 23), ("a yellow star", 3, 24)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda j: post(server, "/v1/images/generations", {
            "prompt": j[0], "n": j[1], "seed": j[2], "response_format": "b64_json", **FAST}), jobs))
    batches = [int(h["x-unclip-batch-images"]) for _, h, _ in answers]
    assert all(status == 200 for status, _, _ in answers)
    assert max(batches) > 1, batches  # at least two requests shared a model call
    for (prompt, n, seed), (_, _, body) in zip(jobs, answers, strict=True):
        got = [decode(d["b64_json"]) for d in body["data"]]
        want = lone_images(lone, prompt, n, seed, **FAST)
        assert len(got) == n and all(np.array_equal(a, b) for a, b in zip(got, want, strict=True)), prompt


def test_a_size_of_the_chain_gives_that_stages_images(server, lone):
    """`size` may name the decoder's size or any super-res stage's: the images of a lone `generate`
    stopped there; `super_res_steps` may be a list of one per stage that runs."""
    body = {"prompt": "a red circle", "seed": 3, "response_format": "b64_json", **FAST}
    status, _, answer = post(server, "/v1/images/generations", {**body, "size": "64x64", "super_res_steps": None})
    assert status == 200, answer
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["data"][0]["b64_json"]))))
    want = lone_images(lone, "a red circle", 1, 3, size=64, **{k: v for k, v in FAST.items() if k != "super_res_steps"})
    assert got.shape == (64, 64, 3) and np.array_equal(got, want[0]) and answer["size"] == "64x64"
    status, _, answer = post(server, "/v1/images/generations", {**body, "super_res_steps": [FAST["super_res_steps"]]})
    assert status == 200 and np.array_equal(decode(answer["data"][0]["b64_json"]), lone_images(lone, "a red circle", 1,
                                                                                              3, **FAST)[0])
    assert server.get("/v1/models")["data"][0]["image_sizes"] == [64, 256, 1024]
    status, _, answer = post(server, "/v1/images/generations", {**body, "size": "auto"})  # the default size
    assert status == 200 and answer["size"] == "256x256" and np.array_equal(decode(answer["data"][0]["b64_json"]),
                                                                            lone_images(lone, "a red circle", 1, 3,
                                                                                        **FAST)[0])


def test_jpeg_and_webp_answers_are_the_lone_images_encoded_so(server, lone):
    """`output_format` and `output_compression` (OpenAI's): the lone image, through that format at
    that quality; the answer and its data URLs name the format; requests asking for different
    formats still share a call (the format is the encoding's, not the model's)."""
    want = np.asarray(lone_images(lone, "a red circle", 1, 5, **FAST)[0], dtype=np.float64)
    asks = [{"output_format": "jpeg"}, {"output_format": "webp", "output_compression": 20},
            {"output_format": "png", "output_compression": 20}, {"response_format": "url", "output_format": "webp"}]
    with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(lambda ask: post(server, "/v1/images/generations", {
            "prompt": "a red circle", "seed": 5, "response_format": "b64_json", **FAST, **ask}), asks))
    errors = []
    for ask, (status, _, body) in zip(asks, answers, strict=True):
        assert status == 200, body
        fmt = ask["output_format"]
        assert body["output_format"] == fmt
        item = body["data"][0]
        if "url" in item:
            prefix = f"data:image/{fmt};base64,"
            assert item["url"].startswith(prefix)
            raw = base64.b64decode(item["url"][len(prefix):])
        else:
            raw = base64.b64decode(item["b64_json"])
        with Image.open(io.BytesIO(raw)) as image:
            assert image.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt] and image.size == (256, 256)
            errors.append(np.abs(np.asarray(image.convert("RGB"), dtype=np.float64) - want).mean())
    assert errors[2] == 0.0  # PNG: lossless, the compression ignored
    assert errors[0] < 3.0 and errors[3] < 3.0 and errors[1] > errors[3], errors  # quality 100 vs 20
    assert max(int(h["x-unclip-batch-requests"]) for _, h, _ in answers) > 1  # formats shared a call


def test_different_settings_are_not_batched_together(server):
    jobs = [{"decoder_steps": 2}, {"decoder_steps": 3}]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda extra: post(server, "/v1/images/generations", {
            "prompt": "a cat", "seed": 1, **FAST, **extra}), jobs))
    assert [a[0] for a in answers] == [200, 200]
    assert [a[1]["x-unclip-batch-requests"] for a in answers] == ["1", "1"]


@pytest.mark.parametrize(("body", "status", "param", "fragment"), [
    ({"prompt": "x", "size": "512x512"}, 400, "size", "['64x64', '256x256', '1024x1024']"),
    ({"prompt": "x", "n": 11}, 400, "n", "less than or equal to 10"),
    ({"prompt": "x", "n": 0}, 400, "n", "greater than or equal to 1"),
    ({"prompt": "x", "n": "2"}, 400, "n", "integer"),
    ({"n": 1}, 400, "prompt", "Missing required parameter"),
    ({"prompt": "x", "style": "vivid"}, 400, "style", "Unrecognized request argument"),
    ({"prompt": "x", "model": "dall-e-3"}, 404, "model", "does not exist"),
    ({"prompt": "x", "response_format": "jpeg"}, 400, "response_format", "Invalid value"),
    ({"prompt": "x", "output_format": "gif"}, 400, "output_format", "Invalid value"),
    ({"prompt": "x", "output_format": "jpeg", "output_compression": 101}, 400, "output_compression",
     "less than or equal to 100"),
    ({"prompt": "x", "output_compression": "50"}, 400, "output_compression", "integer"),
    ({"prompt": "x", "seed": -1}, 400, "seed", "greater than or equal to 0"),
    ({"prompt": "x", "seed": 2**64}, 400, "seed", "less than or equal to"),
    ({"prompt": "x", "decoder_guidance_scale": 1e308}, 400, "decoder_guidance_scale", "less than or equal to 100"),
    ({"prompt": "x", "super_res_steps": 1}, 400, "super_res_steps", "greater than or equal to 2"),
    ({"prompt": "x", "super_res_steps": [2, 3]}, 400, None, "one value per super-res stage that runs (1)"),
    ({"prompt": "x", "size": "64x64", "super_res_steps": 2}, 400, None, "no super-res stage runs"),
    ({"prompt": "x", "prior": "ar", "prior_steps": 3}, 400, "prior_steps", "diffusion prior"),
    ({"prompt": "x" * 1001}, 400, "prompt", "at most 1000"),
    ([1, 2], 400, None, "JSON object"),
])
def test_bad_input_gets_openais_error_body(server, body, status, param, fragment):
    before = server.get("/health")["calls"]
    code, _, answer = post(server, "/v1/images/generations", body)
    assert code == status
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["param"] == param and fragment in answer["error"]["message"], answer
    assert server.get("/health")["calls"] == before  # nothing reached the model


def test_garbage_json_and_bad_uploads_are_refused(server):
    code, _, answer = post(server, "/v1/images/generations", b"{not json")
    assert code == 400 and "not valid JSON" in answer["error"]["message"]
    big = b"\x89PNG" + os.urandom(5 * 1024 * 1024)
    code, _, answer = _multipart(server, big)
    assert code == 413 and answer["error"]["code"] == "payload_too_large"
    code, _, answer = _multipart(server, b"not an image at all")
    assert code == 400 and answer["error"]["param"] == "image" and "readable" in answer["error"]["message"]
    code, _, answer = _multipart(server, None)
    assert code == 400 and answer["error"]["param"] == "image"


def _multipart(server, data: bytes | None):
    boundary = "unclipboundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="n"\r\n\r\n1\r\n'.encode()]
    if data is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
                     "Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return post(server, "/v1/images/variations", b"".join(parts),
                {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def test_overload_is_answered_429_with_retry_after_and_every_accepted_request_finishes(server):
    body = {"prompt": "a cat", "seed": 5, "response_format": "b64_json", **FAST, "decoder_steps": 4}
    with concurrent.futures.ThreadPoolExecutor(3 * MAX_QUEUED) as pool:
        answers = list(pool.map(lambda _: post(server, "/v1/images/generations", body), range(3 * MAX_QUEUED)))
    codes = [a[0] for a in answers]
    assert set(codes) <= {200, 429} and codes.count(429) > 0 and codes.count(200) > 0, codes
    for status, headers, answer in answers:
        if status == 429:
            assert int(headers["Retry-After"]) >= 1 and answer["error"]["code"] == "queue_full"
    assert codes.count(200) <= MAX_QUEUED + 2  # the admitted requests are bounded


def test_a_client_that_leaves_has_its_queued_work_dropped(server):
    before = server.get("/health")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        busy = pool.submit(post, server, "/v1/images/generations", {"prompt": "a", "seed": 1, "n": 2, **FAST,
                                                                    "decoder_steps": 12})
        time.sleep(0.6)
        with pytest.raises(OSError):  # this client gives up while its request waits behind `busy`
            post(server, "/v1/images/generations", {"prompt": "b", "seed": 2, "n": 3, **FAST}, timeout=0.5)
        assert busy.result()[0] == 200
    time.sleep(1.0)
    after = server.get("/health")
    assert after["served_images"] - before["served_images"] == 2  # the 3 images of the leaver never ran


def test_a_request_past_its_deadline_gets_504_and_never_runs(server):
    before = server.get("/health")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        busy = pool.submit(post, server, "/v1/images/generations", {"prompt": "a", "seed": 1, **FAST,
                                                                    "decoder_steps": 12})
        time.sleep(0.6)
        code, _, answer = post(server, "/v1/images/generations", {"prompt": "b", "seed": 2, "n": 2, **FAST},
                               headers={"x-unclip-timeout-s": "0.5"})
        assert code == 504 and answer["error"]["code"] == "deadline_exceeded"
        assert busy.result()[0] == 200
    time.sleep(1.0)
    assert server.get("/health")["served_images"] - before["served_images"] == 1


def test_the_load_generator_reports_throughput_latency_and_batches(server, tmp_path):
    from benchmarks.serve_load import main

    out = tmp_path / "load.json"
    assert main(["--url", server.url, "--concurrency", "1", "4", "--requests", "8", "--warmup", "0", "--n", "1", "2",
                 "--extra", json.dumps(FAST), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    one, four = result["levels"]
    assert one["ok"] == one["requests"] == 8 and four["ok"] == four["requests"] == 8 and not four["errors"]
    assert one["images_per_s"] > 0 and 0 < one["latency_s"]["p50"] <= one["latency_s"]["p99"]
    split = one["median_ms"]  # the replica's own account of a request, from its response headers
    assert split["run"] > 0 and split["encode"] > 0 and split["queued"] >= 0
    assert 0 < split["run"] + split["encode"] < one["latency_s"]["p99"] * 1e3
    assert max(int(k) for k in four["batch_images_seen"]) > 2  # four clients' requests were batched


def test_a_killed_replica_loses_no_accepted_request(server, lone):
    pid = server.get("/health")["pid"]
    jobs = [("a red circle", 1, 31), ("a blue square", 2, 32), ("a green triangle", 1, 33)]

    def ask(job):
        return post(server, "/v1/images/generations", {"prompt": job[0], "n": job[1], "seed": job[2],
                                                        "response_format": "b64_json", **FAST, "decoder_steps": 6})

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(ask, j) for j in jobs]
        time.sleep(1.0)  # the requests are on the replica (queued or running)
        os.kill(pid, signal.SIGKILL)
        answers = [f.result() for f in futures]
    assert [a[0] for a in answers] == [200] * len(jobs)
    for (prompt, n, seed), (_, _, body) in zip(jobs, answers, strict=True):
        got = [decode(d["b64_json"]) for d in body["data"]]
        want = lone_images(lone, prompt, n, seed, **{**FAST, "decoder_steps": 6})
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    assert server.get("/health")["pid"] != pid  # Serve replaced the replica


def _browser():
    """Headless Debian Chromium through selenium (CI installs chromium and chromium-driver)."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_the_web_page_generates_an_image_in_a_real_browser(server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    try:
        browser.get(server.url + "/")
        browser.find_element(By.ID, "prompt").send_keys("a red circle")
        browser.find_element(By.ID, "seed").send_keys("7")
        browser.find_element(By.ID, "steps").send_keys("2")
        browser.find_element(By.ID, "generate").click()
        wait = WebDriverWait(browser, 120)
        image = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "img.result") and b.find_element(
            By.CSS_SELECTOR, "img.result"))
        wait.until(lambda b: b.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
        size = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
        assert size == [256, 256]
        assert "seed 7" in browser.find_element(By.CSS_SELECTOR, "figcaption").text
        # an error is shown in the page, not thrown away
        browser.find_element(By.ID, "n").clear()
        browser.find_element(By.ID, "n").send_keys("11")
        browser.execute_script("document.getElementById('n').removeAttribute('max')")
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda b: "Error 400" in b.find_element(By.ID, "error").text)
        assert "less than or equal to 10" in browser.find_element(By.ID, "error").text
    finally:
        browser.quit()
