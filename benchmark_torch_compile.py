"""Speed, measured side by side in one process: our loops vs transformers' generate, against two rooflines.

    python benchmark_torch_compile.py                       # SmolLM2, 8 ShareGPT prompts x 128 tokens, greedy
    python benchmark_torch_compile.py --dtype auto float32  # both dtypes, one after the other, in one run
    python benchmark_torch_compile.py --check_layers 8 15 22 --check_gammas 2 4 8   # + losslessness grid
    python benchmark_torch_compile.py --compile             # + the static step, eager and under torch.compile
    python benchmark_torch_compile.py --random_weights --shape llama-3.1-8b --device cuda --dtype bfloat16  # a GPU
    python benchmark_torch_compile.py --train_step --exit_layer 15 --batch_size 8 --seq_len 256   # a training step
    python benchmark_torch_compile.py --versus /tmp/before --num_prompts 6 --max_new_tokens 64   # against a checkout

For each dtype it prints, all measured in the same run:
  machine      CPU model and flags (or GPU), threads, dtype
  rooflines    physical: weight bytes read per token / the memory's read rate (a sum over a tensor far larger than
               the caches); products: the model's matrix products alone, in sequence, one token, each in the lean
               engine's form (and through F.linear for reference), their read rate as a fraction of the memory's,
               and k rows of them over one (k = 2, 5, 9, 17)
  steps        a full step of 1 token and of 2/5/9/17 tokens (verify) over 1, v(k), and the draft's cost c at L8
               (draft step / full step), for transformers' layers (hf, "before") and the lean engine ("after")
  speed        for each (L, gamma), on the same prompts and in turns (each method once per prompt, round-robin, so
               slow drifts of the machine hit every method alike):
                 hf_generate    model.generate(do_sample=False)                          (the reference)
                 ours_ar        autoregressive_generate                                  (our KV-cached loop)
                 hf_early_exit  generate(assistant_early_exit=L, num_assistant_tokens=gamma, schedule "constant")
                 ours_spec      speculative_generate(gamma=gamma) with the untrained exit at L
               tokens/s, the ratios, each method's fraction of both rooflines, and whether greedy outputs equal
               generate's. transformers' methods run on their own pristine copy of the model (the lean engine lays
               our copy's weights out anew).
With --random_weights it downloads and reads nothing: a random model of the named --shape (SHAPES) is made on the
device in the dtype, and the prompts are random token ids (timing only: the exits' acceptance means nothing).
With --exits K.. it times a step of K exits trained together on one base pass against K separate runs.
With --versus DIR it times instead our loops (VERSUS_RUNS) in this checkout and in DIR, each in its own process,
generation by generation in turns: whether a change made decoding slower, and whether it changed any token.
With --train_step it times instead one `train.py --train head` step (distill.distill_forward, backward, AdamW)
against a plain forward of the base model on the same random batch, side by side, and prints their ratio.
Wall-clock figures are reported, never asserted.
"""
import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import decode_engine
from cli import DEVICE_CHOICES, Parser, UsageError, resolve_device, run_command, timed
from generate import autoregressive_generate, plan, speculative_generate, step_times
from truncated_llama import (DEFAULT_MODEL, DTYPE_CHOICES, ModelLoadError, TruncatedLlama, dtype_line,
                             load_base_model, machine_info, resolve_dtype)


def sharegpt_prompts(tok, n, seed, max_prompt_tokens=256):
    from share_gpt_dataset import evaluation_prompts, load_splits

    return [p["input_ids"] for p in evaluation_prompts(tok, load_splits()["test"], n,
                                                       max_prompt_tokens=max_prompt_tokens, seed=seed)]


_LLAMA3 = dict(rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=128000,
               eos_token_id=128001, vocab_size=128256, num_attention_heads=32, num_key_value_heads=8)

