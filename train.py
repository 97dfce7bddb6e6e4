"""
Distil an early exit from the full-depth model it lives in.

The draft is the base model cut at layer L, followed by the exit modules of tuned_llama.EarlyExit (an optional
adapter, an optional private copy of block L-1, a copy of the final norm and of the LM head). The teacher is the
same model at full depth. One forward of the frozen base, under torch.no_grad(), gives both the layer-L hidden
state and the teacher's logits; only the exit keeps an autograd graph, so no backward pass ever goes through the
base layers and the teacher is never run twice. The base model is never modified, so verification stays exact.

    python train.py                                   # SmolLM2-135M, ShareGPT, exit at layer 15, head+norm+adapter
    python train.py --exit_layer 25 --train head      # just the head
    python train.py --exit_layers 3:27:4 --out_dir runs/all   # 7 exits on one base pass a step: runs/all/exit_L3/ ..
    torchrun --nproc_per_node 2 train.py ...          # data parallel (CPU: gloo), or `accelerate launch` on GPUs
    python train.py --out_dir runs/x --resume         # continue an interrupted run, bit for bit
    python train.py --out_dir runs/x --resume --max_steps 900   # or extend a finished one (the schedule follows)

--out_dir always holds the latest exit at its top level (exit.safetensors + exit_config.json, for
`evaluate.py --exit_ckpt OUT_DIR`), the resume state in resume/, log.jsonl (one JSON record per train step and per
validation), and train_curve.png. Each checkpoint replaces the top level in one atomic rename.

Reading order: `run` (set up, then `train_exits`, the loop: data, exit, then step / update / validate / checkpoint)
and the phases it calls, in the order it calls them. The distillation pieces are in distill.py, the losses in losses.py, the
checkpoint and resume files in checkpoints.py, the batch order in data_utils.py.
"""
import argparse
import contextlib
import importlib.util
import math
import os
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from checkpoints import (LOG_FILE, CheckpointError, adapter_config, append_log, check_resume_args, exit_config,
                         extended_run, load_exit, load_resume_state, read_resume_state, save_checkpoint, truncate_log)
from cli import DataError, SignalStop, UsageError, check_context, parse_layers, run_command
from data_utils import BatchOrder, blocks_from_prefix, data_hash, dataset_module, has_targets, sample_blocks
from distill import (ExitForward, StateCache, batch_of, calibrate_scale, distill_forward, evaluate_exit, fit_head_lstsq,
                     float32_products)
from losses import target_rows
from plots import plot_curve
from truncated_llama import (ModelLoadError, TruncatedLlama, dtype_line, load_base_model, machine_info,
                             model_fingerprint, resolve_dtype)
from train_flags import build_parser, check_args, resolve_adapter
from tuned_llama import EarlyExit, parse_train, shared_layer_count

# ----------------------------------------------------------------------------------------------------------------
# Data


def _dataset_source(args):
    """(source, flag): where the data comes from and the flag to name in errors."""
    if args.data_files:
        return args.data_files, "--data_files"
    return args.dataset_id, "--dataset_id"


def load_data(args, tokenizer, train_needed, val_needed):
    """(train blocks, validation blocks), each a list of {"input_ids", "loss_mask"} of args.seq_len tokens.

    The training items are shuffled with --seed and only as many are tokenised as `train_needed` blocks take
    (None: all); blocks with no target token are dropped. Validation is a fixed random sample of `val_needed` blocks
    from across the held-out split (data_utils.sample_blocks; the same whatever --seed).
    """
    source, flag = _dataset_source(args)
    vf = args.val_fraction  # the same fraction is left out as the test split, which evaluate.py uses
    ds = dataset_module(args.dataset)
    splits = ds.load_splits(args.data_files, args.dataset_id, fractions=(1.0 - 2 * vf, vf, vf),
                            skip_bad_lines=args.skip_bad_lines, max_docs=args.max_documents,
                            splits=("train", "validation"))
    train_items, val_items = splits["train"], splits["validation"]
    make = lambda items: ds.training_sequences(tokenizer, items, args.seq_len, assistant_only=args.assistant_only)
    train_items = list(train_items)
    random.Random(args.seed).shuffle(train_items)
    # blocks without a target token (e.g. inside a long user turn with --assistant_only) would cost a forward pass
    # and teach nothing: about 9% of ShareGPT's blocks
    train = blocks_from_prefix(train_items, lambda items: [b for b in make(items) if has_targets(b)], train_needed)
    val = sample_blocks(val_items, make, val_needed)
    where = source or f"the default {args.dataset} data"
    if not train:
        raise DataError(f"{flag}: {where} gives no training block of --seq_len {args.seq_len} tokens.")
    if not val:
        raise DataError(f"{flag}: {where} leaves no validation block of --seq_len {args.seq_len} tokens; "
                        f"raise --val_fraction (now {vf}) or give more data.")
    return train, val


