"""A product for decoding on a CPU: y = x W^T for a few rows, each weight read once, each row's bits its own.

torch's CPU products are made for many rows: on the CPUs measured here a one-row float32 `F.linear` reads its
weights at about 12 GB/s of the memory's ~31 (docs/design.md), two rows cost 1.7-1.9x one, and a row's bits may differ
when it is computed alone or among others (the engine used to pay for that by running one row as two).
linear_kernel.cpp is a small kernel of our own, built the first time it is used with torch's C++ extension loader
(ninja and a C++ compiler; about 40 s, cached under torch's extensions directory), that:

- streams the weights once per call whatever the row count (up to MAX_ROWS rows, then once per MAX_ROWS);
- sums each output element in one fixed order that depends only on x's row, W's row and K, so a row's result is
  bitwise the same alone or among other rows (row invariant by construction: no padding);
- takes float32 or bfloat16 weights and x, sums in float32 (bfloat16 x and W: AVX-512 BF16's pairwise dot products
  where the CPU has them), OpenMP over the outputs, AVX2 or AVX-512 chosen at run time.

`linear(x, w)` is it; `available()` says whether it was built (where it cannot be, e.g. no compiler or no AVX2,
the reason is said once on stderr and the engine keeps torch's products); `paths()` the instruction sets this
CPU runs. $LINEAR_KERNEL picks: `off` (never build: torch's products), `auto` (the default), or a path name to
force one (tests run both the AVX2 and the AVX-512 paths where the CPU has both).
"""
import hashlib
import os
import shutil
import sys
from pathlib import Path

import torch

SOURCES = [Path(__file__).with_name(n) for n in ("linear_kernel.cpp", "linear_kernel_tiles.h")]
PATHS = ("auto", "avx2", "avx512", "avx512bf16")  # the kernel's path numbers, in order
MAX_ROWS = 64  # rows the engine sends to the kernel: longer inputs (prefills) take torch's many-row products
ENV = "LINEAR_KERNEL"

_state = {}  # "module": the built extension or None; "why": the reason it is None


def _build():
    """The extension, built (or loaded from torch's cache) once per process; None, with the reason, when it can't."""
    if "module" in _state:
        return _state["module"]
    module, why = None, None
    choice = os.environ.get(ENV, "auto")
    if choice == "off":
        why = f"${ENV}=off"
    elif choice not in PATHS:
        why = f"${ENV}={choice} is not one of off, {', '.join(PATHS)}"
    elif sys.platform != "linux" or torch.device("cpu").type != "cpu":
        why = "built for Linux only"
    else:
        try:
            module = _load()
            if not module.paths():
                module, why = None, "this CPU has neither AVX2 + FMA nor AVX-512"
            elif choice != "auto" and choice not in module.paths():
                module, why = None, f"${ENV}={choice} but this CPU runs only {', '.join(module.paths())}"
        except Exception as e:  # no compiler, no ninja, a failed build: torch's products serve instead
            lines = [line for line in str(e).splitlines() if line.strip()]
            module, why = None, f"the build failed ({type(e).__name__}: {lines[-1][:200] if lines else ''})"
    _state.update(module=module, why=why, path=PATHS.index(choice) if module and choice in PATHS else 0)
    if why and choice != "off":
        print(f"linear_kernel: not used ({why}); products use torch's F.linear.", file=sys.stderr, flush=True)
    return module


def _load():
    from torch.utils import cpp_extension
    if shutil.which("ninja") is None:  # the `ninja` package's binary, when the venv's bin is not on PATH
        try:
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:12]
    flags = ["-O3", "-fopenmp"]  # no -march: each path names its own instruction set (linear_kernel.cpp)
    return cpp_extension.load(name=f"linear_kernel_{digest}", sources=[str(SOURCES[0])], extra_cflags=flags,
                              extra_ldflags=["-fopenmp"], extra_include_paths=[str(SOURCES[0].parent)])


def available() -> bool:
    """Whether the kernel is built and serves on this machine (building it on first call)."""
    return _build() is not None


def unavailable_reason() -> str | None:
    _build()
    return _state["why"]


def paths() -> list[str]:
    """The instruction sets this CPU runs (empty where the kernel is unavailable)."""
    module = _build()
    return list(module.paths()) if module else []


def path_for(x_dtype: torch.dtype, w_dtype: torch.dtype) -> str | None:
    """Which path `linear` takes for these dtypes (None where the kernel is unavailable)."""
    module = _build()
    if module is None:
        return None
    if _state["path"]:
        return PATHS[_state["path"]]
    ps = module.paths()
    if x_dtype == w_dtype == torch.bfloat16 and "avx512bf16" in ps:
        return "avx512bf16"
    return "avx512" if "avx512" in ps else "avx2"


def linear(x: torch.Tensor, w: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """x (M, K) @ w (N, K)^T -> (M, N) in x's dtype; float32 or bfloat16 each, contiguous, on the CPU. `path`:
    one of paths() (default: $LINEAR_KERNEL's, else the fastest for the dtypes). Under torch.compile it is the
    custom op selfspec::linear (traced as one opaque call); eagerly a direct call (a few microseconds less)."""
    module = _build()
    if module is None:
        raise RuntimeError(f"linear_kernel is not available: {_state['why']}")
    p = PATHS.index(path) if path else _state["path"]
    if torch.compiler.is_compiling():
        return _op(x, w, p)
    return module.linear(x, w, p)


@torch.library.custom_op("selfspec::linear", mutates_args=())
def _op(x: torch.Tensor, w: torch.Tensor, path: int) -> torch.Tensor:
    return _build().linear(x, w, path)


@_op.register_fake
def _(x, w, path):
    return x.new_empty(x.shape[0], w.shape[0])
