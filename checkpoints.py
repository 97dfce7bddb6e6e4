"""What is written to disk to be read back: exits, a training run's resume state and log, and the atomic writers.

    OUT_DIR/exit.safetensors + exit_config.json   an exit (evaluate.py --exit_ckpt OUT_DIR), with the base model's
                                                  name and weight fingerprint, so another model or layer is refused
    OUT_DIR/resume/                               optimizer, RNG states, scheduler and data position (train.py --resume)
    OUT_DIR/log.jsonl                             one JSON record per train step and per validation

No pickles: tensors in safetensors, the rest in JSON. A directory is replaced in one atomic rename, a file through a
temporary file and os.replace: a crash leaves the old version or the new one, never half of one.
"""
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tuned_llama import EarlyExit, parse_train


def write_atomically(path, text):
    """Write a file through a temporary file and os.replace: readers see the old file or the new one, whole."""
    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# Exits: a directory with exit.safetensors + exit_config.json

WEIGHTS_FILE = "exit.safetensors"
CONFIG_FILE = "exit_config.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or made for another model or layer (one sentence for the user)."""


def write_dir_atomically(out_dir, write):
    """Call write(tmp_dir) on a fresh temporary directory beside out_dir, then swap it into place.

    A crash at any point leaves either the old out_dir or the new one, never a half-written one. Subdirectories of an
    existing out_dir whose names are not written anew (older step checkpoints, logs) are carried over.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write(tmp)
        if out_dir.exists():
            for child in out_dir.iterdir():
                if not (tmp / child.name).exists():
                    os.replace(child, tmp / child.name)
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def exit_config(exit, *, base_name, base_fingerprint, trained=(), extra=None):
    """What exit_config.json holds: the base model's name and weight fingerprint, the exit's shape, what was trained,
    and `extra` (training arguments, step, last validation metrics, ...)."""
    return {"base_model": base_name, "base_fingerprint": base_fingerprint, **exit.config_dict(),
            "trained": sorted(trained), **(extra or {})}


def write_exit_files(exit, directory, config):
    """Write the exit's weights (safetensors) and `config` (JSON) into an existing directory; not atomic by itself:
    callers write into a fresh temporary directory and swap it into place (see write_dir_atomically)."""
    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in exit.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))


def save_exit(exit, out_dir, *, base_name, base_fingerprint, trained=(), extra=None):
    """Save an EarlyExit's weights (safetensors) and exit_config.json into out_dir, atomically."""
    config = exit_config(exit, base_name=base_name, base_fingerprint=base_fingerprint, trained=trained, extra=extra)
    write_dir_atomically(out_dir, lambda tmp: write_exit_files(exit, tmp, config))
    return config


def read_exit_config(path):
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not path.is_dir() or not cfg_file.is_file() or not (path / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"--exit_ckpt: {path} is not an exit checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE}).")
    try:
        return json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"--exit_ckpt: {cfg_file} is unreadable or corrupt ({e.__class__.__name__}).") from None


def _dtype_bound_fingerprint(model):
    """The base-model fingerprint that checkpoints written before truncated_llama.model_fingerprint became independent
    of the dtype hold (it hashed float32 samples rounded to 4 decimals, so it depends on the dtype the base was loaded
    in). Accepted by load_exit so that those checkpoints still load, and those runs still resume, on the same base."""
    h = hashlib.sha256()
    c = model.config
    h.update(json.dumps([c.vocab_size, c.hidden_size, c.num_hidden_layers, c.intermediate_size]).encode())
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)][:1024].float().cpu()
        h.update(name.encode())
        h.update(sample.numpy().round(4).tobytes())
    return h.hexdigest()[:16]


