"""Input checks shared by the pure-tensor modules: fail loudly at the boundary."""

import torch
from torch import Tensor


def check_mask(mask: Tensor, name: str = "mask") -> None:
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got {mask.dtype}")
    if mask.dim() != 2:
        raise ValueError(f"{name} must be [B, T], got shape {tuple(mask.shape)}")


def check_same_shape(reference: str, shape: torch.Size, **tensors: Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.shape != shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but {reference} has {tuple(shape)}"
            )


def check_nonempty(mask: Tensor, name: str = "mask") -> None:
    if not bool(mask.any()):
        raise ValueError(f"{name} selects no position: nothing to average over")


def check_finite(mask: Tensor, **tensors: Tensor) -> None:
    """Raise if any tensor is NaN or ±inf at a masked-in position ([B, T] or [B, T, K])."""
    for name, tensor in tensors.items():
        valid = tensor[mask]
        if not bool(torch.isfinite(valid).all()):
            bad = (~torch.isfinite(valid)).sum().item()
            raise ValueError(f"{name} has {bad} non-finite value(s) at masked-in positions")
