"""torch.distributed helpers: the same commands run on one process or under ``torchrun``.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is created once with ``cpu:gloo,cuda:nccl`` so
that CPU tensors (object broadcasts, CPU training) go through gloo and CUDA tensors through NCCL.
"""
from __future__ import annotations

import os
import sys
from typing import Any


def world_size() -> int:
    """The number of ranks: the process group's size once it is initialised, else torchrun's ``WORLD_SIZE``
    (1 in a plain process). The one world-size helper of the pipeline."""
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init() -> bool:
    """Initialise the default process group when launched by torchrun; returns whether distributed is on."""
    if world_size() <= 1:
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank() % torch.cuda.device_count())
        dist.init_process_group(backend=backend)
    return True


def shutdown() -> None:
    """Leave the process group cleanly (after a barrier), so no rank exits while another still talks to it."""
    if world_size() > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        init()
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (picklable objects)."""
    if world_size() <= 1:
        return obj
    import torch.distributed as dist

    init()
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def device(name: str = "auto") -> str:
    """The torch device string of this rank for ``--device name``.

    ``auto`` -> this rank's CUDA device when CUDA is available, else ``cpu``. Under ``torchrun``
    (``WORLD_SIZE`` > 1) every CUDA request (``cuda``, ``cuda:N``) becomes ``cuda:<LOCAL_RANK mod GPUs>``:
    one device per local rank whatever index was asked (``--device cuda:1`` would otherwise put every rank
    on one GPU). In a plain process ``cuda:N`` is kept as given.
    """
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return f"cuda:{local_rank() % torch.cuda.device_count()}"
        return "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
    if name.startswith("cuda") and world_size() > 1:
        return f"cuda:{local_rank() % torch.cuda.device_count()}"
    return name
