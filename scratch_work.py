"""Playground: watch self-speculation on one prompt.

    python scratch_work.py "your prompt" --exit_layer 22 --gamma 4 [--temperature 0.7] [--exit_ckpt runs/L15]
    python scratch_work.py "..." --draft exit+lookup --exit_ckpt out/speedup/exit_L3 --gamma 1 --lookup_tokens 4
    python scratch_work.py "..." --device cuda --dtype bfloat16

Prints the reply with the drafted-and-accepted tokens marked by their source (the exit's green, prompt lookup's
blue, a tree node both proposed magenta; with --no_color [..], {..}, <..>) and the full model's own tokens plain,
then the number of drafts accepted in each cycle and the loop's stats. Without a prompt it takes one from ShareGPT.
The model, the prompt and the sampling generators all live on --device (generate.py refuses a CPU generator next to
GPU tensors).
"""
import argparse
import json
import sys

import torch

from cli import DEVICE_CHOICES, DataError, Parser, UsageError, resolve_device
from drafts import SOURCES
from generate import (DRAFTS, LEARNED, Drafting, Policy, autoregressive_generate, check_policy,
                      speculative_generate)
from truncated_llama import (DEFAULT_MODEL, DTYPE_CHOICES, ModelLoadError, TruncatedLlama, dtype_line,
                             load_base_model, machine_info, model_fingerprint, resolve_dtype, trees_need_lean)
from checkpoints import CheckpointError, load_exit

PROG = "scratch_work.py"
GREEN, BLUE, MAGENTA, YELLOW, RESET = "\033[32m", "\033[34m", "\033[35m", "\033[33m", "\033[0m"
MARKS = {"exit": (GREEN, "[", "]"), "lookup": (BLUE, "{", "}"), "both": (MAGENTA, "<", ">"),
         "recycled": (YELLOW, "|", "|")}


def coloured(tokenizer, tokens, sources, colour=True):
    """Decode token by token (prefix differences keep multi-byte characters whole), marking drafted ones by their
    source (generate's token_sources): the exit green or [..], prompt lookup blue or {..}, both (a tree node both
    proposed) magenta or <..>, recycled predictions yellow or |..|; the target's own tokens plain. Plain booleans (True: drafted) mark as the exit."""
    out, prev = [], ""
    for i, s in enumerate(sources):
        s = "exit" if s is True else None if s is False else s
        text = tokenizer.decode(tokens[: i + 1], skip_special_tokens=False)
        piece, prev = text[len(prev):], text
        if s is None:
            out.append(piece)
        else:
            code, left, right = MARKS[s]
            out.append(f"{code}{piece}{RESET}" if colour else f"{left}{piece}{right}")
    return "".join(out)


