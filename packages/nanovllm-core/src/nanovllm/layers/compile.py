import functools

import torch


def compile_on_cuda(fn):
    """Run ``fn`` through torch.compile on CUDA tensors (a few fused kernels instead of many small
    ones); eagerly elsewhere, where compiling costs more than it saves."""
    compiled = None  # made on the first CUDA call: importing torch's compiler takes seconds

    @functools.wraps(fn)
    def dispatch(x, *args):
        nonlocal compiled
        if not x.is_cuda:
            return fn(x, *args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)
        return compiled(x, *args)
    return dispatch
