"""Detect the device once: CUDA (name, compute capability, memory), Apple MPS, or CPU."""
import importlib.metadata
from dataclasses import dataclass
from functools import lru_cache

import torch

_CUDA_FAMILIES = {7: "Volta", 8: "Ampere", 9: "Hopper", 10: "Blackwell", 12: "Blackwell"}


@dataclass(frozen=True)
class Platform:
    device_type: str  # "cuda", "mps" or "cpu"
    name: str
    capability: tuple[int, int] | None = None
    total_memory: int | None = None  # bytes; None where the device cannot tell

    @property
    def arch_family(self) -> str:
        if self.capability is None:
            return self.device_type
        if self.capability == (7, 5):
            return "Turing"
        if self.capability == (8, 9):
            return "Ada"
        return _CUDA_FAMILIES.get(self.capability[0], f"sm{self.capability[0]}{self.capability[1]}")

    def describe(self) -> str:
        if self.device_type == "cuda":
            major, minor = self.capability
            return f"CUDA {self.name} (sm{major}{minor}, {self.arch_family}, {self.total_memory / 2**30:.0f} GiB)"
        return f"{self.device_type.upper()} ({self.name})"


@lru_cache(maxsize=None)
def detect_platform() -> Platform:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return Platform("cuda", props.name, (props.major, props.minor), props.total_memory)
    if torch.backends.mps.is_available():
        return Platform("mps", "Apple MPS")
    import platform as stdlib_platform
    return Platform("cpu", stdlib_platform.processor() or stdlib_platform.machine())


def flash_attn_version() -> str | None:
    """The installed flash-attn's version, or None; 1.x and 2.x both install the module ``flash_attn``."""
    try:
        return importlib.metadata.version("flash-attn")
    except importlib.metadata.PackageNotFoundError:
        return None
