"""Command-line plumbing shared by the scripts: bad input as one sentence and exit status 2, SIGINT / SIGTERM as a
clean stop, and a timer that waits for the GPU.

- DataError, UsageError: the two kinds of bad input; `run_command` prints either as `PROG: error: ...`, exit 2
- Parser, int_at_least, positive: argparse with one-line errors and bounded number types
- check_context: a length (--seq_len, prompt + --max_new_tokens, ...) held to the model's number of positions
- SignalStop, Interrupted, resume_command: a signal stops at once, says what was kept and how to go on
- DEVICE_CHOICES, resolve_device: --device auto | cpu | cuda as a torch.device, a missing GPU as a UsageError
- device_sync, timed: wall-clock timing that counts queued GPU work
"""
import argparse
import contextlib
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from typing import Any, Callable

import torch


class DataError(ValueError):
    """Bad data input. The message is one plain sentence naming what was wrong (and which flag, if any)."""


class UsageError(ValueError):
    """A bad command-line value; the message is one sentence that names the flag."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """One sentence and exit status 2, without the usage block."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def _bounded(kind, ok, bound):
    """An argparse type: a number of `kind` (int or float) for which ok(value) holds; `bound` says which do."""
    def conv(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    conv.__name__ = kind.__name__
    return conv


def int_at_least(lowest):
    """An argparse type: an integer >= lowest."""
    return _bounded(int, lambda v: v >= lowest, f">= {lowest}")


def positive(kind):
    """An argparse type: a number of `kind` (int or float) > 0."""
    return _bounded(kind, lambda v: v > 0, "> 0")


def run_command(prog, argv, body, errors=()):
    """A script's work, body(stop), under SignalStop (SIGINT / SIGTERM: one line, exit status 130 / 143); bad input
    (UsageError, DataError or one of `errors`) becomes one line, `PROG: error: ...`, and exit status 2."""
    try:
        with SignalStop(prog, argv) as stop:
            return body(stop)
    except (UsageError, DataError) + tuple(errors) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


def context_limit(config):
    """(positions, name): the most positions the model takes, from its config (max_position_embeddings, or the
    config's own name for it); (None, None) when the config states none."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value, name
    return None, None


def check_context(config, flag, value, *, prompt=0, prompt_name="the prompt", whose="this model's"):
    """Raise UsageError (a ValueError) when `value` positions, after a prompt of `prompt` tokens, do not fit the
    model's context: one sentence naming the flag, the numbers, the limit and the most that fits."""
    limit, name = context_limit(config)
    if limit is None or prompt + value <= limit:
        return
    if prompt:
        need = f"{flag} {value} plus {prompt_name}'s {prompt} tokens needs {prompt + value} positions, more than"
    else:
        need = f"{flag} {value} is more than"
    fix = f"use {flag} {limit - prompt} or less" if prompt < limit else f"{prompt_name} alone fills it"
    raise UsageError(f"{need} {whose} limit of {limit} positions ({name}); {fix}.")


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, like KeyboardInterrupt, so that no `except Exception` swallows it."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class SignalStop:
    """SIGINT and SIGTERM as a clean stop, for train.py and evaluate.py: a context manager around a script's work.

    The first signal raises Interrupted at once, wherever the program is, so the step or cell in progress is dropped
    (every file the scripts write is written atomically, or appended as whole lines); inside `held()` (a checkpoint
    being written) it waits for the end of the block. Later signals are ignored: torchrun passes a terminal's Ctrl-C
    on to its workers a second time. On the way out, one line (from process 0) says what was kept (`kept`, set by the
    script as it goes) and the command that continues the run (with --resume once `resumable` is set), and the
    process exits with status 128 + the signal (130 for SIGINT, 143 for SIGTERM).

    Under torchrun every process gets the signal. One that stops while the others wait for it in a collective
    operation makes theirs fail, so any error raised after a signal is taken as that same stop.
    """

    def __init__(self, prog="", argv=()):
        self.prog, self.argv = prog, list(argv)
        self.signum, self.kept, self.resumable = None, "nothing was kept", False
        self._held, self._old = 0, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, kind, error, tb):
        for s, handler in self._old.items():
            signal.signal(s, handler)
        if self.signum is None or kind is None or not issubclass(kind, (Interrupted, Exception)):
            return False
        _close_progress_bars()
        if int(os.environ.get("RANK", "0")) == 0:
            kept = self.kept() if callable(self.kept) else self.kept
            again = "continue with" if self.resumable else "start again with"
            print(f"{self.prog}: stopped by {signal.Signals(self.signum).name}; {kept}; {again}: "
                  f"{resume_command(self.prog, self.argv, self.resumable)}", file=sys.stderr, flush=True)
        sys.exit(128 + self.signum)

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            if not self._held:
                raise Interrupted(signum)

    @contextlib.contextmanager
    def held(self):
        """A block that a signal does not cut short: the stop comes at its end."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
        if self.signum is not None and not self._held:
            raise Interrupted(self.signum)


def _close_progress_bars():
    """Close open tqdm bars, so that the last line printed is the stop's."""
    from tqdm import tqdm
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def resume_command(script, argv, resume=True):
    """The command line that runs `script` with `argv` again (with --resume): this Python, or torchrun beside it with
    the same number of processes when the run had several."""
    args = [a for a in argv if a != "--resume"] + (["--resume"] if resume else [])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    launcher = [_program(sys.executable, "python")]
    if world > 1:
        launcher = [_program(os.path.join(os.path.dirname(sys.executable), "torchrun"), "torchrun")]
        launcher += (["--nnodes", str(world // local)] if local < world else ["--standalone"]) + [
            "--nproc_per_node", str(local)]
    return shlex.join(launcher + [script] + args)


def _program(path, name):
    """`name` when that is what the shell finds (a venv is active), else the full `path`."""
    found = shutil.which(name)
    return name if found and os.path.abspath(found) == os.path.abspath(path) else path


DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """--device NAME (one of DEVICE_CHOICES) as a torch.device: auto is the GPU when there is one, else the CPU.
    cuda without a GPU raises UsageError: one sentence naming the flag, rather than a CUDA error deep in a load."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{flag} cuda: no CUDA GPU is available.")
    if name not in DEVICE_CHOICES:
        raise UsageError(f"{flag}: expected one of {', '.join(DEVICE_CHOICES)}, got {name!r}.")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def device_sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that a timer measures the work itself."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def lap(timings: dict | None, phase: str | None, device: torch.device, t0: float = 0.0) -> float:
    """Opt-in phase timing: with a `timings` dict, add the seconds since t0 to timings[phase] (device synchronised);
    returns the time now. Without one, nothing is synchronised or measured."""
    if timings is None:
        return 0.0
    device_sync(device)
    now = time.perf_counter()
    if phase is not None:
        timings[phase] = timings.get(phase, 0.0) + now - t0
    return now


def timed(fn: Callable[[], Any], device: torch.device) -> tuple:
    """(fn(), its wall-clock seconds), the device synchronised before and after."""
    device_sync(device)
    t = time.perf_counter()
    out = fn()
    device_sync(device)
    return out, time.perf_counter() - t


def parse_layers(values, num_layers=None):
    """--exit_layers values (ints and inclusive start:stop[:step] ranges) -> sorted distinct layers in 1..N-1.
    Without num_layers, only the syntax is checked."""
    if values is None and num_layers is None:
        return None
    if values is None:
        return list(range(4, num_layers, 4)) or list(range(1, num_layers))
    layers = []
    for v in values:
        try:
            parts = [int(x) for x in v.split(":")]
        except ValueError:
            parts = []
        if not 1 <= len(parts) <= 3 or (len(parts) == 3 and parts[2] < 1):
            raise UsageError(f"--exit_layers: expected integers or start:stop[:step] ranges, got {v!r}.")
        layers += parts if len(parts) == 1 else list(range(parts[0], parts[1] + 1, parts[2] if len(parts) == 3 else 1))
    for layer in layers if num_layers is not None else []:
        if not 1 <= layer <= num_layers - 1:
            raise UsageError(f"--exit_layers: layer {layer} is outside 1..{num_layers - 1} for this "
                             f"{num_layers}-layer model.")
    return sorted(set(layers))
