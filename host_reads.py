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
/ `.numpy()` / `.cpu()` (which on a CPU tensor reach no aten op, so they are wrapped here; the copy they make from a
GPU is not counted again). Not counted, so kept where the queue is empty (right after a read) by the loop's own
rule: a copy of host data to a GPU, which waits for the queue when the host memory is pageable (the loop's copies go
through `to_device`: pinned memory, non-blocking, so they need not wait); and ops that wait inside a kernel launch
(`repeat_interleave` with tensor repeats, `unique`).
"""
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

def to_device(values, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A tensor of host `values` (nested lists of numbers) on `device`. On CUDA it goes through pinned memory with a
    non-blocking copy, so the copy is queued behind the running kernels instead of waiting for them (the caching host
    allocator keeps the pinned buffer until the copy is done); elsewhere it is made there directly."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)


READS = {"item", "_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "allclose"}


def _copy_to_cpu(name: str, args: tuple) -> bool:
    """`cpu_tensor.copy_(gpu_tensor)`: a read."""
    return (name == "copy_" and len(args) > 1 and all(isinstance(a, torch.Tensor) for a in args[:2])
            and args[0].device.type == "cpu" and args[1].device.type != "cpu")


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
        self._saved, self._inside = {}, 0  # inside a wrapped method: its own copy to the CPU is not counted again

    @property
    def count(self) -> int:
        return sum(self.where.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if not self._inside and (name in READS or _to_cpu(name, args, kwargs) or _bool_index(name, args)
                                 or _copy_to_cpu(name, args)):
            self.where[name] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        for method in ("tolist", "numpy", "cpu"):
            original = self._saved[method] = getattr(torch.Tensor, method)

            def counted(t, *a, _original=original, _method=method, **k):
                self.where[_method] += 1
                self._inside += 1
                try:
                    return _original(t, *a, **k)
                finally:
                    self._inside -= 1

            setattr(torch.Tensor, method, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self._saved.items():
            setattr(torch.Tensor, method, original)
        return super().__exit__(*exc)
