"""A GPU smoke run: the toolkit's device paths once each, on random weights, no downloads, one JSON line per check.

    python gpu_smoke.py                              # a GPU: Llama-3.2-1B's shape in bf16 (+ Llama-3.1-8B's if it fits)
    python gpu_smoke.py --device cpu --shape tiny    # the same checks, small, on a CPU (the test suite runs this)

Checks, in the order they run (each prints {"check": NAME, "ok": true|false, "seconds": .., "limit_s": .., ...}
within its time limit, LIMITS; a failing or overrunning check does not stop the others; the exit status is 1 if any
failed). Per shape, cheapest and most telling first; decode, step_costs and prefill_memory run on a GPU with the math
attention kernel excluded, so a fallback fails:
    machine         the device, torch, memory
    decode          per draft kind (exit chain, exit tree, lookup, exit+lookup; greedy and sampled with a device
                    generator), each warmed up first: tokens/s and speedup over autoregressive decoding, tokens per
                    cycle, host reads per cycle (host_reads.py), greedy outputs equal to autoregressive decoding (in
                    bf16 a count, not an assertion), and on a GPU the attention kernels a step and a verify launch
    step_costs      c (a draft step over a full step) and v(k) (a k-token verify over a 1-token step), k = 2..64
    prefill_memory  the peak memory of a --prefill-token prefill (the layers only, as generate runs it) beside its cache
    exact_float32   the first shape in float32 (tiny on a CPU): greedy chains, trees and lookup equal autoregressive
                    decoding (else the first position that differs and the logit margin there); the static step
                    equals the default step; sampling with a device generator repeats itself
    train_step      one accelerate-prepared step of the exit's head (distill_forward, backward under no_sync,
                    AdamW), TF32 on and off: seconds and the loss
    graphs          last, the first shape only (compiling takes minutes): tokens/s on the default, static and compiled
                    static step (CUDA graphs on a GPU), every row count warmed first and a compilation inside a timed
                    region an error; graphs compiled, graph breaks, equal outputs, and c and v(k) on the compiled step

The weights are random (benchmark_torch_compile.random_model), so acceptance and tokens per cycle say nothing about a
real model: this run checks that every path works on the device and measures costs (c, v(k), graphs, memory).
"""
import json
import sys
import time
import traceback

import torch

from benchmark_torch_compile import SHAPES, compile_comparison, random_model, random_prompts
from cli import DEVICE_CHOICES, Parser, positive, resolve_device, run_command, timed
from generate import autoregressive_generate, plan, speculative_generate, step_times
from host_reads import HostReads
from truncated_llama import TruncatedLlama, machine_info

DRAFT_KINDS = {  # name -> speculative_generate's arguments
    "exit_chain_greedy": dict(gamma=4), "exit_chain_sampled": dict(gamma=4, temperature=0.8, top_p=0.95),
    "exit_tree_greedy": dict(gamma=2, tree_width=2), "exit_tree_sampled": dict(gamma=2, tree_width=2, temperature=0.8),
    "lookup_greedy": dict(gamma=4, draft="lookup"), "lookup_sampled": dict(gamma=4, draft="lookup", temperature=0.8),
    "exit+lookup_tree_greedy": dict(gamma=2, tree_width=2, draft="exit+lookup", lookup_tokens=4)}


CHECKS = ("decode", "step_costs", "prefill_memory", "exact_float32", "train_step", "graphs")  # besides machine
# The order a GPU session runs them: cheapest and most telling first, per shape (decode, step_costs, prefill_memory,
# then exactness in float32, then a training step), and compiling (graphs, the first shape only) last of all. Each
# has a time limit in seconds: a check past it is reported failed and the run goes on.
LIMITS = {"machine": 30, "decode": 240, "step_costs": 120, "prefill_memory": 180, "exact_float32": 240,
          "train_step": 180, "graphs": 600}


class OverTime(Exception):
    pass


def check(name, fn, *args, limit=None, **kwargs):
    """Run one check within `limit` seconds (LIMITS by its name; SIGALRM, Unix) and print its line; returns whether
    it passed."""
    import signal
    limit = limit or LIMITS.get(name.split(":")[0], 600)

    def over(*_):
        raise OverTime(f"over its {limit} s limit")
    t = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, over)
    signal.alarm(limit)
    try:
        out = fn(*args, **kwargs)
        ok = out.pop("ok", True)
    except Exception as e:  # a smoke run reports every failure and goes on
        out, ok = {"error": f"{type(e).__name__}: {e}"[:800], "where": traceback.format_exc(limit=-3)[-1500:]}, False
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    print(json.dumps({"check": name, "ok": bool(ok), "seconds": round(time.perf_counter() - t, 1),
                      "limit_s": limit, **out}), flush=True)
    return bool(ok)


