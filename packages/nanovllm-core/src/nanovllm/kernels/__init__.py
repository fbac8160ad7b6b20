"""Triton kernels shared by the CUDA attention backends and the MoE layer; imported only where they run
(triton is Linux-only)."""
import functools

import torch


@functools.cache
def _shared_memory(device_index: int) -> int:
    import triton
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one Triton program may use on this CUDA device."""
    return _shared_memory(_index(device))


def multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(_index(device)).multi_processor_count