def parse_args(argv=None):
    ap = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt", nargs="?", help="user message (default: a ShareGPT test prompt)")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="alias smollm2-135m, a Hugging Face id or a local directory")
    ap.add_argument("--exit_layer", type=int, default=22, help="draft exit layer L, 1..N-1 (default 22)")
    ap.add_argument("--exit_ckpt", help="a trained exit directory written by train.py (its layer is used)")
    ap.add_argument("--gamma", type=int, default=4, help="draft length per cycle, >= 1 (default 4)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), else sampling")
    ap.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1.0)")
    ap.add_argument("--top_k", type=int, default=0, help="keep the k most likely tokens, 0 = off (default)")
    ap.add_argument("--draft_stop", type=float, default=0.0,
                    help="stop a cycle's drafting when the draft's top probability is below this, in [0, 1) "
                         "(default 0: always gamma drafts)")
    ap.add_argument("--tree_width", type=int, default=1,
                    help="draft a tree: each expanded node proposes this many tokens (default 1: a chain)")
    ap.add_argument("--tree_nodes", type=int, default=0, help="the tree's node budget (default 0: width x gamma)")
    ap.add_argument("--draft", choices=DRAFTS, default="auto",
                    help="draft source: auto (default: each cycle, a tree of lookup's path and recycled predictions, "
                         "the exit's chain or nothing, whichever the measured step costs favour), exit, lookup "
                         "(prompt lookup, no exit), exit+lookup (the lookup when it matches, else the exit; with "
                         "--tree_width, one tree) or recycle (a tree of the model's own earlier top next tokens)")
    ap.add_argument("--lookup_tokens", type=int, default=0,
                    help="exit+lookup: the lookup's proposal length (default 0: gamma)")
    ap.add_argument("--ngram", type=int, default=3, help="the lookup's longest n-gram (default 3)")
    ap.add_argument("--profile", action="store_true",
                    help="also print where a cycle's time goes (draft levels, verify, accept, cache moves; trees)")
    ap.add_argument("--max_new_tokens", type=int, default=96, help="tokens to generate (default 96)")
    ap.add_argument("--seed", type=int, default=0, help="seed for sampling and for the ShareGPT prompt choice")
    ap.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                    help="auto (default): bfloat16 where the CPU/GPU has native bf16, else float32")
    ap.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                    help="auto (default): the GPU when there is one, else the CPU")
    ap.add_argument("--no_color", action="store_true", help="mark drafted tokens with [brackets] instead of colour")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        check_policy(gamma=args.gamma, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                     draft_stop=args.draft_stop, tree_width=args.tree_width, tree_nodes=args.tree_nodes,
                     draft=args.draft, lookup_tokens=args.lookup_tokens, ngram=args.ngram,
                     flags={k: f"--{k}" for k in ("gamma", "temperature", "top_p", "top_k", "draft_stop",
                                                  "tree_width", "tree_nodes", "draft", "lookup_tokens", "ngram")})
        if args.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}.")
        device = resolve_device(args.device)
        dtype, dtype_name = resolve_dtype(args.dtype, device)
        print(dtype_line(args.dtype, dtype_name, machine_info(device)), file=sys.stderr)
        model, tok = load_base_model(args.model, dtype=dtype, device=device)
        exit, layer = None, args.exit_layer
        if args.exit_ckpt:
            exit, cfg = load_exit(args.exit_ckpt, model, base_fingerprint=model_fingerprint(model))
            layer = cfg["exit_layer"]
        n = model.config.num_hidden_layers
        if not 1 <= layer <= n - 1:
            raise ValueError(f"--exit_layer must be in 1..{n - 1} for this {n}-layer model, got {layer}.")
        if args.prompt:
            messages = [{"role": "user", "content": args.prompt}]
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)["input_ids"]
            text = args.prompt
        else:
            from share_gpt_dataset import evaluation_prompts, load_splits
            p = evaluation_prompts(tok, load_splits()["test"], 1, max_prompt_tokens=200, seed=args.seed)[0]
            ids, text = p["input_ids"], p["text"]
        ids = ids.to(device)
    except (ValueError, UsageError, DataError, ModelLoadError, CheckpointError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)

    tl = TruncatedLlama(model, layer, exit)
    policy = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, eos_token_id=tok.eos_token_id)
    if args.tree_width > 1 and not tl.lean:
        print(f"{PROG}: error: {trees_need_lean('--tree_width')}", file=sys.stderr)
        sys.exit(2)
    timings = {} if args.profile else None
    drafting = Drafting(args.draft, args.gamma, args.tree_width, args.tree_nodes, args.draft_stop, args.lookup_tokens,
                        args.ngram)
    pol = Policy(args.temperature, args.top_p, args.top_k)
    warm = min(8, args.max_new_tokens)  # first calls allocate and build; the timed runs come after
    speculative_generate(tl, ids, warm, drafting, pol, generator=torch.Generator(device).manual_seed(args.seed))
    autoregressive_generate(tl, ids, warm, generator=torch.Generator(device).manual_seed(args.seed), **policy)
    LEARNED.pop(tl, None)  # what auto learned on the warm-up's tokens would be this very text: the timed run starts cold
    tokens, stats = speculative_generate(tl, ids, args.max_new_tokens, drafting, pol, eos_token_id=tok.eos_token_id,
                                         timings=timings, generator=torch.Generator(device).manual_seed(args.seed))
    base_tokens, base = autoregressive_generate(tl, ids, args.max_new_tokens,
                                                generator=torch.Generator(device).manual_seed(args.seed), **policy)
    tl_tokens = tokens.tolist()
    print(f"--- prompt ({ids.shape[1]} tokens)\n{text.strip()[:600]}\n")
    legend = ("green: the exit's, blue: the lookup's, magenta: both, yellow: recycled" if not args.no_color else
              "[the exit's], {the lookup's}, <both>, |recycled|")
    tree = f", tree width {args.tree_width}" if args.tree_width > 1 else ""
    source = SOURCES[args.draft].describe.format(exit=f"{layer}/{n}", ngram=args.ngram)
    print(f"--- reply: {source}, gamma {args.gamma}{tree}, temperature {args.temperature} "
          f"(drafted and accepted tokens, {legend})")
    print(coloured(tok, tl_tokens, stats["token_sources"], colour=not args.no_color))
    if stats["lookup_matched"]:
        print(f"\n--- lookup matched in {sum(stats['lookup_matched'])} of {len(stats['lookup_matched'])} cycles; "
              f"tokens by source {stats['source_counts']}")
    print(f"\n--- accepted drafts per cycle\n{stats['per_cycle']}")
    if args.temperature == 0:
        same = tl_tokens == base_tokens.tolist()
        print(f"greedy output identical to autoregressive: {same}"
              + ("" if same or model.dtype == torch.float32 else
                 " (in bfloat16 a multi-token verify rounds differently from one-token steps; near-ties can part)"))
    if timings:
        cycles = stats["target_calls"]
        total = sum(timings.values())
        print("\n--- a cycle's time (ms per cycle, share)\n" + "\n".join(
            f"{k:13s} {1e3 * v / cycles:7.2f}  {v / total:5.1%}" for k, v in timings.items()))
    shown = {k: (None if v != v else round(v, 4)) if isinstance(v, float) else v for k, v in stats.items()
             if k not in ("per_cycle", "per_cycle_drafted", "from_draft", "cache_positions", "overlap_sum",
                          "token_sources", "cycle_kinds", "lookup_matched",
                          "judged_by_depth", "accepted_by_depth")}
    shown["autoregressive_tokens_per_s"] = round(base["tokens_per_s"], 2)
    shown["speedup"] = round(stats["tokens_per_s"] / base["tokens_per_s"], 3)
    print(json.dumps(shown))
    print(f"\n--- speed on this prompt: {stats['tokens_per_s']:.1f} tokens/s self-speculative against "
          f"{base['tokens_per_s']:.1f} autoregressive: {shown['speedup']:.2f}x (one timed run of each after an "
          f"untimed warm-up; make report measures many prompts, with intervals)")


if __name__ == "__main__":
    main()