def machine(device):
    info = machine_info(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        info.update(memory_gib=round(total / 2**30, 1), free_gib=round(free / 2**30, 1),
                    capability=".".join(map(str, torch.cuda.get_device_capability(device))))
    return info


def generator(device, seed=0):
    return torch.Generator(device=device).manual_seed(seed)


def exact_float32(shape, device, new=32):
    """Float32 at `shape` (Llama-3.2-1B's on a GPU): every greedy draft kind equals autoregressive decoding (where
    one does not, the first position that differs and the full model's logit margin there: top-1 minus top-2), the
    static step (eager) equals the default step, and sampling with a device generator repeats itself."""
    model = random_model(shape, device, torch.float32, seed=1)
    layer = max(1, model.config.num_hidden_layers // 4)
    prompt = random_prompts(model.config.vocab_size, 1, 0, device, 24, 24)[0]
    tl, static = TruncatedLlama(model, layer), TruncatedLlama(model, layer)
    static.steps.use_static()
    ar, _ = autoregressive_generate(tl, prompt, new)
    equal, parted = {}, {}
    for name, kw in DRAFT_KINDS.items():
        if "greedy" in name:
            got = speculative_generate(tl, prompt, new, **plan(**kw))[0]
            equal[name] = torch.equal(got, ar)
            if not equal[name]:
                parted[name] = first_divergence(model, prompt, ar, got)
        equal[f"{name}_static"] = torch.equal(speculative_generate(static, prompt, new, **plan(**kw),
                                                                   generator=generator(device))[0],
                                              speculative_generate(tl, prompt, new, **plan(**kw),
                                                                   generator=generator(device))[0])
    sampled = [speculative_generate(tl, prompt, new, **plan(**DRAFT_KINDS["exit_chain_sampled"]),
                                    generator=generator(device, 5))
               [0] for _ in range(2)]
    equal["sampled_repeats_from_its_seed"] = torch.equal(*sampled)
    return {"ok": all(equal.values()), "shape": shape, "equal": equal, "first_divergence": parted}


@torch.inference_mode()
def first_divergence(model, prompt, want, got):
    """Where `got` first leaves `want` (autoregressive tokens), and the full model's margin there (top-1 minus top-2
    logit, in one forward over the prompt and the common tokens): a tiny margin points at rounding, a large one at
    a bug."""
    n = min(len(want), len(got))
    at = next((i for i in range(n) if int(want[i]) != int(got[i])), n)
    ids = torch.cat([prompt[0], want[:at].to(prompt.device)]).unsqueeze(0)
    top = model(ids).logits[0, -1].float().topk(2).values
    return {"at": at, "margin": round(float(top[0] - top[1]), 6)}


def decode(model, prompts, layer, new, device):
    """Per draft kind: tokens/s and its speedup over autoregressive decoding on the same prompts (each warmed up
    first, untimed), tokens per cycle, host reads per cycle, greedy outputs equal to autoregressive decoding, and on
    a GPU the attention kernels a one-token step and a verify launch (sdpa_kernels)."""
    tl = TruncatedLlama(model, layer)
    autoregressive_generate(tl, prompts[0], 4)  # warm-up: first calls allocate and pick kernels
    ar = [autoregressive_generate(tl, ids, new) for ids in prompts]
    ar_tps = sum(len(t) for t, _ in ar) / sum(s["seconds"] for _, s in ar)
    rows = {"autoregressive": {"tokens_per_s": round(ar_tps, 2)}}
    for name, kw in DRAFT_KINDS.items():
        speculative_generate(tl, prompts[0], 4, **plan(**kw), generator=generator(device))  # warm-up
        tokens, seconds, cycles, same = 0, 0.0, 0, 0
        for ids, (want, _) in zip(prompts, ar):
            got, s = speculative_generate(tl, ids, new, **plan(**kw), generator=generator(device))
            tokens, seconds, cycles = tokens + len(got), seconds + s["seconds"], cycles + s["target_calls"]
            same += torch.equal(got.cpu(), want.cpu())
        with HostReads() as reads:  # counted apart: counting slows every op
            _, s = speculative_generate(tl, prompts[0], new, **plan(**kw), generator=generator(device))
        rows[name] = {"tokens_per_s": round(tokens / seconds, 2),
                      "speedup_vs_autoregressive": round(tokens / seconds / ar_tps, 3),
                      "tokens_per_cycle": round(tokens / cycles, 2),
                      "host_reads_per_cycle": round(reads.count / s["target_calls"], 2)}
        if "greedy" in name:
            rows[name]["greedy_equal_to_autoregressive"] = f"{same}/{len(prompts)}"
    return {"exit_layer": layer, "new_tokens": new, "prompts": len(prompts), "kinds": rows,
            "attention_kernels": sdpa_kernels(tl, prompts[0], device)}


KERNEL_CLASSES = (("flash", "flash"), ("cudnn", "cudnn"), ("efficient", "efficient"), ("fmha", "efficient"),
                  ("mem_eff", "efficient"), ("softmax", "math"), ("bmm", "math"))


@torch.inference_mode()
def sdpa_kernels(tl, ids, device):
    """On CUDA: the attention kernels (flash, cuDNN, memory-efficient, or the math path's softmax and batched
    products) that one one-token step and one 5-token verify launch, from the profiler's kernel names; None
    elsewhere (decode_engine.attention_path says which call a CPU makes)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    from generate import _prefill
    cache, n, last = _prefill(tl, ids, with_exit=False, room=16, drafts=8)
    found = {}
    for rows in (1, 5):
        step = last.expand(1, rows)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            tl.full_step(step, cache, n)
            torch.cuda.synchronize(device)
        cache.crop(n)
        names = [e.name.lower() for e in prof.events() if e.device_type.name == "CUDA"]
        found[f"{rows}_rows"] = sorted({c for name in names for key, c in KERNEL_CLASSES if key in name})
    return found


def step_costs(model, layer, device, sizes=(2, 4, 8, 16, 32, 64)):
    ids = random_prompts(model.config.vocab_size, 1, 1, device, 160, 160)[0]
    draft_s, full_s, verify_s, _ = step_times(TruncatedLlama(model, layer), ids, verify_sizes=sizes)
    return {"exit_layer": layer, "full_step_ms": round(1e3 * full_s, 3), "c": round(draft_s / full_s, 3),
            "v": {k: round(verify_s[k] / full_s, 3) for k in sizes}}


def graphs(model, prompts, layer, new, device):
    """The default, static and compiled static steps side by side (benchmark_torch_compile.compile_comparison: every
    row count warmed first, a compilation inside a timed region an error), graphs compiled and graph breaks counted,
    and c and v(k) measured on the compiled static step, the step a GPU run uses."""
    from torch._dynamo.utils import counters

    from benchmark_torch_compile import compiles
    before, breaks = compiles(), sum(counters["graph_break"].values())
    result = compile_comparison(model, prompts, layer, 4, new, device)
    compiled = TruncatedLlama(model, layer)
    compiled.steps.use_static(compile="reduce-overhead" if device.type == "cuda" else True, max_rows=8)
    ids = prompts[0]
    step_times(compiled, ids, verify_sizes=(2, 4, 8), repeats=2)  # compiles every size once
    draft_s, full_s, verify_s, _ = step_times(compiled, ids, verify_sizes=(2, 4, 8))
    result.update(graphs_compiled=compiles() - before, graph_breaks=sum(counters["graph_break"].values()) - breaks,
                  compiled_step={"full_step_ms": round(1e3 * full_s, 3), "c": round(draft_s / full_s, 3),
                                 "v": {k: round(t / full_s, 3) for k, t in verify_s.items()}})
    result["ok"] = all(v.split("/")[0] == v.split("/")[1] for k, v in result["equal_to_eager"].items()
                       if "static" in k and "compiled" not in k)  # compiled kernels may round otherwise in bf16
    return result


def prefill_memory(model, tokens, device):
    tl = TruncatedLlama(model, 1)
    ids = random_prompts(model.config.vocab_size, 1, 2, device, tokens, tokens)[0]
    with torch.inference_mode():
        cache = tl.new_cache(tokens + 16)
        cache_bytes = 2 * cache.k.numel() * cache.k.element_size()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        # as generate._prefill runs it: the layers only, no logits (an 8k x 128k-vocabulary logits tensor is 2 GB)
        _, seconds = timed(lambda: tl.full_step(ids, cache, 0, logits=False), device)
        peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None
    c = model.config
    return {"ok": bool(torch.isfinite(cache.k).all()), "tokens": tokens, "seconds": round(seconds, 2),
            "kv_cache_gib": round(cache_bytes / 2**30, 3),
            "peak_beyond_weights_and_cache_gib": None if peak is None else round(peak / 2**30, 3),
            "math_kernel_scores_per_layer_gib": round(c.num_attention_heads * tokens**2 * 4 / 2**30, 2)}


def train_step(model, layer, device, batch=4, seq_len=256):
    from accelerate import Accelerator

    from distill import ExitForward, distill_forward, float32_products
    from train import set_trainable
    from tuned_llama import EarlyExit
    accelerator = Accelerator(cpu=device.type == "cpu")
    exit = set_trainable(EarlyExit(model, layer).to(device).float(), ["head"])
    forward = accelerator.prepare(ExitForward(exit))
    optimizer = accelerator.prepare(torch.optim.AdamW([exit.head.weight], lr=1e-5))
    tl = TruncatedLlama(model, layer, exit, engine="hf")
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device,
                        generator=generator(device, 3))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}
    result = {"exit_layer": layer, "batch": f"{batch} x {seq_len}", "processes": accelerator.num_processes}
    for tf32 in (True, False):
        with float32_products(device, tf32):
            def step():
                with accelerator.no_sync(forward):
                    total, per_row, _ = distill_forward(tl, forward, data, loss={"kind": "kl"})
                    accelerator.backward(total / per_row.numel())
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                return total / per_row.numel()

            step()  # warm-up
            loss, seconds = timed(step, device)
        result[f"tf32_{'on' if tf32 else 'off'}"] = {"seconds": round(seconds, 3), "loss": round(float(loss.detach()), 4)}
    result["ok"] = all(torch.isfinite(torch.tensor(v["loss"])) for k, v in result.items() if k.startswith("tf32"))
    return result


FUSED_ONLY = ("decode", "step_costs", "prefill_memory")  # on a GPU: no math-kernel fallback allowed


def fused_attention_only(device, on=True):
    """On CUDA, scaled_dot_product_attention with the math kernel excluded (flash, memory-efficient and cuDNN only),
    so a call that would fall back to it fails loudly (decode_engine.attention_path says which call takes which);
    elsewhere, nothing."""
    import contextlib
    if device.type != "cuda" or not on:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION])


def fits(shape, device, dtype):
    """Whether a model of `shape` fits on the device with room to run (its weights under half the free memory)."""
    if device.type != "cuda":
        return True
    c = SHAPES[shape]
    h, i, v, n = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    params = n * (4 * h * h + 3 * h * i) + v * h * (1 if c.get("tie_word_embeddings") else 2)
    return params * torch.finfo(dtype).bits / 8 < 0.5 * torch.cuda.mem_get_info(device)[0]


def main(argv=None):
    ap = Parser(prog="gpu_smoke.py", description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    ap.add_argument("--shape", nargs="+", default=None, choices=SHAPES,
                    help="model shapes (default: llama-3.2-1b and llama-3.1-8b on a GPU, tiny on a CPU)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--prompts", type=positive(int), default=2)
    ap.add_argument("--new_tokens", type=positive(int), default=64)
    ap.add_argument("--prefill", type=positive(int), default=8192, help="tokens of the prefill whose memory is measured")
    ap.add_argument("--skip", nargs="*", default=[], choices=CHECKS, help="checks to leave out (e.g. graphs)")
    args = ap.parse_args(argv)
    device = torch.device(resolve_device(args.device))
    dtype = getattr(torch, args.dtype)
    shapes = args.shape or (["llama-3.2-1b", "llama-3.1-8b"] if device.type == "cuda" else ["tiny"])
    ok = check("machine", machine, device)
    first = None
    for shape in shapes:
        if not fits(shape, device, dtype):
            print(json.dumps({"check": f"{shape}", "ok": True, "skipped": "does not fit in half the free memory"}))
            continue
        model = random_model(shape, device, dtype, seed=0)
        n = model.config.num_hidden_layers
        layer = max(1, n // 4)
        prompts = random_prompts(model.config.vocab_size, args.prompts, 7, device, 64, 128)
        first = first or (shape, prompts)
        runs = {"decode": (decode, model, prompts, layer, args.new_tokens, device),
                "step_costs": (step_costs, model, layer, device),
                "prefill_memory": (prefill_memory, model, args.prefill, device),
                "exact_float32": (exact_float32, shape if device.type == "cuda" else "tiny", device),
                "train_step": (train_step, model, layer, device)}
        for name, (fn, *fn_args) in runs.items():
            if name not in args.skip and not (name == "exact_float32" and shape != shapes[0]):
                with fused_attention_only(device, name in FUSED_ONLY):
                    ok &= check(f"{name}:{shape}:{args.dtype}", fn, *fn_args)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "graphs" not in args.skip and first:  # compiling takes minutes: last, on the first shape only
        shape, prompts = first
        model = random_model(shape, device, dtype, seed=0)
        ok &= check(f"graphs:{shape}:{args.dtype}", graphs, model, prompts[:1],
                    max(1, model.config.num_hidden_layers // 4), args.new_tokens, device)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run_command("gpu_smoke.py", sys.argv[1:], lambda stop: main(sys.argv[1:])))