def load_exit(path, base_model, *, base_fingerprint=None, exit_layer=None, dtype=None):
    """Rebuild the EarlyExit saved at `path` on `base_model`; refuses a checkpoint made for another model or layer."""
    cfg = read_exit_config(path)
    saved = cfg.get("base_fingerprint")
    if base_fingerprint is not None and saved != base_fingerprint and saved != _dtype_bound_fingerprint(base_model):
        raise CheckpointError(f"--exit_ckpt: {path} was trained on base model {cfg.get('base_model')!r} "
                              f"(fingerprint {cfg.get('base_fingerprint')}), not on the model loaded with --model.")
    if exit_layer is not None and cfg.get("exit_layer") != exit_layer:
        raise CheckpointError(f"--exit_ckpt: {path} is for exit layer {cfg.get('exit_layer')}, not {exit_layer}.")
    n = len(base_model.model.layers)
    if not isinstance(cfg.get("exit_layer"), int) or not 1 <= cfg["exit_layer"] <= n - 1:
        raise CheckpointError(f"--exit_ckpt: {path} has exit layer {cfg.get('exit_layer')}, outside 1..{n - 1} "
                              f"for the loaded {n}-layer model.")
    k = cfg.get("draft_vocab")
    try:
        if k is not None and (not isinstance(k, int) or isinstance(k, bool)):
            raise ValueError(f"draft_vocab {k!r} is not an integer")
        # a pruned head: any K distinct ids to build it; the saved `vocab` buffer replaces them below
        exit = EarlyExit(base_model, cfg["exit_layer"], adapter=cfg.get("adapter"),
                         adapter_init=cfg.get("adapter_init", "identity"), last_block=bool(cfg.get("last_block")),
                         head_init=cfg.get("head_init", "copy"), vocab=None if k is None else torch.arange(k))
    except ValueError as e:
        raise CheckpointError(f"--exit_ckpt: {path} has an exit configuration this code cannot build ({e})") from None
    try:
        state = load_file(str(Path(path) / WEIGHTS_FILE))
        if dtype is not None:  # e.g. float32 master weights for training on a bfloat16 base: load without rounding
            exit.to(dtype)
        exit.load_state_dict(state, strict=True)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"--exit_ckpt: the weights in {path} are corrupt or do not fit this model "
                              f"({str(e).splitlines()[0][:120]}).") from None
    v = exit.vocab
    if v is not None and (int(v.min()) < 0 or int(v.max()) >= exit.vocab_size or v.unique().numel() != v.numel()):
        raise CheckpointError(f"--exit_ckpt: the pruned head's vocabulary in {path} is not {v.numel()} distinct "
                              f"token ids of this model's {exit.vocab_size}.")
    return exit.to(base_model.device), cfg


# ----------------------------------------------------------------------------------------------------------------
# A training run: the exit at the top of its --out_dir, the resume state in resume/, the log

RESUME_DIR = "resume"
LOG_FILE = "log.jsonl"
# Settings that must be the same when a run is resumed (anything else, e.g. --eval_every, may change).
RESUME_MUST_MATCH = ("model", "exit_layer", "train", "adapter", "adapter_init", "head_init", "draft_vocab",
                     "calibrate", "loss", "kl_temperature", "ce_weight", "teacher_model_path", "dataset",
                     "data_files", "dataset_id", "assistant_only", "val_fraction", "seq_len", "train_blocks",
                     "cache_states", "batch_size", "grad_accum", "lr", "head_lr", "weight_decay", "grad_clip",
                     "schedule", "warmup", "min_lr_ratio", "max_steps", "epochs", "seed", "dtype")
# Settings a --resume may raise: the run is then extended (see check_resume_args).
RESUME_EXTENDABLE = ("max_steps", "epochs")
# The values of settings added later, in the resume state of runs saved before they existed.
RESUME_ADDED_LATER = {"draft_vocab": 0}


def adapter_config(exit):
    """A description of the adapter saved in exit_config.json."""
    c = exit.head.weight.shape
    if exit.adapter_kind == "block" and exit.adapter_init == "next":
        return {"kind": "block", "init": f"copy of block {exit.exit_layer} (the base's next block)"}
    if exit.adapter_kind == "block":
        return {"kind": "block", "init": f"copy of block {exit.exit_layer - 1} with o_proj and down_proj zeroed"}
    if exit.adapter_kind == "mlp":
        return {"kind": "mlp", "hidden_size": c[1], "intermediate_size": exit.adapter.mlp.up_proj.out_features,
                "init": "residual MLP, down_proj zeroed"}
    return None


def optimizer_to_files(optimizer):
    """(tensors, json-able rest) of an optimizer's state_dict."""
    sd = optimizer.state_dict()
    tensors, other = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                other.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "other_state": other}


