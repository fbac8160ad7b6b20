"""Compiling a Triton kernel for a Turing GPU (sm_75, an RTX 2080 Ti) on a machine without one: ptxas takes the code
only if it uses nothing sm80+, and the compiled program states the shared memory it needs. Compiling is not
running: kernels' results are tested under the interpreter and on a GPU."""
import unittest.mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TURING = GPUTarget("cuda", 75, 32)
TURING_SHARED_MEMORY = 64 * 1024
POINTER_TYPES = {torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32", torch.int64: "*i64"}


def compile_for_turing(kernel, values: dict, num_warps: int = 4, num_stages: int = 2):
    """``kernel`` compiled for sm_75 with the types of ``values`` (tensors, int32s, floats; constexprs by value),
    specialised as Triton's JIT specialises a launch: pointers and multiples of 16 marked 16-divisible, ints of 1
    made constants."""
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        value = values.get(param.name, param.default)
        if param.is_constexpr:
            signature[param.name], constexprs[(i,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name], attrs[(i,)] = POINTER_TYPES[value.dtype], [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        elif value == 1 and not param.do_not_specialize:
            signature[param.name], constexprs[(i,)] = "constexpr", 1
        else:
            signature[param.name] = "i32"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=TURING,
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def fits(compiled) -> None:
    assert compiled.metadata.shared <= TURING_SHARED_MEMORY, f"{compiled.metadata.shared} bytes of shared memory"


def on_turing(module):
    """A module's kernels/* config helpers answering as they would on an RTX 2080 Ti."""
    return unittest.mock.patch.object(module, "shared_memory", lambda device: TURING_SHARED_MEMORY)


# one-element tensors standing for pointers of each type
FP16, FP32 = torch.empty(1, dtype=torch.float16), torch.empty(1, dtype=torch.float32)
INT32, INT64 = torch.empty(1, dtype=torch.int32), torch.empty(1, dtype=torch.int64)
CUDA = torch.device("cuda")