# ----------------------------------------------------------------------------------------------------------------
# Building the exit, the optimizer and the schedule


def build_exit(base, args, train, vocab=None):
    """The EarlyExit for these flags (a pruned head on the token ids `vocab` for --draft_vocab), with requires_grad
    set on exactly the parts named in --train."""
    exit = EarlyExit(base, args.exit_layer, adapter=None if args.adapter == "none" else args.adapter,
                     adapter_init=args.adapter_init, last_block="last_block" in train, head_init=args.head_init,
                     vocab=vocab)
    return set_trainable(exit, train)


def target_token_counts(blocks, vocab_size):
    """(vocab_size,) int64: how often each token id is a target (position t >= 1 with loss_mask 1) in `blocks`."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for b in blocks:
        ids = torch.as_tensor(b["input_ids"], dtype=torch.long)[1:]
        counts += torch.bincount(ids[torch.as_tensor(b["loss_mask"])[1:].bool()], minlength=vocab_size)
    return counts


def frequent_vocab(counts, k):
    """The k most frequent token ids of `counts` (ties: the lower id), in ascending order: a pruned head's rows."""
    return torch.argsort(counts, descending=True, stable=True)[:k].sort().values


def set_trainable(exit, train):
    exit.requires_grad_(False)
    parts = {"head": exit.head, "norm": exit.norm, "adapter": exit.adapter, "last_block": exit.last_block}
    for name in train:
        parts[name].requires_grad_(True)
    return exit


def make_optimizer(exit, args):
    """AdamW over the trainable exit parameters: the head at --head_lr (default --lr), the rest at --lr."""
    head = [p for p in exit.head.parameters() if p.requires_grad]
    rest = [p for n, p in exit.named_parameters() if p.requires_grad and not n.startswith("head.")]
    groups = [g for g in ({"params": rest, "lr": args.lr},
                          {"params": head, "lr": args.head_lr if args.head_lr is not None else args.lr})
              if g["params"]]
    fused = exit.head.weight.device.type in ("cpu", "cuda")  # one fused kernel: much faster than the default
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=args.weight_decay, fused=fused)


def lr_factor(step, total, warmup, schedule, min_ratio):
    """The learning-rate multiplier at `step` (0-based): linear warmup, then constant, cosine or linear decay to
    min_ratio at the last step."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return min_ratio + (1 - min_ratio) * (1 - progress)


# ----------------------------------------------------------------------------------------------------------------
# Training


def make_accelerator(args):
    from accelerate import Accelerator
    log_with = None
    if args.report_to != "none":
        if importlib.util.find_spec(args.report_to) is None and not (
                args.report_to == "tensorboard" and importlib.util.find_spec("tensorboardX")):
            raise UsageError(f"--report_to {args.report_to} needs the {args.report_to} package installed.")
        log_with = args.report_to
    # accelerate only sets up multi-process CPU training (gloo) when told cpu=True
    cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    return Accelerator(cpu=cpu, log_with=log_with, project_dir=args.out_dir)


def load_teacher(args, tokenizer, base, device, dtype):
    """The separate teacher of --teacher_model_path, after checking that it shares the tokenizer's vocabulary."""
    teacher, teacher_tok = load_base_model(args.teacher_model_path, dtype=dtype, device=device,
                                           attn_implementation=args.attn_implementation)
    if teacher_tok.get_vocab() != tokenizer.get_vocab() or teacher.lm_head.out_features != base.lm_head.out_features:
        raise UsageError(f"--teacher_model_path: {args.teacher_model_path} has a different vocabulary "
                         f"({len(teacher_tok)} tokens, {teacher.lm_head.out_features} logits) than --model "
                         f"({len(tokenizer)} tokens, {base.lm_head.out_features} logits).")
    return teacher.requires_grad_(False)


@dataclass
class Setup:
    """What every phase of a run uses: the processes, the dtype, the frozen base (and teacher), what is trained.
    With --exit_layers each exit has its own copy, differing in `out_dir` and `resume_state` only."""
    accelerator: object
    device: torch.device
    dtype: torch.dtype
    rank: int
    world: int
    main: bool
    say: object            # print on the main process
    base: object
    tokenizer: object
    teacher: object        # a separate teacher model, or None (the base at full depth)
    train: list            # the exit's trained parts
    fingerprint: str
    pad_id: int
    resume_state: dict     # the saved trainer state with --resume, else None
    out_dir: Path


