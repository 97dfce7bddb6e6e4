"""Counting host reads: every place the Python side waits for a tensor's value (on a GPU, a stall of the queue).

A GPU runs kernels ahead of Python until Python asks for a number: `.item()`, `int(t)`, `bool(t)`, `float(t)`,
`.tolist()`, `.cpu()`, a boolean-mask index (its size is data), `torch.equal`... Each such read waits for every queued
kernel, so a decoding loop that reads several times a cycle leaves the GPU idle between launches. On a CPU these reads
are free, which is how they crept in; `HostReads` counts them on any device, so a CPU test can hold the loop to a
budget (generate_test.py) and the GPU smoke script can report them per cycle.

    with HostReads() as reads:
        speculative_generate(...)
    reads.count, reads.where  # how many, and {op: count}

The count sees the aten ops that read a value back (`item` / `_local_scalar_dense` behind int/float/bool/.item(),
`is_nonzero`, `equal`, `nonzero`, `masked_select`, indexing with a boolean mask, a copy to the CPU) and `.tolist()`
/ `.numpy()` / `.cpu()` (which on a CPU tensor reach no aten op, so they are wrapped here). A copy to the device
(`.to(device)` of a host tensor) is not a read: it does not wait for the queue.
"""
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

READS = {"item", "_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "allclose"}


def _to_cpu(name: str, args: tuple, kwargs: dict) -> bool:
    """A copy from a device to the CPU (`.to("cpu")`); `.cpu()` itself is wrapped, so it counts on a CPU too."""
    if name not in ("to", "_to_copy") or not isinstance(args[0], torch.Tensor) or args[0].device.type == "cpu":
        return False
    named = [a for a in args[1:] if isinstance(a, (torch.device, str))] + [kwargs.get("device")]
    return any(d is not None and torch.device(d).type == "cpu" for d in named)


def _bool_index(name: str, args: tuple) -> bool:
    return name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))


class HostReads(TorchDispatchMode):
    """A context that counts host reads of tensor values (see the module docstring); `count` and `where`."""

    def __init__(self):
        super().__init__()
        self.where = Counter()
        self._saved = {}

    @property
    def count(self) -> int:
        return sum(self.where.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in READS or _to_cpu(name, args, kwargs) or _bool_index(name, args):
            self.where[name] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        for method in ("tolist", "numpy", "cpu"):
            original = self._saved[method] = getattr(torch.Tensor, method)

            def counted(t, *a, _original=original, _method=method, **k):
                self.where[_method] += 1
                return _original(t, *a, **k)

            setattr(torch.Tensor, method, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self._saved.items():
            setattr(torch.Tensor, method, original)
        return super().__exit__(*exc)