# Named model shapes for --random_weights (LlamaConfig keywords): the real models' configs, without their weights.
SHAPES = {
    "tiny": dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=1024),
    "smollm2-135m": dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2),
    "llama-3.2-1b": dict(_LLAMA3, num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, head_dim=64,
                         tie_word_embeddings=True,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
    "llama-3.1-8b": dict(_LLAMA3, num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, head_dim=128,
                         tie_word_embeddings=False,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
}


def random_model(shape: str, device, dtype, seed=0) -> LlamaForCausalLM:
    """A LlamaForCausalLM of a named shape (SHAPES) with random weights (seeded: the same on every call on one
    device), for timing only: nothing is downloaded. It is made on `device` in `dtype` at once (no float32 copy on
    the CPU first: an 8B model in bfloat16 takes 16 GB of the GPU, never 48 GB anywhere); the rotary tables stay
    float32, as transformers makes them."""
    if shape not in SHAPES:
        raise UsageError(f"--shape: expected one of {', '.join(SHAPES)}, got {shape!r}.")
    device = torch.device(device)
    config = LlamaConfig(**SHAPES[shape], attn_implementation="sdpa")  # a fresh config: from_config writes its dtype
    config._name_or_path = shape
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), device:  # the caller's random state is left as it was
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def random_prompts(vocab_size, n, seed, device, shortest=64, longest=256):
    """n prompts of random token ids, lengths drawn in shortest..longest (ShareGPT's span); drawn on the CPU from
    `seed`, so every device gets the same prompts."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shortest, longest + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab_size, (1, t), generator=g).to(device) for t in lengths]


def default_layer(num_layers):
    """The default exit layer to time: two thirds of the depth (20 of SmolLM2's 30 layers)."""
    return min(max(1, round(2 * num_layers / 3)), num_layers - 1)


def exit_layers(args, num_layers):
    """--layers (default: default_layer) for an N-layer model, after checking them and --check_layers: a layer
    outside 1..N-1 is a UsageError, one sentence naming the flag and the range."""
    layers = args.layers if args.layers is not None else [default_layer(num_layers)]
    for flag, values in (("--layers", layers), ("--check_layers", args.check_layers)):
        for layer in values:
            if not 1 <= layer <= num_layers - 1:
                raise UsageError(f"{flag}: layer {layer} is outside 1..{num_layers - 1} for this {num_layers}-layer "
                                 "model.")
    return layers


def subject(args, dtype, device):
    """(model, prompts, a line saying what they are): the real --model and ShareGPT prompts, or with
    --random_weights a random model of --shape and random prompts (nothing downloaded, nothing read)."""
    if not args.random_weights:
        model, tok = load_base_model(args.model, dtype=dtype, device=device)
        prompts = [p.to(device) for p in sharegpt_prompts(tok, args.num_prompts, args.seed)]
        return model, prompts, f"{args.model}: {len(prompts)} ShareGPT prompts"
    model = random_model(args.shape, device, dtype, seed=args.seed)
    prompts = random_prompts(model.config.vocab_size, args.num_prompts, args.seed, device)
    return model, prompts, f"random {args.shape} weights: {len(prompts)} random prompts"


# ----------------------------------------------------------------------------------------------------------------
# Rooflines


def weight_bytes_per_token(model):
    """Bytes of weights a decode step reads: every parameter once (an untied embedding only gives one row)."""
    embed = model.model.embed_tokens.weight
    tied = embed.data_ptr() == model.lm_head.weight.data_ptr()
    params = {p.data_ptr(): p for p in model.parameters() if tied or p is not embed}
    return sum(p.numel() * p.element_size() for p in params.values())


def memory_read_rate(device, nbytes=2 << 30, repeats=5):
    """Bytes/s of a sum over a tensor far larger than the caches (the memory's read rate, as a step would see it)."""
    x = torch.ones(nbytes // 4, device=device)
    best = min(timed(x.sum, device)[1] for _ in range(repeats))
    return nbytes / best


@torch.inference_mode()
def products_time(model, device, rows=1, repeats=5):
    """Seconds for one step's matrix products alone on `rows` rows, in sequence (all layers' q/k/v, o, gate/up, down
    and the LM head): in the lean engine's chosen forms, and through F.linear on the same weights."""
    engine = decode_engine.engine_for(model)
    products = [p for b in engine.blocks for p in (b.qkv, b.o, b.gate_up, b.down)] + [engine.head]
    x = {p: torch.randn(rows, p.weight.shape[0 if p.storage == "t" else 1], device=device).to(p.weight.dtype)
         for p in products}
    linear = [(x[p], p.weight.t() if p.storage == "t" else p.weight) for p in products]

    def ours():
        for p in products:
            p(x[p])

    def plain():
        for xi, w in linear:
            torch.nn.functional.linear(xi, w)

    ours(), plain()
    best = {"ours": float("inf"), "plain": float("inf")}
    for _ in range(repeats):  # in turns, so that a slow moment of the machine hits both
        best["ours"] = min(best["ours"], timed(ours, device)[1])
        best["plain"] = min(best["plain"], timed(plain, device)[1])
    return best["ours"], best["plain"]


VERIFY_ROWS = (2, 5, 9, 17)  # v(k) is read at these: a chain of 1, 4, 8 and 16 drafts


def rooflines(model, device):
    """Two rooflines and where we stand: the weights' bytes over the memory's read rate (physical), and one step's
    products alone (ours and F.linear's), their read rate as a fraction of the memory's, and what k rows of products
    cost over one (the products' part of v(k); 1.0 while the weights' reading binds, more once the arithmetic does)."""
    nbytes = weight_bytes_per_token(model)
    rate = memory_read_rate(device)
    ours_s, linear_s = products_time(model, device)
    k_rows = {k: products_time(model, device, rows=k) for k in VERIFY_ROWS}
    return {"weight_mb_per_token": round(nbytes / 1e6, 1), "memory_read_gb_s": round(rate / 1e9, 1),
            "physical_tok_s": round(rate / nbytes, 1),
            "products_ms": round(1e3 * ours_s, 2), "products_gb_s": round(nbytes / ours_s / 1e9, 1),
            "products_fraction_of_read_rate": round(nbytes / ours_s / rate, 2),
            "products_tok_s": round(1 / ours_s, 1), "products_f_linear_ms": round(1e3 * linear_s, 2),
            "products_k_over_1": {k: round(t / ours_s, 2) for k, (t, _) in k_rows.items()},
            "products_f_linear_k_over_1": {k: round(t / linear_s, 2) for k, (_, t) in k_rows.items()}}


# ----------------------------------------------------------------------------------------------------------------
# Step costs


@torch.inference_mode()
def step_costs(models, prompt, draft_layer=8, sizes=VERIFY_ROWS, rounds=7):
    """Per engine ({engine: model}): a one-token full step (ms), k-token full steps over it, and c = draft step /
    full step at `draft_layer`, from evaluate.step_times (medians of warm calls, kinds interleaved)."""
    out = {}
    for engine, model in models.items():
        draft, one, k_steps, _ = step_times(TruncatedLlama(model, draft_layer, engine=engine), prompt, sizes,
                                            rounds)
        out[engine] = {"full_1_ms": round(1e3 * one, 2), **{f"full_{k}_over_1": round(t / one, 2)
                                                            for k, t in k_steps.items()},
                       f"c_L{draft_layer}": round(draft / one, 3)}
    return out


# ----------------------------------------------------------------------------------------------------------------
# Our loops against transformers'


def methods_for(model, ref, layer, gamma, new):
    tl = TruncatedLlama(model, layer)

    def hf_generate(ids):
        return ref.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)[0, ids.shape[1]:]

    def hf_early_exit(ids):
        return ref.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                            assistant_early_exit=layer, num_assistant_tokens=gamma,
                            num_assistant_tokens_schedule="constant")[0, ids.shape[1]:]

    return {
        "hf_generate": hf_generate,
        "ours_ar": lambda ids: autoregressive_generate(tl, ids, new)[0],
        "hf_early_exit": hf_early_exit,
        "ours_spec": lambda ids: speculative_generate(tl, ids, new, **plan(gamma=gamma))[0],
    }


