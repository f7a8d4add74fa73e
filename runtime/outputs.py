"""What the public calls return: `UnCLIPOutput`, and images in the asked-for output type."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class UnCLIPOutput:
    """Generated images (PIL list, numpy [B, H, W, 3] or torch [B, 3, H, W], in [0, 1])."""

    images: list[Image.Image] | np.ndarray | torch.Tensor
    image_embeds: torch.Tensor | None = None
    decoder_images: list[Image.Image] | np.ndarray | torch.Tensor | None = None  # the 64² stage, when asked


class QueuedCopy:
    """A tensor on its way to the host (`queue_host_copy`): `result` waits for the copy, if the
    device has not made it yet."""

    def __init__(self, host: torch.Tensor, done: torch.cuda.Event | None) -> None:
        self._host, self._done = host, done

    def result(self) -> torch.Tensor:
        if self._done is not None:
            self._done.synchronize()
        return self._host


def queue_host_copy(t: torch.Tensor) -> QueuedCopy:
    """A contiguous copy of `t` in host memory. From a GPU it lands in page-locked memory from
    torch's caching host allocator, reused once the caller drops the result (a numpy view keeps its
    tensor alive), and is queued on the device's stream without a host wait: a copy into fresh
    pageable memory would pay the allocation, its page faults and a staged copy, most of a
    GPU-bound call's last stretch, and wait for the GPU's queue."""
    t = t.contiguous()
    if not t.is_cuda:
        return QueuedCopy(t.cpu(), None)
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(t.device))
    return QueuedCopy(host, done)


class QueuedOutput:
    """Images on their way to the host in an output type (`queue_output`): their conversion and
    download queued without a host wait, so a run can queue its outputs while the GPU still works
    and wait once (`result`)."""

    def __init__(self, copy: QueuedCopy, output_type: str) -> None:
        self._copy, self._output_type = copy, output_type

    def result(self):
        host = self._copy.result()
        if self._output_type == "pt":
            return host
        if self._output_type == "np":
            return host.numpy()
        return [Image.fromarray(a) for a in host.numpy()]


def queue_output(images: torch.Tensor, output_type: str) -> QueuedOutput:
    """[B, 3, H, W] in [−1, 1] → the requested output type, in [0, 1], queued (`QueuedOutput`);
    PIL images are quantised to 8 bits on the images' device (a quarter of the bytes to copy; the
    same rounding as numpy's)."""
    images = (images * 0.5 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return QueuedOutput(queue_host_copy(images), output_type)
    if output_type == "np":
        return QueuedOutput(queue_host_copy(images.permute(0, 2, 3, 1)), output_type)
    quantised = (images.float() * 255).round().to(torch.uint8)
    return QueuedOutput(queue_host_copy(quantised.permute(0, 2, 3, 1)), output_type)


def to_output(images: torch.Tensor, output_type: str):
    """`queue_output(images, output_type).result()`: the images in the output type, now."""
    return queue_output(images, output_type).result()