def exit_args(args):
    """The flags of each exit the run trains: --exit_layer's (in --out_dir), or one per layer of --exit_layers (in
    OUT_DIR/exit_L<l>/, the rest of the flags the same)."""
    if args.exit_layers is None:
        return [args]
    layers = parse_layers(args.exit_layers)
    if not layers:
        raise UsageError("--exit_layers: give at least one layer (values and/or start:stop[:step] ranges).")
    runs = []
    for layer in layers:
        a = argparse.Namespace(**vars(args))
        a.exit_layer, a.out_dir = layer, str(Path(args.out_dir) / f"exit_L{layer}")
        runs.append(a)
    return runs


def set_up(args):
    """Processes, dtype, the --resume states (checked before any slow loading), the base model and the teacher.
    Returns (the run's Setup, [(flags, Setup) of each exit])."""
    from accelerate.utils import set_seed
    resolve_adapter(args)  # before the resume check: the saved arguments hold the resolved --adapter
    accelerator = make_accelerator(args)
    device = accelerator.device
    dtype, args.dtype = resolve_dtype(args.dtype, device)  # saved (and checked on --resume) as resolved
    if args.exit_layers is not None and args.cache_states:
        raise UsageError("--cache_states keeps one exit's states: train one --exit_layer with it, or drop it.")
    exits = exit_args(args)
    states = [None] * len(exits)
    if args.resume:
        states = [read_resume_state(Path(a.out_dir)) for a in exits]
        for a, state in zip(exits, states):
            check_resume_args(state, a, Path(a.out_dir))
    main = accelerator.is_main_process
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if main else (lambda *a: None)
    set_seed(args.seed)
    base, tokenizer = load_base_model(args.model, dtype=dtype, device=device,
                                      attn_implementation=args.attn_implementation)
    if args.exit_layers is not None:
        parse_layers(args.exit_layers, len(base.model.layers))  # the range, now that the depth is known
    train = [check_args(a, len(base.model.layers), base.lm_head.out_features) for a in exits][0]
    check_context(base.config, "--seq_len", args.seq_len)
    teacher = load_teacher(args, tokenizer, base, device, dtype) if args.teacher_model_path else None
    if teacher is not None:
        check_context(teacher.config, "--seq_len", args.seq_len, whose="the teacher's")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    su = Setup(accelerator, device, dtype, accelerator.process_index, accelerator.num_processes, main, say, base,
               tokenizer, teacher, train, model_fingerprint(base), pad_id, None, Path(args.out_dir))
    check_memory(args, su, len(exits))
    return su, [(a, replace(su, out_dir=Path(a.out_dir), resume_state=s)) for a, s in zip(exits, states)]


def exit_bytes(base, args, ddp=False):
    """About how many bytes one exit needs while it trains: its float32 weights; for the trained parts their
    gradients, AdamW's two moments and, with `ddp` (several processes), DistributedDataParallel's gradient buckets
    (a second copy of every trained gradient); the activations one micro-batch keeps for the backward pass."""
    D, V = base.config.hidden_size, args.draft_vocab or base.lm_head.out_features
    block = sum(p.numel() for p in base.model.layers[0].parameters())
    train = parse_train(args.train)
    parts = {"head": V * D, "norm": D, "adapter": {"block": block, "mlp": 8 * D * D}.get(args.adapter, 0),
             "last_block": block if "last_block" in train else 0}
    rows = args.batch_size * args.seq_len
    blocks = (args.adapter == "block") + ("last_block" in train)
    trained = sum(parts[k] for k in train)
    return 4 * sum(parts.values()) + (12 + 4 * ddp) * trained + 4 * rows * (24 * D * blocks + 2 * V)