@torch.inference_mode()
def compare(model, ref, prompts, layer, gamma, new, device, roof):
    methods = methods_for(model, ref, layer, gamma, new)
    for fn in methods.values():  # warm-up
        fn(prompts[0][:, :16])
    seconds = {k: 0.0 for k in methods}
    tokens = {k: 0 for k in methods}
    outputs = {k: [] for k in methods}
    for ids in prompts:
        for name, fn in methods.items():
            out, s = timed(lambda: fn(ids), device)
            seconds[name] += s
            tokens[name] += len(out)
            outputs[name].append(out.cpu())
    tps = {k: tokens[k] / seconds[k] for k in methods}
    ref_out = outputs["hf_generate"]
    same = {k: f"{sum(torch.equal(a, b) for a, b in zip(outputs[k], ref_out))}/{len(prompts)}" for k in methods}
    spec_same = sum(torch.equal(a, b) for a, b in zip(outputs["ours_spec"], outputs["ours_ar"]))
    return {"exit_layer": layer, "gamma": gamma, "tokens_per_s": {k: round(v, 2) for k, v in tps.items()},
            "ours_ar_vs_hf_generate": round(tps["ours_ar"] / tps["hf_generate"], 3),
            "ours_spec_vs_hf_early_exit": round(tps["ours_spec"] / tps["hf_early_exit"], 3),
            "ours_spec_vs_ours_ar": round(tps["ours_spec"] / tps["ours_ar"], 3),
            "fraction_of_physical_roofline": {k: round(v / roof["physical_tok_s"], 3) for k, v in tps.items()},
            "fraction_of_products_roofline": {k: round(v / roof["products_tok_s"], 3) for k, v in tps.items()},
            "greedy_equal_to_hf_generate": same, "ours_spec_equal_to_ours_ar": f"{spec_same}/{len(prompts)}"}


