"""The ``--device`` check shared by every command and by ``LocalBackend.from_pretrained``: a one-line error
for a bad name or a missing CUDA GPU, before anything loads (torch is imported only to ask about CUDA)."""

from __future__ import annotations

from sgl_adaptive.errors import UserError


def check_device(device: str | None) -> None:
    """``cpu``, ``cuda`` or ``cuda:N``, and CUDA must be present; torch is imported only for CUDA."""
    if device is None or device == "cpu":
        return
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise UserError(f"unknown device {device!r} (choose cpu, cuda or cuda:N)")
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is available on this machine (use --device cpu)")
    if index and int(index) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