def cache_bytes(args, su, blocks):
    """About how many bytes --cache_states keeps in one process for its `blocks` training blocks: each micro-batch's
    shared and final states (batch x seq_len x hidden, in the base's dtype) as one tensor each, in host memory
    (distill.StateCache); on a GPU run pinned, and torch's caching host allocator rounds each up to a power of 2."""
    each = args.batch_size * args.seq_len * su.base.config.hidden_size * su.dtype.itemsize
    if su.device.type == "cuda":
        each = 1 << (each - 1).bit_length()
    return 2 * each * -(-blocks // args.batch_size)


def available_bytes(device):
    """Free memory for this process: the GPU's free memory, or the machine's available memory (/proc/meminfo)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None  # unknown: not checked


def check_memory(args, su, count):
    """Refuse, before any training, a run whose exits (weights, gradients, optimizer states, DDP's gradient
    buckets, activations) will not fit in the memory left beside the base model; the CPU's processes share one
    machine's memory."""
    available = available_bytes(su.device)
    if available is None:
        return
    sharers = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if su.device.type == "cpu" else 1
    each = exit_bytes(su.base, args, ddp=su.world > 1)
    need = each * count * sharers
    flag = "--exit_layers" if args.exit_layers is not None else "--exit_layer"
    if need > 0.9 * available:
        raise UsageError(f"{flag}: {count} exit(s) need about {need / 2**30:.1f} GiB to train ({each / 2**30:.2f} GiB "
                         f"each{f' in each of {sharers} processes' if sharers > 1 else ''}), but only "
                         f"{available / 2**30:.1f} GiB is free; train fewer exits per run, or lower --batch_size or "
                         f"--draft_vocab.")
    su.say(f"memory: {count} exit(s) need about {need / 2**30:.2f} GiB to train, of {available / 2**30:.1f} GiB free")


def check_cache_memory(args, su, data):
    """With --cache_states, refuse before training a run whose cached base states (each training block's, kept in
    host memory: see distill.StateCache) will not fit in the machine's free memory, less the exits' on a CPU run.
    Checked once the data is loaded, since the cache grows with the number of training blocks."""
    available = available_bytes(torch.device("cpu")) if args.cache_states else None
    if available is None or not data.total_steps:
        return
    blocks = min(data.total_steps, data.order.steps_per_epoch) * data.per_step // su.world  # this process's, epoch 1
    each, sharers = cache_bytes(args, su, blocks), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # on this host
    exits = exit_bytes(su.base, args, ddp=su.world > 1) * sharers if su.device.type == "cpu" else 0
    room = 0.9 * available - exits
    if each * sharers > room:
        fit = max(0, int(room / sharers / (each / blocks))) * su.world // data.per_step * data.per_step
        raise UsageError(f"--cache_states: the base model's states of {blocks * su.world} training blocks need about "
                         f"{each * sharers / 2**30:.1f} GiB of host memory"
                         f"{f' ({each / 2**30:.2f} GiB in each of {sharers} processes)' if sharers > 1 else ''}, but "
                         f"only {max(room, 0) / 2**30:.1f} GiB is free{' beside the exit' if exits else ''}; "
                         f"at most {fit} blocks fit: lower --train_blocks or --max_steps, or drop --cache_states.")
    su.say(f"--cache_states: the base model runs in epoch 1 only; its states take about {each / 2**30:.2f} GiB of "
           f"host memory per process, of {available / 2**30:.1f} GiB free")


@dataclass
class Data:
    train_blocks: list
    val_blocks: list
    order: object          # BatchOrder: which blocks each step, micro-batch and rank takes
    total_steps: int
    per_step: int          # blocks per optimizer step, over every micro-batch and rank
    info: dict             # what --resume checks: block count, blocks per step, a hash of the blocks


def training_data(args, su):
    """Tokenise what --max_steps needs (or everything, for --epochs) plus a fixed validation subset."""
    per_step = args.batch_size * args.grad_accum * su.world
    needed = args.max_steps * per_step if args.max_steps > 0 else None
    if args.train_blocks:
        needed = min(needed, args.train_blocks) if needed else args.train_blocks
    t0 = time.perf_counter()
    train_blocks, val_blocks = load_data(args, su.tokenizer, needed, args.eval_batches * args.batch_size * su.world)
    if args.train_blocks:
        train_blocks = train_blocks[:args.train_blocks]
    if len(train_blocks) < per_step:
        raise DataError(f"{_dataset_source(args)[1]}: only {len(train_blocks)} training blocks of --seq_len "
                        f"{args.seq_len} tokens, but one step takes {per_step} (--batch_size x --grad_accum x ranks).")
    order = BatchOrder(len(train_blocks), args.batch_size, args.grad_accum, su.world, args.seed,
                       sticky=args.cache_states)
    total = args.max_steps if args.max_steps > 0 else args.epochs * order.steps_per_epoch
    info = {"train_blocks": len(train_blocks), "blocks_per_step": per_step, "hash": data_hash(train_blocks)}
    su.say(f"data: {len(train_blocks)} training blocks, {len(val_blocks)} validation blocks of {args.seq_len} "
           f"tokens ({time.perf_counter() - t0:.1f} s); {total} steps of {per_step} blocks on {su.world} process(es)")
    return Data(train_blocks, val_blocks, order, total, per_step, info)


def new_or_resumed_exit(args, su, data):
    """The exit in float32 (whatever the base's dtype): loaded with --resume, else built for the flags, its pruned
    vocabulary (--draft_vocab) counted from the training blocks. Returns (exit, what to log about the vocabulary)."""
    if args.resume:
        exit, _ = load_exit(su.out_dir, su.base, base_fingerprint=su.fingerprint, exit_layer=args.exit_layer,
                            dtype=torch.float32)
        state, longer = su.resume_state, extended_run(su.resume_state, args)
        if not same_data(state["data"], data, extended=longer is not None) or state.get("world_size") != su.world:
            raise CheckpointError(f"--resume: the data or the number of processes differ from the run in "
                                  f"{su.out_dir}; resume with the same data, batch settings and world size.")
        if data.total_steps < state["step"]:
            raise CheckpointError(f"--resume: the run in {su.out_dir} has done {state['step']} steps, more than the "
                                  f"{data.total_steps} of --epochs {args.epochs}; give more --epochs.")
        if longer:
            su.say(longer)
        return set_trainable(exit.to(su.device), su.train), None
    vocab = vocab_info = None
    if args.draft_vocab:  # counted once, from the training blocks; saved with the exit (its `vocab` buffer)
        counts = target_token_counts(data.train_blocks, su.base.lm_head.out_features)
        vocab = frequent_vocab(counts, args.draft_vocab)
        vocab_info = {"draft_vocab/k": args.draft_vocab, "draft_vocab/distinct_targets": int((counts > 0).sum()),
                      "draft_vocab/coverage": float(counts[vocab].sum() / max(int(counts.sum()), 1))}
        su.say(f"--draft_vocab {args.draft_vocab}: the head keeps the most frequent of the "
               f"{vocab_info['draft_vocab/distinct_targets']} distinct target tokens in the training blocks, "
               f"{vocab_info['draft_vocab/coverage']:.1%} of their {int(counts.sum())} target tokens")
    return build_exit(su.base, args, su.train, vocab).to(su.device).float(), vocab_info


def same_data(saved, data, extended=False):
    """Whether the saved run's data (its resume state's `data`) is this run's; an extended run (a larger
    --max_steps) tokenises more blocks, of which the saved run's must be the first."""
    if saved == data.info:
        return True
    n = saved.get("train_blocks", -1)
    return (extended and saved.get("blocks_per_step") == data.per_step and 0 < n <= len(data.train_blocks)
            and data_hash(data.train_blocks[:n]) == saved.get("hash"))


def initialise_head(args, su, data, model, exit, handover, val_cache):
    """On a fresh run: the --head_init lstsq fit (its base states kept in `handover` for the first steps) and the
    --calibrate logit scale. Returns the exit's validation metrics before the fit (None if not measured)."""
    untrained = None
    if args.head_init == "lstsq":
        if args.eval_every > 0:  # the exit before the fit, for the record (the step-0 validation comes after it)
            untrained = evaluate_exit(model, ExitForward(exit), su.teacher, data.val_blocks, su.pad_id,
                                      args.batch_size, su.accelerator, val_cache)
            su.say(f"before the lstsq fit: val top1 {untrained['top1']:.4f} overlap T=1 "
                   f"{untrained['overlap_t1']:.4f} kl {untrained['kl']:.4f}")
        t0 = time.perf_counter()
        steps = -(-args.lstsq_blocks // data.per_step)
        picks = [data.order.indices(s, m, su.rank) for s in range(steps) for m in range(args.grad_accum)]
        fit = [batch_of(data.train_blocks, idx, su.pad_id, su.device) for idx in picks]
        n = fit_head_lstsq(model, exit, fit, su.accelerator, cache=handover, picks=picks)
        su.say(f"--head_init lstsq: fitted the head on {n} positions of the first {steps * data.per_step} "
               f"training blocks ({time.perf_counter() - t0:.1f} s)")
    if args.calibrate and ("norm" in su.train or "head" in su.train):
        idx = data.order.indices(0, 0, 0)
        first = batch_of(data.train_blocks, idx, su.pad_id, su.device)
        tau = calibrate_scale(model, ExitForward(exit), first, su.teacher,
                              states=handover.lookup(idx, first["input_ids"].shape[1], model.shared_layers))
        part = "norm" if "norm" in su.train else "head"
        with torch.no_grad():  # the same batch on every rank, so every rank gets the same tau
            (exit.norm.weight if part == "norm" else exit.head.weight).div_(tau)
        su.say(f"calibrated the exit's logits: divided the {part} by {tau:.3f}")
    return untrained


def optimizer_and_start(args, su, data, exit, stop, logged):
    """AdamW and its schedule; with --resume their saved state and the step to go on from, else a fresh log (with
    the `logged` step-0 records). Returns (optimizer, scheduler, start step, last metrics)."""
    optimizer = make_optimizer(exit, args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, data.total_steps, args.warmup, args.schedule, args.min_lr_ratio))
    if not args.resume:
        if su.main:
            su.out_dir.mkdir(parents=True, exist_ok=True)
            (su.out_dir / LOG_FILE).write_text("")
            for record in logged:
                append_log(su.out_dir, {"step": 0, **record})
        return optimizer, scheduler, 0, None
    state = load_resume_state(su.out_dir, optimizer, scheduler)
    if extended_run(state, args):  # the next step's rate under the new total (the saved one was for the old)
        factor = lr_factor(state["step"], data.total_steps, args.warmup, args.schedule, args.min_lr_ratio)
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base_lr * factor
    with stop.held():
        if su.main:
            truncate_log(su.out_dir, state["step"])
        stop.kept, stop.resumable = f"kept the checkpoint of step {state['step']} in {su.out_dir}", True
    su.say(f"resumed from {su.out_dir} at step {state['step']}")
    return optimizer, scheduler, state["step"], state.get("metrics")


def base_states(su, runs, indices, batch):
    """Each exit's (shared, final) base states for one micro-batch: one exit reads them from its caches (None when
    they are not there: distill_forward then runs the base itself); several share one pass of the frozen base, which
    keeps the state entering each exit's layer (and, with the model as teacher, the full model's last state)."""
    if len(runs) == 1:
        tr = runs[0]
        if tr.cache is not None:
            return [tr.cache.get(tr.model, indices, batch)]
        return [tr.handover.lookup(indices, batch["input_ids"].shape[1], tr.model.shared_layers, remove=True)]
    deepest = max(runs, key=lambda tr: tr.model.shared_layers).model  # with a teacher, no layer past it is run
    p = deepest.base_pass(batch["input_ids"], batch["attention_mask"], stop_at_shared=su.teacher is not None,
                          all_hidden_states=True)
    return [(p.hidden_states[tr.model.shared_layers], p.final) for tr in runs]


def train_step(args, su, data, runs, step, loss_config):
    """One optimizer step's forward and backward over its micro-batches for each exit in `runs` (no optimizer
    update): the exits share each micro-batch's base pass and teacher logits. Returns, per exit, (its loss summed over
    every rank, the number of target tokens it is over)."""
    picks = [data.order.indices(step, m, su.rank) for m in range(args.grad_accum)]
    batches = [batch_of(data.train_blocks, idx, su.pad_id, su.device) for idx in picks]
    # normalise by the number of target tokens in the whole step, over every micro-batch and rank
    count = torch.tensor(float(sum(int(target_rows(b).sum()) for b in batches)), device=su.device)
    if su.world > 1:
        count = su.accelerator.reduce(count, reduction="sum")
    denom = max(count.item(), 1.0) / su.world  # DDP averages gradients over ranks
    loss_sums = [torch.zeros((), device=su.device) for _ in runs]
    for m, batch in enumerate(batches):
        sync = m == len(batches) - 1
        target = None
        if su.teacher is not None:  # the separate teacher, once for every exit
            with torch.no_grad():
                target = su.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                                    ).logits[:, :-1][target_rows(batch)]
        for tr, states, loss_sum in zip(runs, base_states(su, runs, picks[m], batch), loss_sums):
            with contextlib.nullcontext() if sync else su.accelerator.no_sync(tr.forward):  # one all-reduce a step
                total, _, _ = distill_forward(tr.model, tr.forward, batch, su.teacher, loss=loss_config,
                                              states=states, target=target)
                su.accelerator.backward(total / denom)
            loss_sum += total.detach()
    if su.world > 1:
        loss_sums = [su.accelerator.reduce(x, reduction="sum") for x in loss_sums]
    return [(x.item(), max(count.item(), 1.0)) for x in loss_sums]