@torch.inference_mode()
def lookup_peer(model, ref, prompts, k, new, temperature, device, top_p=0.95):
    """Prompt lookup, ours against transformers': our lookup draft (speculative_generate(draft="lookup", gamma=k))
    over our autoregressive loop, and generate(prompt_lookup_num_tokens=k) over plain generate, at one policy
    (greedy, or temperature with top_p and no top-k), timed prompt by prompt in turns. One row: both ratios."""
    tl = TruncatedLlama(model, 1)
    policy = dict(temperature=temperature, top_p=top_p if temperature else 1.0)
    sample = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature else \
        dict(do_sample=False)
    g = lambda i: torch.Generator(device).manual_seed(i)
    methods = {
        "hf_generate": lambda ids, i: ref.generate(ids, max_new_tokens=new, min_new_tokens=new, **sample),
        "hf_lookup": lambda ids, i: ref.generate(ids, max_new_tokens=new, min_new_tokens=new,
                                                 prompt_lookup_num_tokens=k, **sample),
        "ours_ar": lambda ids, i: autoregressive_generate(tl, ids, new, generator=g(i), **policy)[0],
        "ours_lookup": lambda ids, i: speculative_generate(tl, ids, new, **plan(gamma=k, draft="lookup", **policy),
                                                           generator=g(i))[0],
    }
    for fn in methods.values():  # warm-up
        fn(prompts[0][:, :16], 0)
    seconds, tokens = dict.fromkeys(methods, 0.0), dict.fromkeys(methods, 0)
    for i, ids in enumerate(prompts):
        for name, fn in methods.items():
            torch.manual_seed(i)  # generate's sampling
            out, s = timed(lambda: fn(ids, i), device)
            seconds[name] += s
            tokens[name] += out.shape[-1] - (ids.shape[1] if name.startswith("hf") else 0)
    tps = {m: tokens[m] / seconds[m] for m in methods}
    return {"lookup_tokens": k, "temperature": temperature, "top_p": policy["top_p"], "prompts": len(prompts),
            "new_tokens": new, "tokens_per_s": {m: round(v, 2) for m, v in tps.items()},
            "ours_lookup_vs_ours_ar": round(tps["ours_lookup"] / tps["ours_ar"], 3),
            "hf_lookup_vs_hf_generate": round(tps["hf_lookup"] / tps["hf_generate"], 3)}


