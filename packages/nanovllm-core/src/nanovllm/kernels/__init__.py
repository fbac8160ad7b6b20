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


ARRIVAL_COUNTS: dict[torch.device, list[torch.Tensor]] = {}


def arrival_counts(size: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 counts with which the parts of a kernel's split work find the last of them to finish (which
    combines them). Every kernel on the device shares them: kernels on one stream run one after another, and each
    leaves its counts at zero (no kernel that uses them may run on a second stream). Outgrown ones are kept, for a
    CUDA graph captured with them."""
    counts = ARRIVAL_COUNTS.setdefault(device, [])
    if not counts or counts[-1].numel() < size:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # zeros made in a capture are only set when the graph first replays: run the step eagerly first
            raise RuntimeError(f"{size} split counts are needed for the first time inside a CUDA graph capture; "
                               "run the same step once outside the capture first (as the engine's warm-up does)")
        counts.append(torch.zeros(max(size, 1 << 14), dtype=torch.int32, device=device))
    return counts[-1]
