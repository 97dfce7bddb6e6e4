"""A GPU smoke run: the toolkit's device paths once each, on random weights, no downloads, one JSON line per check.

    python gpu_smoke.py                              # a GPU: Llama-3.2-1B's shape in bf16 (+ Llama-3.1-8B's if it fits)
    python gpu_smoke.py --device cpu --shape tiny    # the same checks, small, on a CPU (the test suite runs this)

Checks (each prints {"check": NAME, "ok": true|false, "seconds": .., ...}; a failing check does not stop the others;
the exit status is 1 if any failed):
    machine         the device, torch, memory
    exact_float32   a small model in float32 on the device: greedy chains, trees and lookup equal autoregressive
                    decoding; the static step (eager) equals the default step, and so does the compiled static step
                    (CUDA graphs on a GPU) for a greedy chain; sampling with a device generator repeats itself
    (decode, step_costs and prefill_memory run on a GPU with the math attention kernel excluded: a fallback fails)
    decode          per draft kind (exit chain, exit tree, lookup, exit+lookup; greedy and sampled with a device
                    generator): tokens/s, tokens per cycle, host reads per cycle (host_reads.py), and how many greedy
                    outputs equal autoregressive decoding (in bf16 a count, not an assertion: see docs/design.md)
    step_costs      c (a draft step over a full step) and v(k) (a k-token verify over a 1-token step), k = 2..64
    graphs          tokens/s on the default step, the static step and the static step under torch.compile (mode
                    reduce-overhead on CUDA: CUDA graphs), autoregressive and speculative, and equal outputs (the
                    first shape only: compiling takes most of the run)
    prefill_memory  the peak memory of a --prefill-token prefill beside the KV cache it fills
    train_step      one accelerate-prepared step of the exit's head (distill_forward, backward under no_sync,
                    AdamW), TF32 on and off: seconds and the loss

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


CHECKS = ("exact_float32", "decode", "step_costs", "prefill_memory", "train_step", "graphs")  # besides machine


def check(name, fn, *args, **kwargs):
    """Run one check and print its line; returns whether it passed."""
    t = time.perf_counter()
    try:
        out = fn(*args, **kwargs)
        ok = out.pop("ok", True)
    except Exception as e:  # a smoke run reports every failure and goes on
        out, ok = {"error": f"{type(e).__name__}: {e}"[:800], "where": traceback.format_exc(limit=-3)[-1500:]}, False
    print(json.dumps({"check": name, "ok": bool(ok), "seconds": round(time.perf_counter() - t, 1), **out}), flush=True)
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


def exact_float32(device, new=32):
    model = random_model("tiny", device, torch.float32, seed=1)
    prompt = random_prompts(model.config.vocab_size, 1, 0, device, 24, 24)[0]
    tl, static = TruncatedLlama(model, 2), TruncatedLlama(model, 2)
    static.steps.use_static()
    ar, _ = autoregressive_generate(tl, prompt, new)
    equal = {}
    for name, kw in DRAFT_KINDS.items():
        if "greedy" in name:
            equal[name] = torch.equal(speculative_generate(tl, prompt, new, **plan(**kw))[0], ar)
        equal[f"{name}_static"] = torch.equal(speculative_generate(static, prompt, new, **plan(**kw),
                                                                   generator=generator(device))[0],
                                              speculative_generate(tl, prompt, new, **plan(**kw),
                                                                   generator=generator(device))[0])
    sampled = [speculative_generate(tl, prompt, new, **plan(**DRAFT_KINDS["exit_chain_sampled"]),
                                    generator=generator(device, 5))
               [0] for _ in range(2)]
    equal["sampled_repeats_from_its_seed"] = torch.equal(*sampled)
    compiled = TruncatedLlama(model, 2)
    compiled.steps.use_static(compile="reduce-overhead" if device.type == "cuda" else True, max_rows=5)
    for _ in range(2):  # the second time replays the graphs
        equal["exit_chain_greedy_compiled"] = torch.equal(
            speculative_generate(compiled, prompt, new, **plan(**DRAFT_KINDS["exit_chain_greedy"]))[0], ar)
    return {"ok": all(equal.values()), "equal": equal}


def decode(model, prompts, layer, new, device):
    tl = TruncatedLlama(model, layer)
    ar = [autoregressive_generate(tl, ids, new) for ids in prompts]
    rows = {"autoregressive": {"tokens_per_s": round(sum(len(t) for t, _ in ar) / sum(s["seconds"] for _, s in ar),
                                                      2)}}
    for name, kw in DRAFT_KINDS.items():
        tokens, seconds, cycles, same = 0, 0.0, 0, 0
        for ids, (want, _) in zip(prompts, ar):
            got, s = speculative_generate(tl, ids, new, **plan(**kw), generator=generator(device))
            tokens, seconds, cycles = tokens + len(got), seconds + s["seconds"], cycles + s["target_calls"]
            same += torch.equal(got.cpu(), want.cpu())
        with HostReads() as reads:  # counted apart: counting slows every op
            _, s = speculative_generate(tl, prompts[0], new, **plan(**kw), generator=generator(device))
        rows[name] = {"tokens_per_s": round(tokens / seconds, 2), "tokens_per_cycle": round(tokens / cycles, 2),
                      "host_reads_per_cycle": round(reads.count / s["target_calls"], 2)}
        if "greedy" in name:
            rows[name]["greedy_equal_to_autoregressive"] = f"{same}/{len(prompts)}"
    return {"exit_layer": layer, "new_tokens": new, "prompts": len(prompts), "kinds": rows}


def step_costs(model, layer, device, sizes=(2, 4, 8, 16, 32, 64)):
    ids = random_prompts(model.config.vocab_size, 1, 1, device, 160, 160)[0]
    draft_s, full_s, verify_s, _ = step_times(TruncatedLlama(model, layer), ids, verify_sizes=sizes)
    return {"exit_layer": layer, "full_step_ms": round(1e3 * full_s, 3), "c": round(draft_s / full_s, 3),
            "v": {k: round(verify_s[k] / full_s, 3) for k in sizes}}


def graphs(model, prompts, layer, new, device):
    result = compile_comparison(model, prompts, layer, 4, new, device)
    return {"ok": all(v.split("/")[0] == v.split("/")[1] for k, v in result["equal_to_eager"].items()
                      if "static" in k and "compiled" not in k), **result}


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
    if "exact_float32" not in args.skip:
        ok &= check("exact_float32", exact_float32, device)
    for shape in shapes:
        if not fits(shape, device, dtype):
            print(json.dumps({"check": f"{shape}", "ok": True, "skipped": "does not fit in half the free memory"}))
            continue
        model = random_model(shape, device, dtype, seed=0)
        n = model.config.num_hidden_layers
        layer = max(1, n // 4)
        prompts = random_prompts(model.config.vocab_size, args.prompts, 7, device, 64, 128)
        runs = {"decode": (decode, model, prompts, layer, args.new_tokens, device),
                "step_costs": (step_costs, model, layer, device),
                "prefill_memory": (prefill_memory, model, args.prefill, device),
                "train_step": (train_step, model, layer, device),
                "graphs": (graphs, model, prompts[:1], layer, args.new_tokens, device)}
        for name, (fn, *fn_args) in runs.items():
            if name not in args.skip and not (name == "graphs" and shape != shapes[0]):  # compiling: minutes
                with fused_attention_only(device, name in FUSED_ONLY):
                    ok &= check(f"{name}:{shape}:{args.dtype}", fn, *fn_args)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run_command("gpu_smoke.py", sys.argv[1:], lambda stop: main(sys.argv[1:])))