@torch.inference_mode()
def check_lossless(model, prompts, layers, gammas, new):
    """Greedy self-speculation must reproduce the autoregressive tokens exactly, for every (L, gamma)."""
    rows = []
    for layer in layers:
        tl = TruncatedLlama(model, layer)
        base = [autoregressive_generate(tl, ids, new)[0] for ids in prompts]
        for gamma in gammas:
            runs = [speculative_generate(tl, ids, new, **plan(gamma=gamma)) for ids in prompts]
            same = sum(torch.equal(t, b) for (t, _), b in zip(runs, base))
            acc = statistics.fmean(s["avg_accepted"] for _, s in runs)
            rows.append({"exit_layer": layer, "gamma": gamma, "identical_prompts": f"{same}/{len(prompts)}",
                         "avg_accepted": round(acc, 3)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def static_variants(model, layer, device, compiled=True):
    """Our loops three ways on one base: the default lean step ("eager"), the static step run eagerly ("static":
    positions as a device tensor, attention over the whole capacity) and the static step under torch.compile
    ("compiled": mode reduce-overhead on CUDA, which captures a CUDA graph per row count; the default mode on a CPU).
    Returns {variant: TruncatedLlama} (without "compiled" when `compiled` is False)."""
    variants = {}
    for name, compile in (("eager", None), ("static", False),
                          ("compiled", "reduce-overhead" if torch.device(device).type == "cuda" else True))[
                             : 3 if compiled else 2]:
        tl = TruncatedLlama(model, layer)
        if compile is not None:
            tl.steps.use_static(compile=compile)
        variants[name] = tl
    return variants


@torch.inference_mode()
def prefill_peak(model, tokens: int, device: torch.device, logits: bool) -> dict:
    """The peak memory of a `tokens`-token prefill (TruncatedLlama.full_step from position 0 on random ids) beyond
    the model and the cache it fills, with the logits or the layers only: on a GPU the allocator's peak, on a CPU
    (Linux) the process's peak RSS, reset first through /proc/self/clear_refs."""
    tl = TruncatedLlama(model, 1)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    cache = tl.new_cache(tokens + 16)
    rss = lambda key: int(next(x for x in open("/proc/self/status") if x.startswith(key)).split()[1]) * 1024
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak RSS (VmHWM) is now the current RSS
        base = rss("VmRSS:")
    t = time.perf_counter()
    out = tl.full_step(ids[:, :-1], cache, 0, logits=logits)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss("VmHWM:")) - base
    return {"prefill_tokens": tokens - 1, "logits": logits, "peak_gib": round(peak / 2**30, 3),
            "seconds": round(seconds, 1), "dtype": str(model.dtype).removeprefix("torch."),
            "logits_gib": None if out is None else round(out.numel() * out.element_size() / 2**30, 3)}


def compiles() -> int:
    """Graphs dynamo has compiled in this process so far (first compilations and recompilations alike; counted where
    every graph is made, fullgraph=True included, unlike counters["frames"])."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


class RecompiledInside(RuntimeError):
    """torch.compile compiled inside a timed region: the timing would include compilation."""


class NoCompileInside:
    """A timed region that fails (RecompiledInside) when dynamo compiles anything inside it."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        self.before = compiles()
        return self

    def __exit__(self, *exc):
        if exc[0] is None and compiles() != self.before:
            raise RecompiledInside(f"{self.what}: torch.compile compiled {compiles() - self.before} graph(s) inside "
                                   "the timed region; warm every row count first (warm_rows)")


@torch.inference_mode()
def warm_rows(tl, prompts, new, gamma):
    """Every step shape a generation of `new` tokens with drafts of up to `gamma` can call, run once per cache
    capacity the prompts get (generate._prefill's rule): row counts 1..gamma+1, with and without the exit's blocks,
    each a draft step (extend) and a verify; so that no static graph is compiled (or captured) while timed."""
    from generate import _prefill
    seen = set()
    for ids in prompts:
        cache, n, last = _prefill(tl, ids, with_exit=True, room=new, drafts=gamma + 1)
        if cache.capacity in seen:
            continue
        seen.add(cache.capacity)
        for rows in range(1, gamma + 2):
            for with_exit in (True, False):
                h, e = tl.extend(last.expand(1, rows), cache, n, with_exit=with_exit)
                if e is not None:
                    tl.steps.exit_logits(e)
                tl.verify(h, cache, n)
                cache.crop(n)


@torch.inference_mode()
def compile_comparison(model, prompts, layer, gamma, new, device, compiled=True):
    """Our loops (autoregressive, speculative with the untrained exit at `layer`) on the default step, the static
    step and the compiled static step (static_variants), prompts in turns; compilation's time reported apart (every
    row count warmed first, warm_rows), a compilation inside a timed region an error (NoCompileInside), and whether
    each variant's greedy output equals the default step's."""
    variants = static_variants(model, layer, device, compiled)
    run = {"ours_ar": lambda tl, ids: autoregressive_generate(tl, ids, new)[0],
           "ours_spec": lambda tl, ids: speculative_generate(tl, ids, new, **plan(gamma=gamma))[0]}
    t = time.perf_counter()
    before = compiles()
    for tl in variants.values():  # warm-up, and compilation: every row count at every prompt's cache capacity
        warm_rows(tl, prompts, new, gamma)
        for fn in run.values():
            fn(tl, prompts[0])
    result = {"compile_and_warm_up_s": round(time.perf_counter() - t, 1), "graphs_compiled": compiles() - before}
    keys = [f"{name}_{v}" for name in run for v in variants]
    seconds, tokens, same = dict.fromkeys(keys, 0.0), dict.fromkeys(keys, 0), dict.fromkeys(keys, 0)
    for ids in prompts:
        for name, fn in run.items():
            outs = {}
            for v, tl in variants.items():
                with NoCompileInside(f"{name}, {v}, a {ids.shape[1]}-token prompt"):
                    outs[v], s = timed(lambda: fn(tl, ids), device)
                seconds[f"{name}_{v}"] += s
                tokens[f"{name}_{v}"] += len(outs[v])
                same[f"{name}_{v}"] += torch.equal(outs[v].cpu(), outs["eager"].cpu())
    result.update({f"{k}_tok_s": round(tokens[k] / seconds[k], 2) for k in keys})
    for name in run:
        for v in [v for v in variants if v != "eager"]:
            result[f"{name}_{v}_vs_eager"] = round(result[f"{name}_{v}_tok_s"] / result[f"{name}_eager_tok_s"], 3)
    result["equal_to_eager"] = {k: f"{same[k]}/{len(prompts)}" for k in keys if not k.endswith("eager")}
    return result


# ----------------------------------------------------------------------------------------------------------------
# This checkout against another one (--versus DIR): "is it slower than before?" measured side by side

# Run in each checkout's directory (its own generate.py, truncated_llama.py): loads the model once, then times one
# generation per request line {"ids", "new", "layer", "kw" (None: autoregressive)}; answers seconds and tokens.
VERSUS_WORKER = r"""
import json, sys, time, torch
sys.path.insert(0, ".")
from generate import autoregressive_generate, speculative_generate
try:  # a checkout from before Drafting (2026-12-07) takes the settings flat
    from generate import plan
except ImportError:
    plan = lambda **kw: kw
from truncated_llama import TruncatedLlama, load_base_model, resolve_dtype
setup = json.loads(sys.argv[1])
torch.set_num_threads(setup["threads"])
model, _ = load_base_model(setup["model"], dtype=resolve_dtype(setup["dtype"])[0])
steps = {}
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    tl = steps.setdefault(job["layer"], TruncatedLlama(model, job["layer"]))
    ids, kw = torch.tensor([job["ids"]]), job["kw"]
    t = time.perf_counter()
    if kw is None:
        out, _ = autoregressive_generate(tl, ids, job["new"])
    else:
        seed = kw.pop("seed", None)
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        out, _ = speculative_generate(tl, ids, job["new"], generator=gen, **plan(**kw))
    print(json.dumps({"seconds": time.perf_counter() - t, "tokens": out.tolist()}), flush=True)
"""

VERSUS_RUNS = {  # name -> (exit layer, speculative_generate's arguments or None for autoregressive decoding)
    "autoregressive": (8, None), "exit_L8_g4": (8, dict(gamma=4)), "exit_L3_g1": (3, dict(gamma=1)),
    "exit_L3_T0.7_g2": (3, dict(gamma=2, temperature=0.7, top_p=0.95, seed=0)),
    "tree_L3_2x2": (3, dict(gamma=2, tree_width=2)), "lookup_g4": (8, dict(gamma=4, draft="lookup"))}


def versus(args, prompts, dtype_name, num_layers, rounds=2):
    """Our loops in this checkout and in `args.versus` (another checkout, e.g. a git worktree of the last release),
    each in its own process on the CPU, every generation run by one then the other, the order alternating, `rounds`
    times over the prompts: tokens/s of each, their ratio, and how many generations gave identical tokens. Exit
    layers past the model's depth are taken at its last layer but one."""
    import subprocess
    setup = json.dumps({"model": args.model, "dtype": dtype_name, "threads": torch.get_num_threads()})
    here = str(Path(__file__).resolve().parent)
    sides = {side: subprocess.Popen([sys.executable, "-c", VERSUS_WORKER, setup], cwd=where, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
             for side, where in (("this", here), ("versus", args.versus))}
    try:
        for side, p in sides.items():
            if p.stdout.readline().strip() != "ready":
                raise UsageError(f"--versus: the worker in {args.versus if side == 'versus' else here} did not start "
                                 "(is it a checkout of this repository?).")

        def ask(side, ids, name):
            layer, kw = VERSUS_RUNS[name]
            layer, p = min(layer, num_layers - 1), sides[side]
            p.stdin.write(json.dumps({"ids": ids, "new": args.max_new_tokens, "layer": layer, "kw": kw}) + "\n")
            p.stdin.flush()
            return json.loads(p.stdout.readline())

        for name in VERSUS_RUNS:  # warm-up
            for side in sides:
                ask(side, prompts[0][0, :16].tolist(), name)
        seconds, tokens, same = {}, {}, dict.fromkeys(VERSUS_RUNS, 0)
        for r in range(rounds):
            for i, ids in enumerate(prompts):
                for name in VERSUS_RUNS:
                    answers = {side: ask(side, ids[0].tolist(), name)
                               for side in (("this", "versus") if (i + r) % 2 == 0 else ("versus", "this"))}
                    for side, a in answers.items():
                        seconds[side, name] = seconds.get((side, name), 0.0) + a["seconds"]
                        tokens[side, name] = tokens.get((side, name), 0) + len(a["tokens"])
                    same[name] += answers["this"]["tokens"] == answers["versus"]["tokens"]
    finally:
        for p in sides.values():
            p.kill()
    rows = {}
    for name in VERSUS_RUNS:
        this, other = (tokens[s, name] / seconds[s, name] for s in ("this", "versus"))
        rows[name] = {"this_tok_s": round(this, 2), "versus_tok_s": round(other, 2), "this_vs": round(this / other, 3),
                      "identical": f"{same[name]}/{rounds * len(prompts)}"}
    return {"versus": args.versus, "rounds": rounds, "prompts": len(prompts), "new_tokens": args.max_new_tokens,
            "runs": rows}


# ----------------------------------------------------------------------------------------------------------------
# A training step


def train_step_cost(args, repeats=5):
    """Print the time of a plain forward of the base model and of one --train head step on one batch of
    --batch_size x --seq_len random tokens (every position a target), and their ratio (with --draft_vocab K, of a
    pruned head of K rows). Returns the ratio."""
    from cli import UsageError, check_context
    from distill import ExitForward, distill_forward
    from train import set_trainable
    from tuned_llama import EarlyExit
    torch.manual_seed(args.seed)
    device = args.device
    base, _ = load_base_model(args.model, dtype=resolve_dtype(args.dtype[0], device)[0], device=device)
    if not 1 <= args.exit_layer <= len(base.model.layers) - 1:
        raise UsageError(f"--exit_layer must be in 1..{len(base.model.layers) - 1}, got {args.exit_layer}.")
    check_context(base.config, "--seq_len", args.seq_len)
    if not 0 <= args.draft_vocab <= base.lm_head.out_features:
        raise UsageError(f"--draft_vocab must be 0 (the full vocabulary) or in 1..{base.lm_head.out_features}, "
                         f"got {args.draft_vocab}.")
    vocab = torch.arange(args.draft_vocab) if args.draft_vocab else None  # any K tokens: the cost is the same
    exit = set_trainable(EarlyExit(base, args.exit_layer, vocab=vocab).to(base.device), ["head"])
    model = TruncatedLlama(base, args.exit_layer, exit, engine="hf")
    ef = ExitForward(exit)
    ids = torch.randint(0, base.config.vocab_size, (args.batch_size, args.seq_len), device=base.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}
    optimizer = torch.optim.AdamW([exit.head.weight], lr=1e-5, fused=base.device.type in ("cpu", "cuda"))

    def forward():
        with torch.no_grad():
            base(input_ids=ids).logits

    def head_step():
        total, per_row, _ = distill_forward(model, ef, batch, loss={"kind": "kl"})
        (total / per_row.numel()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    forward(), head_step()  # warm-up
    pairs = [(timed(forward, device)[1], timed(head_step, device)[1]) for _ in range(repeats)]  # side by side
    ratios = sorted(th / tf for tf, th in pairs)
    tf, th = (sorted(x)[len(x) // 2] for x in zip(*pairs))
    ratio = ratios[len(ratios) // 2]
    print(f"batch {args.batch_size} x {args.seq_len}: plain forward {tf:.3f} s, --train head step {th:.3f} s, "
          f"ratio {ratio:.2f} (median of {repeats} side-by-side pairs; range {ratios[0]:.2f}-{ratios[-1]:.2f})")
    return ratio


def exits_step_cost(args, repeats=3):
    """For each K in --exits: one training step of K exits (head, norm and a next-block adapter trained, as
    `make report` trains them) fed by one shared pass of the frozen base, against K separate steps that each run the
    base themselves (what K separate train.py runs pay), timed side by side on one batch of --batch_size x --seq_len
    random tokens. Prints a line per K and returns {K: (together s, separate s)}."""
    from distill import ExitForward, distill_forward
    from train import set_trainable
    from tuned_llama import EarlyExit
    torch.manual_seed(args.seed)
    device = args.device
    base, _ = load_base_model(args.model, dtype=resolve_dtype(args.dtype[0], device)[0], device=device)
    n = len(base.model.layers)
    vocab = torch.arange(args.draft_vocab) if args.draft_vocab else None
    ids = torch.randint(0, base.config.vocab_size, (args.batch_size, args.seq_len), device=base.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}
    results = {}
    for k in args.exits:
        layers = sorted({round(2 + i * (n - 4) / max(k - 1, 1)) for i in range(k)})  # spread over the depth
        exits = [set_trainable(EarlyExit(base, L, adapter="block", adapter_init="next", vocab=vocab).to(device).float(),
                               ["head", "norm", "adapter"]) for L in layers]
        models = [TruncatedLlama(base, L, e, engine="hf") for L, e in zip(layers, exits)]
        forwards = [ExitForward(e) for e in exits]
        optimizers = [torch.optim.AdamW([p for p in e.parameters() if p.requires_grad], lr=1e-5) for e in exits]

        def update(i, total):
            total.backward()
            optimizers[i].step()
            optimizers[i].zero_grad(set_to_none=True)

        def together():
            p = models[-1].base_pass(ids, batch["attention_mask"], all_hidden_states=True)
            for i, m in enumerate(models):
                total, rows, _ = distill_forward(m, forwards[i], batch, loss={"kind": "kl"},
                                                 states=(p.hidden_states[m.shared_layers], p.final))
                update(i, total / rows.numel())

        def separate():
            for i, m in enumerate(models):
                total, rows, _ = distill_forward(m, forwards[i], batch, loss={"kind": "kl"})
                update(i, total / rows.numel())

        together(), separate()  # warm-up
        pairs = [(timed(together, device)[1], timed(separate, device)[1]) for _ in range(repeats)]
        t, sep = (sorted(x)[len(x) // 2] for x in zip(*pairs))
        results[k] = (t, sep)
        print(f"{k} exit(s) at layers {', '.join(map(str, layers))}: one shared base pass {t:.2f} s a step, "
              f"{k} separate runs {sep:.2f} s ({sep / t:.2f}x; median of {repeats} side-by-side pairs, batch "
              f"{args.batch_size} x {args.seq_len}, {torch.get_num_threads()} threads)", flush=True)
    return results


def main(argv=None):
    ap = Parser(prog="benchmark_torch_compile.py", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--layers", type=int, nargs="*", default=None,
                    help="exit layers to time, each in 1..N-1 (default: two thirds of the depth, 20 of 30; the flag "
                         "with no value: skip)")
    ap.add_argument("--gammas", type=int, nargs="+", default=[4], help="draft lengths to time (default 4)")
    ap.add_argument("--num_prompts", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check_layers", type=int, nargs="*", default=[], help="also check greedy losslessness here")
    ap.add_argument("--check_gammas", type=int, nargs="*", default=[2, 4, 8])
    ap.add_argument("--compile", nargs="?", const="all", choices=("all", "static"),
                    help="also time the static step, eagerly and under torch.compile (all), or eagerly only "
                         "(static), against the default step")
    ap.add_argument("--lookup_peer", type=int, default=0, metavar="K",
                    help="also time prompt lookup of K tokens, ours against transformers' (0: skip)")
    ap.add_argument("--lookup_temperatures", type=float, nargs="+", default=[0.0, 0.7],
                    help="the policies of --lookup_peer (0: greedy; else top_p 0.95)")
    ap.add_argument("--no_steps", action="store_true", help="skip the step-cost table")
    ap.add_argument("--versus", metavar="DIR",
                    help="instead: time our loops in this checkout against the checkout in DIR (e.g. `git worktree "
                         "add /tmp/before main`), side by side on the same prompts, and exit")
    ap.add_argument("--random_weights", action="store_true",
                    help="a random model of --shape and random prompts: nothing downloaded (timing only)")
    ap.add_argument("--shape", choices=SHAPES, default=None,
                    help="--random_weights: the model's shape (default: --model's, when it is one of these)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                    help="auto (default): the GPU when there is one, else the CPU")
    ap.add_argument("--dtype", nargs="+", default=["auto"], choices=DTYPE_CHOICES,
                    help="one run per dtype, in this order (auto: bfloat16 where the hardware has it, else float32)")
    ap.add_argument("--out", help="also write the results as JSON here")
    ap.add_argument("--prefill_memory", type=int, metavar="TOKENS",
                    help="instead: the peak memory (RSS on a CPU, allocated on a GPU) of a TOKENS-token prefill of the "
                         "model, with its logits and with the layers only (as generate runs it), and exit")
    g = ap.add_argument_group("--train_step: a training step against a plain forward")
    g.add_argument("--train_step", action="store_true",
                   help="time one train.py --train head step against a plain forward on one batch, print the ratio, "
                        "and exit")
    g.add_argument("--exit_layer", type=int, default=15)
    g.add_argument("--batch_size", type=int, default=8)
    g.add_argument("--seq_len", type=int, default=256)
    g.add_argument("--draft_vocab", type=int, default=0, help="a pruned head of this many rows (0: the full one)")
    g.add_argument("--exits", type=int, nargs="+", metavar="K",
                   help="instead: time a step of K exits trained together (train.py --exit_layers) against K separate "
                        "runs, for each K, and exit")
    args = ap.parse_args(argv)
    args.device = resolve_device(args.device)
    if args.exits:
        return exits_step_cost(args)
    if args.train_step:
        return train_step_cost(args)
    if args.versus and not (Path(args.versus) / "generate.py").is_file():
        raise UsageError(f"--versus: {args.versus} is not a checkout of this repository (no generate.py in it).")
    if args.shape and not args.random_weights:
        raise UsageError("--shape: only --random_weights uses it; add --random_weights, or leave --shape out.")
    if args.random_weights:
        args.shape = args.shape or (args.model if args.model in SHAPES else None)
        if args.shape is None:
            raise UsageError(f"--random_weights: give --shape (one of {', '.join(SHAPES)}) for --model "
                             f"{args.model!r}.")
        exit_layers(args, SHAPES[args.shape]["num_hidden_layers"])  # checked before anything is made
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.prefill_memory:
        dtype = resolve_dtype(args.dtype[0], device)[0]
        model = random_model(args.shape, device, dtype) if args.random_weights else load_base_model(args.model,
                                                                                                    dtype=dtype)[0]
        for logits in (True, False):
            print(json.dumps(prefill_peak(model, args.prefill_memory, torch.device(device), logits)), flush=True)
        return 0
    report = []
    for dtype_arg in args.dtype:
        dtype, dtype_name = resolve_dtype(dtype_arg, device)
        if args.versus:
            model, tok = load_base_model(args.model)
            report.append(versus(args, sharegpt_prompts(tok, args.num_prompts, args.seed), dtype_name,
                                 model.config.num_hidden_layers))
            print(json.dumps(report[-1]), flush=True)
            continue
        model, prompts, what = subject(args, dtype, device)
        n = model.config.num_hidden_layers
        layers = exit_layers(args, n)
        ref = copy.deepcopy(model)  # transformers' methods run on a pristine copy (the lean engine re-lays ours)
        part = {"machine": {**machine_info(device), "dtype": dtype_name, "dtype_flag": dtype_arg}}
        print(f"{what} x {args.max_new_tokens} new tokens, greedy, {device.type}/{dtype_name}", flush=True)
        print(dtype_line(dtype_arg, dtype_name, part["machine"]), flush=True)
        part["rooflines"] = rooflines(model, device)
        print(json.dumps(part["rooflines"]), flush=True)
        print("engine:", TruncatedLlama(model, 1).describe_engine(), flush=True)
        if not args.no_steps:
            long = max(prompts, key=lambda p: p.shape[1])
            part["steps"] = step_costs({"hf": ref, "lean": model}, long, draft_layer=min(8, n - 1))
            print(json.dumps(part["steps"]), flush=True)
        part["speed"] = []
        for layer in layers:
            for gamma in args.gammas:
                row = compare(model, ref, prompts, layer, gamma, args.max_new_tokens, device, part["rooflines"])
                part["speed"].append(row)
                print(json.dumps(row), flush=True)
        if args.lookup_peer:
            part["lookup_peer"] = []
            for t in args.lookup_temperatures:
                row = lookup_peer(model, ref, prompts, args.lookup_peer, args.max_new_tokens, t, device)
                part["lookup_peer"].append(row)
                print(json.dumps(row), flush=True)
        if args.check_layers:
            part["lossless"] = check_lossless(model, prompts, args.check_layers, args.check_gammas,
                                              args.max_new_tokens)
        if args.compile:
            part["compile"] = compile_comparison(model, prompts, (layers or [default_layer(n)])[0], args.gammas[0],
                                                 args.max_new_tokens, device, compiled=args.compile == "all")
            print(json.dumps(part["compile"]), flush=True)
        report.append(part)
        del model, ref
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    sys.exit(0 if run_command("benchmark_torch_compile.py", sys.argv[1:], lambda stop: main(sys.argv[1:]),
                              errors=(ModelLoadError,)) else 1)