class SharedCaches(NamedTuple):
    """The state caches several exits trained together share: validation blocks, the lstsq fit's blocks."""
    val: StateCache
    handover: StateCache


@dataclass
class Training:
    """One exit's moving parts once set up: its flags and Setup, the model and exit, the optimizer, the state caches,
    step and metrics."""
    args: argparse.Namespace
    su: Setup
    model: TruncatedLlama
    exit: EarlyExit
    forward: nn.Module     # ExitForward, as accelerate prepared it (DDP on several processes)
    optimizer: object
    scheduler: object
    cache: object          # StateCache of every training block (--cache_states), or None
    handover: object       # StateCache of the lstsq fit's blocks, for the first steps
    val_cache: object      # StateCache of the validation blocks
    step: int
    metrics: dict


def prepare(args, su, data, stop, t_start, shared=None):
    """The exit (new or resumed), its head initialisation, optimizer and schedule, ready to train. The seed is set
    again first, so an exit starts the same whether it is trained alone or with others. `shared`: the state caches
    of several exits (SharedCaches), so that the validation blocks' and the lstsq fit's base passes run once."""
    from accelerate.utils import set_seed
    set_seed(args.seed)
    exit, vocab_info = new_or_resumed_exit(args, su, data)
    su.say(dtype_line(args.dtype, args.dtype, machine_info(su.device)) + "; the exit trains in float32")
    model = TruncatedLlama(su.base, args.exit_layer, exit, engine="hf")  # freezes the base; no decode steps here
    val_cache = shared.val if shared else StateCache()  # the base's states on the validation blocks: computed once
    cache = StateCache(offload=True) if args.cache_states else None  # every training block's, on the host
    handover = shared.handover if shared else cache if cache is not None else StateCache()  # the lstsq fit's states
    untrained = None if args.resume else initialise_head(args, su, data, model, exit, handover, val_cache)
    logged = ([vocab_info] if vocab_info else []) + \
        ([{f"untrained/{k}": v for k, v in untrained.items()}] if untrained else [])
    optimizer, scheduler, step, metrics = optimizer_and_start(args, su, data, exit, stop, logged)
    forward = ExitForward(exit)
    if args.torch_compile:
        for layer in su.base.model.layers:
            layer.compile()
        forward.compile()
    forward = su.accelerator.prepare(forward)
    if args.report_to != "none":
        su.accelerator.init_trackers("self_spec_train", config={
            k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()})
    n = sum(p.numel() for p in exit.parameters() if p.requires_grad)
    su.say(f"training {', '.join(su.train)} of the exit at layer {args.exit_layer}: {n / 1e6:.2f}M parameters; "
           f"{time.perf_counter() - t_start:.1f} s to start")
    return Training(args, su, model, exit, forward, optimizer, scheduler, cache, handover, val_cache, step, metrics)