def optimizer_from_files(optimizer, tensors, meta):
    state = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, rest in meta["other_state"].items():
        state.setdefault(int(idx), {}).update(rest)
    groups = meta["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state():
    """(tensors, json-able rest) of every random number generator in play."""
    import numpy as np
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    other = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, other


def set_rng_state(tensors, other):
    import numpy as np
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    v, state, gauss = other["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = other["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(out_dir, exit, optimizer, scheduler, config, state, keep=False):
    """Write the exit (with `config`, its exit_config.json) and the resume state at the top of out_dir in one atomic
    swap (and a copy of the exit in checkpoints/step_NNNNNN/ with `keep`). `state`: the JSON-able rest of the resume
    state (step, data, data_position, args, world_size, metrics); the optimizer's, scheduler's and RNGs' are added."""
    def write(tmp):
        write_exit_files(exit, tmp, config)
        r = tmp / RESUME_DIR
        r.mkdir()
        opt_tensors, opt_meta = optimizer_to_files(optimizer)
        save_file(opt_tensors, str(r / "optimizer.safetensors"))
        rng_tensors, rng_other = rng_state()
        save_file(rng_tensors, str(r / "rng.safetensors"))
        full = {"step": state["step"], "scheduler": scheduler.state_dict(), "optimizer": opt_meta, "rng": rng_other,
                **{k: v for k, v in state.items() if k != "step"}}
        (r / "trainer_state.json").write_text(json.dumps(full, indent=1, default=str))

    write_dir_atomically(out_dir, write)
    if keep:
        snap = Path(out_dir) / "checkpoints" / f"step_{state['step']:06d}"
        write_dir_atomically(snap, lambda tmp: write_exit_files(exit, tmp, config))


def load_resume_state(out_dir, optimizer, scheduler):
    """Put the saved optimizer, scheduler and RNG states of the run in out_dir back in place (after check_resume_args
    accepted its settings)."""
    r = Path(out_dir) / RESUME_DIR
    state = read_resume_state(out_dir)
    optimizer_from_files(optimizer, load_file(str(r / "optimizer.safetensors")), state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(load_file(str(r / "rng.safetensors")), state["rng"])
    return state


def read_resume_state(out_dir):
    path = Path(out_dir) / RESUME_DIR / "trainer_state.json"
    if not path.is_file():
        raise CheckpointError(f"--resume: there is no checkpoint to resume in {out_dir} (no {RESUME_DIR}/trainer_state.json).")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"--resume: {path} is unreadable or corrupt.") from None


def check_resume_args(state, args, out_dir):
    """Refuse a --resume whose settings differ from the saved run's, except a longer run: a larger --max_steps (or
    --epochs) extends it (train.py then recomputes the schedule for the new total); a total below the steps already
    done is refused."""
    saved = {**RESUME_ADDED_LATER, **state.get("args", {})}
    for key in RESUME_MUST_MATCH:
        if key == "train" and isinstance(saved.get(key), str) and parse_train(saved[key]) == parse_train(args.train):
            continue  # the same parts, maybe listed in another order
        if key in RESUME_EXTENDABLE and (saved.get("max_steps") == 0) == (args.max_steps == 0):
            continue  # checked below
        if saved.get(key) != getattr(args, key):
            raise CheckpointError(f"--resume: the run in {out_dir} used --{key} {saved.get(key)!r}, not "
                                  f"{getattr(args, key)!r}; resume with the same settings.")
    if 0 < args.max_steps < state["step"]:
        raise CheckpointError(f"--resume: the run in {out_dir} has done {state['step']} steps, more than --max_steps "
                              f"{args.max_steps}; give --max_steps {state['step']} or more.")


def extended_run(state, args):
    """A sentence when this --resume asks for more steps than the saved run (None when it does not)."""
    saved = state.get("args", {})
    key = "max_steps" if args.max_steps > 0 else "epochs"
    if saved.get(key) == getattr(args, key):
        return None
    return (f"--resume: extending the run from --{key} {saved.get(key)} to {getattr(args, key)} at step "
            f"{state['step']}; the learning-rate schedule is recomputed for the new total from there on (so the "
            f"run is not the one a start with --{key} {getattr(args, key)} gives, unless the schedule is constant "
            f"and the data the same)")


def append_log(out_dir, record):
    with open(Path(out_dir) / LOG_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(out_dir, step):
    """Drop log records after `step` (written by an interrupted run after its last checkpoint)."""
    path = Path(out_dir) / LOG_FILE
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))
