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


class QueuedOutput:
    """Images on their way to the host in an output type (`queue_output`): their device work and
    their copy into page-locked memory queued on the device's stream without a host wait, so a
    run can queue its outputs while the GPU still works and wait once for everything (`result`)."""

    def __init__(self, host: torch.Tensor, output_type: str, done: torch.cuda.Event | None) -> None:
        self._host, self._output_type, self._done = host, output_type, done

    def result(self):
        """The images in the output type, once the copy has landed (waits for it, if still queued)."""
        if self._done is not None:
            self._done.synchronize()
        if self._output_type == "pt":
            return self._host
        if self._output_type == "np":
            return self._host.numpy()
        return [Image.fromarray(a) for a in self._host.numpy()]


def queue_host_copy(t: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A contiguous copy of `t` in host memory, and the event after which it is there (None: there
    already). From a GPU it lands in page-locked memory from torch's caching host allocator, reused
    once the caller drops the result (a numpy view keeps its tensor alive), queued without a host
    wait: a copy into fresh pageable memory would pay the allocation, its page faults and a staged
    copy, most of a GPU-bound call's last stretch, and wait for the GPU's queue."""
    t = t.contiguous()
    if not t.is_cuda:
        return t.cpu(), None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(t.device))
    return host, done


def queue_output(images: torch.Tensor, output_type: str) -> QueuedOutput:
    """[B, 3, H, W] in [−1, 1] → the requested output type, in [0, 1], queued (`QueuedOutput`);
    PIL images are quantised to 8 bits on the images' device (a quarter of the bytes to copy; the
    same rounding as numpy's)."""
    images = (images * 0.5 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return QueuedOutput(*_host(images, output_type))
    if output_type == "np":
        return QueuedOutput(*_host(images.permute(0, 2, 3, 1), output_type))
    quantised = (images.float() * 255).round().to(torch.uint8)
    return QueuedOutput(*_host(quantised.permute(0, 2, 3, 1), output_type))


def _host(t: torch.Tensor, output_type: str) -> tuple[torch.Tensor, str, torch.cuda.Event | None]:
    host, done = queue_host_copy(t)
    return host, output_type, done


def to_output(images: torch.Tensor, output_type: str):
    """`queue_output(images, output_type).result()`: the images in the output type, now."""
    return queue_output(images, output_type).result()