def validate(args, su, data, tr):
    """Validation metrics of the exit at step tr.step (logged, plotted, printed)."""
    m = evaluate_exit(tr.model, su.accelerator.unwrap_model(tr.forward), su.teacher, data.val_blocks, su.pad_id,
                      args.batch_size, su.accelerator, tr.val_cache)
    if su.main:
        append_log(su.out_dir, {"step": tr.step, **{f"val/{k}": v for k, v in m.items()}})
        plot_curve(su.out_dir)
        su.say(f"step {tr.step}: val top1 {m['top1']:.4f} overlap T=1 {m['overlap_t1']:.4f} "
               f"T=0.7 {m['overlap_t07']:.4f} kl {m['kl']:.4f} exit ppl {m['exit_ppl']:.2f}")
    su.accelerator.log({f"val/{k}": v for k, v in m.items()}, step=tr.step)
    return m


def checkpoint(data, trs, stop):
    """Each exit's weights and resume state at its step, each in one atomic swap; a signal waits until all are
    written."""
    with stop.held():
        for tr in trs:
            args, su = tr.args, tr.su
            if su.main:
                extra = {"step": tr.step, "metrics": tr.metrics, "adapter_config": adapter_config(tr.exit),
                         "train_args": vars(args), "world_size": su.world, "dtype": args.dtype,
                         "machine": machine_info(tr.exit.head.weight.device)}
                config = exit_config(tr.exit, base_name=args.model, base_fingerprint=su.fingerprint,
                                     trained=su.train, extra=extra)
                state = {"step": tr.step, "data": data.info,
                         "data_position": dict(zip(("epoch", "step_in_epoch"), data.order.position(tr.step))),
                         "args": vars(args), "world_size": su.world, "metrics": tr.metrics}
                save_checkpoint(su.out_dir, tr.exit, tr.optimizer, tr.scheduler, config, state,
                                keep=args.keep_checkpoints)
        where = trs[0].su.out_dir if len(trs) == 1 else ", ".join(str(tr.su.out_dir) for tr in trs)
        stop.kept, stop.resumable = f"kept the checkpoint of step {trs[0].step} in {where}", True
    trs[0].su.accelerator.wait_for_everyone()


