import functools

import torch


def compile_on_cuda(fn):
    """Run ``fn`` through torch.compile on CUDA tensors (a few fused kernels instead of many small
    ones); eagerly elsewhere, where compiling costs more than it saves."""
    compiled = torch.compile(fn, dynamic=True)  # compiles lazily, on the first CUDA call

    @functools.wraps(fn)
    def dispatch(x, *args):
        return (compiled if x.is_cuda else fn)(x, *args)
    return dispatch
