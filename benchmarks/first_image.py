"""Child process of `benchmarks/latency.py --first-image`: from a cold Python start, import the
runtime, load a model folder in fp16 on the GPU and make one image (CUDA graphs captured on the
way); prints the phase times as one JSON line."""

from __future__ import annotations

import json
import sys
import time

START = time.perf_counter()

import torch  # noqa: E402

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from runtime import UnCLIP  # noqa: E402


def main(folder: str) -> None:
    imported = time.perf_counter()
    pipe = UnCLIP(folder, device="cuda", dtype=torch.float16, progress=False)
    torch.cuda.synchronize()
    loaded = time.perf_counter()
    pipe.generate("a high-resolution photograph of a red fox sitting in fresh snow", seed=0, output_type="np")
    done = time.perf_counter()
    print(json.dumps({"import_s": imported - START, "load_s": loaded - imported, "first_image_s": done - loaded}))


if __name__ == "__main__":
    main(sys.argv[1])