def update(args, tr):
    """Clip (or measure) the gradient, take the optimizer and schedule step. Returns (lr used, gradient norm)."""
    trainable = [p for p in tr.exit.parameters() if p.requires_grad]
    if args.grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip))
    else:
        grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainable])))
    lr = tr.optimizer.param_groups[0]["lr"]
    tr.optimizer.step()
    tr.scheduler.step()
    tr.optimizer.zero_grad(set_to_none=True)
    tr.step += 1
    return lr, grad_norm


def run(args, stop=None):
    """Train the exit(s) the flags say, with --tf32's float32 products. Returns a dict with the trained `exit` (the
    first), `exits` ({layer: exit}), the `base` model, `step`, `metrics`, `rank` and `world_size` (used by the tests).
    `stop` (a cli.SignalStop) is told what a SIGINT or SIGTERM would keep: the last checkpoint."""
    t_start = time.perf_counter()
    stop = stop if stop is not None else SignalStop()
    su, exits = set_up(args)
    with float32_products(su.device, args.tf32 == "on"):
        trs = train_exits(args, su, exits, stop, t_start)
    su.accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return {"exit": trs[0].exit, "exits": {tr.args.exit_layer: tr.exit for tr in trs}, "base": su.base,
            "step": min(tr.step for tr in trs), "metrics": trs[0].metrics, "rank": su.rank, "world_size": su.world}


