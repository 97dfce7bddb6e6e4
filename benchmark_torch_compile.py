"""Speed, measured side by side in one process: our loops vs transformers' generate, eager vs torch.compile.

    python benchmark_torch_compile.py                       # SmolLM2, 8 ShareGPT prompts x 128 tokens, greedy
    python benchmark_torch_compile.py --check_layers 8 15 22 --check_gammas 2 4 8   # + losslessness grid
    python benchmark_torch_compile.py --compile             # + our loops with torch.compile'd decoder layers
    python benchmark_torch_compile.py --random_weights --device cuda --dtype bfloat16   # timing on a GPU

For each (L, gamma) it times, on the same prompts and in turns (each method once per prompt, round-robin, so slow
drifts of the machine hit every method alike):
  hf_generate      model.generate(do_sample=False)                                   (the reference)
  ours_ar          autoregressive_generate                                           (our KV-cached loop)
  hf_early_exit    model.generate(assistant_early_exit=L, num_assistant_tokens=gamma, schedule "constant")
  ours_spec        speculative_generate(gamma=gamma) with the untrained exit at L
and prints tokens/s and the ratios ours_ar / hf_generate and ours_spec / hf_early_exit. Greedy outputs are compared
too. Wall-clock figures are reported, never asserted.
"""
import argparse
import json
import statistics
import sys
import time

import torch

from evaluate import autoregressive_generate, speculative_generate
from truncated_llama import DEFAULT_MODEL, TruncatedLlama, load_base_model


def sharegpt_prompts(tok, n, seed, max_prompt_tokens=256):
    from share_gpt_dataset import evaluation_prompts, load_splits

    return [p["input_ids"] for p in evaluation_prompts(tok, load_splits()["test"], n,
                                                       max_prompt_tokens=max_prompt_tokens, seed=seed)]


def random_model(name, dtype, device):
    """A random-weight model with the config of `name` (timing only; acceptance is meaningless)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from truncated_llama import resolve_model_path

    cfg = AutoConfig.from_pretrained(resolve_model_path(name))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    tokens = fn()
    sync(device)
    return tokens, time.perf_counter() - t


def methods_for(model, layer, gamma, new):
    tl = TruncatedLlama(model, layer)

    def hf_generate(ids):
        return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)[0, ids.shape[1]:]

    def hf_early_exit(ids):
        return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              assistant_early_exit=layer, num_assistant_tokens=gamma,
                              num_assistant_tokens_schedule="constant")[0, ids.shape[1]:]

    return {
        "hf_generate": hf_generate,
        "ours_ar": lambda ids: autoregressive_generate(tl, ids, new)[0],
        "hf_early_exit": hf_early_exit,
        "ours_spec": lambda ids: speculative_generate(tl, ids, new, gamma=gamma)[0],
    }


@torch.inference_mode()
def compare(model, prompts, layer, gamma, new, device):
    methods = methods_for(model, layer, gamma, new)
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
    ref = outputs["hf_generate"]
    same = {k: all(torch.equal(a, b) for a, b in zip(outputs[k], ref)) for k in methods}
    return {"exit_layer": layer, "gamma": gamma, "tokens_per_s": {k: round(v, 2) for k, v in tps.items()},
            "ours_ar_vs_hf_generate": round(tps["ours_ar"] / tps["hf_generate"], 3),
            "ours_spec_vs_hf_early_exit": round(tps["ours_spec"] / tps["hf_early_exit"], 3),
            "ours_spec_vs_ours_ar": round(tps["ours_spec"] / tps["ours_ar"], 3),
            "greedy_equal_to_hf_generate": same}


@torch.inference_mode()
def check_lossless(model, prompts, layers, gammas, new):
    """Greedy self-speculation must reproduce the autoregressive tokens exactly, for every (L, gamma)."""
    rows = []
    for layer in layers:
        tl = TruncatedLlama(model, layer)
        base = [autoregressive_generate(tl, ids, new)[0] for ids in prompts]
        for gamma in gammas:
            runs = [speculative_generate(tl, ids, new, gamma=gamma) for ids in prompts]
            same = sum(torch.equal(t, b) for (t, _), b in zip(runs, base))
            acc = statistics.fmean(s["avg_accepted"] for _, s in runs)
            rows.append({"exit_layer": layer, "gamma": gamma, "identical_prompts": f"{same}/{len(prompts)}",
                         "avg_accepted": round(acc, 3)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


@torch.inference_mode()
def compile_comparison(model, prompts, layer, gamma, new, device):
    """Our loops with eager decoder layers vs torch.compile'd ones (dynamic shapes: the cache grows every step)."""
    tl = TruncatedLlama(model, layer)
    run = {"ours_ar": lambda ids: autoregressive_generate(tl, ids, new)[0],
           "ours_spec": lambda ids: speculative_generate(tl, ids, new, gamma=gamma)[0]}
    result = {}
    for label in ("eager", "compiled"):
        if label == "compiled":
            for layer_module in model.model.layers:
                layer_module.forward = torch.compile(layer_module.forward, dynamic=True)
        for name, fn in run.items():
            fn(prompts[0])  # warm-up (and compilation)
            tok, sec = 0, 0.0
            for ids in prompts:
                out, s = timed(lambda: fn(ids), device)
                tok, sec = tok + len(out), sec + s
            result[f"{name}_{label}"] = round(tok / sec, 2)
    for name in run:
        result[f"{name}_compiled_vs_eager"] = round(result[f"{name}_compiled"] / result[f"{name}_eager"], 3)
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--layers", type=int, nargs="*", default=[22], help="exit layers to time (default 22; none: skip)")
    ap.add_argument("--gammas", type=int, nargs="+", default=[4], help="draft lengths to time (default 4)")
    ap.add_argument("--num_prompts", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check_layers", type=int, nargs="*", default=[], help="also check greedy losslessness here")
    ap.add_argument("--check_gammas", type=int, nargs="*", default=[2, 4, 8])
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd decoder layers")
    ap.add_argument("--random_weights", action="store_true", help="random model of the same shape (GPU timing)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_base_model(args.model, dtype=dtype, device=args.device)
    if args.random_weights:
        model = random_model(args.model, dtype, device)
    prompts = [p.to(device) for p in sharegpt_prompts(tok, args.num_prompts, args.seed)]
    print(f"{args.model}: {len(prompts)} ShareGPT prompts x {args.max_new_tokens} new tokens, greedy, "
          f"{args.device}/{args.dtype}, torch threads {torch.get_num_threads()}", flush=True)
    report = {"speed": [], "lossless": [], "compile": None}
    for layer in args.layers:
        for gamma in args.gammas:
            row = compare(model, prompts, layer, gamma, args.max_new_tokens, device)
            report["speed"].append(row)
            print(json.dumps(row), flush=True)
    if args.check_layers:
        report["lossless"] = check_lossless(model, prompts, args.check_layers, args.check_gammas,
                                            args.max_new_tokens)
    if args.compile:
        report["compile"] = compile_comparison(model, prompts, args.layers[0], args.gammas[0],
                                               args.max_new_tokens, device)
        print(json.dumps(report["compile"]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
