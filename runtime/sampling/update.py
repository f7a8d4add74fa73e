"""The whole per-step update of a denoising loop as one call: classifier-free guidance combine,
x̂0 (from ε or direct), clamp, `x_prev = a·x_t + b·x̂0 + c·ε̂ + σ·z` (fixed or learned-range σ),
the non-finite check, and the next network input (x_prev in the network's dtype, written once or
twice for the conditional/unconditional halves).

Two implementations with the same arguments and the same float32 math:
- `cpp_ext` (the fused CUDA kernel, one launch per step, fp32/fp16/bf16 network outputs), used on
  CUDA float32 samples when the extension is built;
- `reference_update` (torch ops; CPU, float64 reference runs, or CUDA without the extension).
Both read the step's coefficients and the guidance scale from tensors and never sync with the
host, so a CUDA graph captured once serves any guidance scale and any step table of its length.
`implementation(device)` says which runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import cpp_ext
from runtime.sampling.schedules import StepTable, classifier_free_guidance, update_step

# Columns of `packed_coefficients` (the order the CUDA kernel reads them in).
COLUMNS = ("x0_from_xt", "x0_from_eps", "eps_from_xt", "eps_from_x0", "coef_xt", "coef_x0", "coef_eps", "sigma",
           "log_var_min", "log_var_max", "noise_scale")
_COL = {name: i for i, name in enumerate(COLUMNS)}


def packed_coefficients(table: StepTable, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """[steps, len(COLUMNS)] coefficients of `table` in `dtype` (float32, or float64 for reference runs)."""
    return torch.stack([getattr(table, name) for name in COLUMNS], dim=1).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class UpdateSpec:
    """What a stage's network predicts and how its update is formed."""

    prediction: str  # "epsilon" or "sample"
    clip_range: float | None  # clamp x̂0 to ±clip_range (None: no clamp)
    learned_variance: bool  # the output carries v ∈ [−1, 1] after the prediction channels
    guided: bool  # the output holds conditional rows, then as many unconditional rows

    def __post_init__(self) -> None:
        if self.prediction not in ("epsilon", "sample"):
            raise ValueError(f"prediction must be 'epsilon' or 'sample', got {self.prediction!r}")

    @property
    def copies(self) -> int:
        """Rows of network input per sample row (2 with guidance)."""
        return 2 if self.guided else 1


def implementation(device: torch.device | str, sample_dtype: torch.dtype = torch.float32) -> str:
    """"cpp_ext" when the fused kernel serves samples of `sample_dtype` on `device`, else "torch"."""
    device = torch.device(device)
    return "cpp_ext" if _fused(device, sample_dtype) else "torch"


def _fused(device: torch.device, sample_dtype: torch.dtype) -> bool:
    return cpp_ext.kernels is not None and device.type == "cuda" and sample_dtype == torch.float32


def guided_update(
    out: torch.Tensor,
    x: torch.Tensor,
    noise: torch.Tensor,
    coefs: torch.Tensor,
    scale: torch.Tensor,
    first_bad: torch.Tensor,
    step: int,
    spec: UpdateSpec,
    in_dtype: torch.dtype,
    use_kernel: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's update.

    :param out: network output: [rows, C_out, ...] with rows = B (or 2B, conditional first, when
        guided) and C_out ≥ C (+C variance values after the prediction when `learned_variance`).
    :param x: current sample x_t [B, C, ...] (float32; float64 runs the reference).
    :param noise: this step's standard normal noise, shaped like `x` (scaled by σ; σ = 0 at the last step).
    :param coefs: this step's row of `packed_coefficients` (dtype of `x`).
    :param scale: guidance scale, a one-element tensor (dtype of `x`; ignored unless guided).
    :param first_bad: one-element int32 tensor, −1 until a non-finite value appears; then set to
        the step index of the first (updated in place).
    :param step: this step's index (what `first_bad` records).
    :param in_dtype: dtype of the next network input.
    :param use_kernel: force (True) or forbid (False) the CUDA kernel; None picks it when it serves.
    :return: (x_prev [B, C, ...] in x's dtype, next network input [copies·B, C, ...] in `in_dtype`).
    """
    fused = _fused(x.device, x.dtype) if use_kernel is None else use_kernel
    if not fused:
        return reference_update(out, x, noise, coefs, scale, first_bad, step, spec, in_dtype)
    if cpp_ext.kernels is None:
        raise RuntimeError(f"the fused CUDA kernel is not built ({cpp_ext.IMPORT_ERROR}); build it with "
                           "python setup.py build_ext --inplace")
    x_new = torch.empty_like(x)
    x_in = torch.empty((spec.copies * x.shape[0], *x.shape[1:]), dtype=in_dtype, device=x.device)
    cpp_ext.kernels.guided_update(
        out.contiguous(), x.contiguous(), noise.contiguous(), coefs.contiguous(), scale, x_new, x_in, first_bad,
        step, spec.copies, spec.guided, spec.prediction == "epsilon", spec.learned_variance,
        -1.0 if spec.clip_range is None else float(spec.clip_range),
    )
    return x_new, x_in


def reference_update(
    out: torch.Tensor,
    x: torch.Tensor,
    noise: torch.Tensor,
    coefs: torch.Tensor,
    scale: torch.Tensor,
    first_bad: torch.Tensor,
    step: int,
    spec: UpdateSpec,
    in_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`guided_update` in torch ops (same arguments), the reference the kernel is checked against:
    `sampling.classifier_free_guidance`, then `sampling.update_step` on this step's packed row."""
    b, c = x.shape[0], x.shape[1]
    out = out.to(x.dtype)
    pred = out[:b, :c]
    if spec.guided:
        pred = classifier_free_guidance(pred, out[b:2 * b, :c], scale)
    var = out[:b, c:2 * c] if spec.learned_variance else None
    x_new = update_step(lambda name: coefs[_COL[name]], x, pred, noise, spec.prediction, spec.clip_range, var)
    bad = ~torch.isfinite(x_new).all()
    first_bad.copy_(torch.where(bad & (first_bad < 0), torch.full_like(first_bad, step), first_bad))
    return x_new, network_input(x_new, spec.copies, in_dtype)


def network_input(x: torch.Tensor, copies: int, dtype: torch.dtype) -> torch.Tensor:
    """The network's input for sample `x`: cast to its dtype, `copies` times along the batch (the
    guided halves); the fused kernel writes the same."""
    x_in = x.to(dtype)
    return torch.cat([x_in] * copies) if copies > 1 else x_in