def train_exits(args, su, exits, stop, t_start):
    """The run once set up: data, the exits, then step / update / validate / checkpoint. Returns the Trainings."""
    from tqdm import tqdm
    data = training_data(args, su)
    check_cache_memory(args, su, data)
    shared = None
    if len(exits) > 1:
        layers = [shared_layer_count(a.exit_layer, "last_block" in su.train) for a, _ in exits]
        shared = SharedCaches(StateCache(layers), StateCache(layers))
    trs = [prepare(a, s, data, stop, t_start, shared) for a, s in exits]
    if len(trs) > 1:
        shared.handover.states.clear()  # the steps share their own base pass: the lstsq fit's states are not needed
        su.say(f"training {len(trs)} exits (layers {', '.join(str(tr.args.exit_layer) for tr in trs)}) on one pass "
               f"of the base per step, into {su.out_dir}/exit_L<layer>/")
    for tr in trs:
        if tr.step == 0 and args.eval_every > 0:
            tr.metrics = validate(tr.args, tr.su, data, tr)  # the untrained exit
    bar = tqdm(total=data.total_steps, initial=min(tr.step for tr in trs), disable=not su.main,
               dynamic_ncols=True, desc="train")
    tokens_per_step = data.per_step * args.seq_len
    loss_config = {"kind": args.loss, "temperature": args.kl_temperature, "ce_weight": args.ce_weight}
    while min(tr.step for tr in trs) < data.total_steps:  # forward and backward, update, log, validate, checkpoint
        step = min(tr.step for tr in trs)
        now = [tr for tr in trs if tr.step == step]  # all, unless a stop fell between two exits' checkpoints
        t0 = time.perf_counter()
        losses = train_step(args, su, data, now, step, loss_config)
        updates = [update(args, tr) for tr in now]
        dt = time.perf_counter() - t0
        for tr, (loss_sum, count), (lr, grad_norm) in zip(now, losses, updates):
            if su.main:
                append_log(tr.su.out_dir, {"step": tr.step, "train/loss": loss_sum / count, "train/lr": lr,
                                           "train/grad_norm": grad_norm, "train/tokens_per_s": tokens_per_step / dt,
                                           "time_s": time.perf_counter() - t_start})
            su.accelerator.log({f"L{tr.args.exit_layer}/train/loss" if len(trs) > 1 else "train/loss":
                                loss_sum / count, "train/lr": lr}, step=tr.step)
        if su.main:
            mean = sum(x / c for x, c in losses) / len(losses)
            bar.set_postfix(loss=f"{mean:.4f}", tok_s=f"{tokens_per_step / dt:.0f}", lr=f"{updates[0][0]:.2e}")
            bar.update(1)
        step += 1
        last = step == data.total_steps
        if last or (args.eval_every > 0 and step % args.eval_every == 0):
            for tr in now:
                tr.metrics = validate(tr.args, tr.su, data, tr)
        if last or (args.save_every > 0 and step % args.save_every == 0) or step == args.stop_after:
            checkpoint(data, now, stop)
        if step == args.stop_after:
            su.say(f"stopping after step {step} (--stop_after); continue with --resume")
            break
    bar.close()
    done = min(tr.step for tr in trs)
    if su.main and done == data.total_steps:
        for tr in trs:
            plot_curve(tr.su.out_dir)
        where = su.out_dir if args.exit_layers is None else f"{su.out_dir}/exit_L<layer>/"
        su.say(f"done: {done} steps in {time.perf_counter() - t_start:.0f} s; exit(s) saved to {where}")
    return trs


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # no "Loading weights" bars around our own messages
    if not 0 < args.val_fraction < 0.5:
        build_parser().error(f"argument --val_fraction: must be in (0, 0.5), got {args.val_fraction}")

    def body(stop):
        parse_train(args.train)
        return run(args, stop)
    return run_command("train.py", argv, body, errors=(CheckpointError, ModelLoadError))


if __name__ == "__main__":
    main()
