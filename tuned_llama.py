"""The early exit: what the draft adds on top of the base model's first L layers.

    layer-L hidden state --> [private copy of block L-1] --> [adapter] --> exit norm --> exit head --> draft logits

- exit norm: a copy of the base model's final RMSNorm.
- exit head: a copy of the LM head (or a random one), always its own tensor, even when the base ties its
  embeddings, so training it never touches the base. (`head_init="lstsq"` also starts as the copy; train.py then
  refits it by least squares before training.)
  With `vocab` (K token ids, e.g. train.py --draft_vocab K: the K most frequent target tokens), the head is pruned:
  it has only the K rows of those tokens (the `vocab` buffer, saved with the weights) and `logits` still returns
  full-vocabulary logits, -inf outside the subset, so the draft's q is exactly zero there. The target is untouched.
- adapter (optional): a decoder block or a residual MLP. Initialised as the identity (`adapter_init="identity"`:
  a copy of block L-1 whose output projections start at zero, or an MLP whose down projection starts at zero), so
  untrained it changes nothing; or, for a block, as an exact copy of the base's next block L (`"next"`), so the
  untrained exit at L equals the plain exit at L+1, at the same cost, and training starts from a real layer.
- last_block (optional): a private copy of decoder block L-1 that the draft uses instead of the shared one.
  The draft then shares only layers < L-1 with the full model, which stays untouched, so verification is exact.

Every parameter here is a fresh tensor; the base model is never modified. Blocks with attention keep their own
key/value cache (the exit cache), indexed by `cache_index`.
"""
import copy
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

ADAPTERS = (None, "block", "mlp")
ADAPTER_INITS = ("identity", "next")
HEAD_INITS = ("copy", "random", "lstsq")  # lstsq: a copy here, which train.py then refits


def _fresh_copy(module):
    """A deep copy whose parameters are new tensors that require grad (trainable unless frozen by the caller)."""
    clone = copy.deepcopy(module)
    for p in clone.parameters():
        p.data = p.data.clone()
        p.requires_grad_(True)
    return clone


class ResidualMLP(nn.Module):
    """h + MLP(RMSNorm(h)) with the down projection zero-initialised, so it starts as the identity."""

    def __init__(self, config):
        super().__init__()
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)
        std = getattr(config, "initializer_range", 0.02)
        for lin in (self.mlp.gate_proj, self.mlp.up_proj):
            nn.init.normal_(lin.weight, std=std)
        nn.init.zeros_(self.mlp.down_proj.weight)

    def forward(self, h, **_):
        return h + self.mlp(self.norm(h))


class EarlyExit(nn.Module):
    """Exit modules for one exit layer of one base model. See the module docstring."""

    def __init__(self, base_model, exit_layer, *, adapter=None, adapter_init="identity", last_block=False,
                 head_init="copy", vocab=None):
        super().__init__()
        layers, final_norm, lm_head = base_model.model.layers, base_model.model.norm, base_model.lm_head
        n = len(layers)
        if not 1 <= exit_layer <= n - 1:
            raise ValueError(f"exit_layer must be in 1..{n - 1} for this {n}-layer model, got {exit_layer}.")
        if adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of block, mlp or none, got {adapter!r}.")
        if adapter_init not in ADAPTER_INITS or (adapter_init == "next" and adapter != "block"):
            raise ValueError(f"adapter_init must be identity, or next for a block adapter, got {adapter_init!r}.")
        if head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be copy, random or lstsq, got {head_init!r}.")
        if last_block and exit_layer < 2:
            raise ValueError("last_block needs exit_layer >= 2: block L-1 must not be the embedding's first block.")
        V = lm_head.out_features
        if vocab is not None:
            vocab = torch.as_tensor(vocab, dtype=torch.long).flatten().cpu()
            if not 1 <= vocab.numel() <= V or int(vocab.min()) < 0 or int(vocab.max()) >= V or \
                    vocab.unique().numel() != vocab.numel():
                raise ValueError(f"vocab must be 1..{V} distinct token ids in 0..{V - 1}, got {vocab.numel()} ids.")
        config = base_model.config
        self.exit_layer = exit_layer
        self.adapter_kind = adapter
        self.adapter_init = adapter_init
        self.head_init = head_init
        self.vocab_size = V
        # the pruned head's token ids (row i of the head is token vocab[i]); None: the full vocabulary
        self.register_buffer("vocab", vocab.to(lm_head.weight.device) if vocab is not None else None)
        self.norm = _fresh_copy(final_norm)
        self.head = nn.Linear(lm_head.in_features, V if vocab is None else vocab.numel(), bias=False)
        with torch.no_grad():
            if head_init in ("copy", "lstsq"):
                self.head.weight.copy_(lm_head.weight if vocab is None else lm_head.weight[self.vocab])
            else:
                nn.init.normal_(self.head.weight, std=getattr(config, "initializer_range", 0.02))
        self.head.to(lm_head.weight.dtype)

        # Blocks with their own attention, in the order the draft runs them, each with its own exit-cache slot.
        self.last_block = None
        if last_block:
            self.last_block = _fresh_copy(layers[exit_layer - 1])
        self.adapter = None
        if adapter == "block" and adapter_init == "next":
            self.adapter = _fresh_copy(layers[exit_layer])
        elif adapter == "block":
            self.adapter = _fresh_copy(layers[exit_layer - 1])
            with torch.no_grad():
                self.adapter.self_attn.o_proj.weight.zero_()
                self.adapter.mlp.down_proj.weight.zero_()
        elif adapter == "mlp":
            self.adapter = ResidualMLP(config).to(lm_head.weight.dtype)
        slot = 0
        for block in (self.last_block, self.adapter):
            if block is not None and hasattr(block, "self_attn"):
                block.self_attn.layer_idx = slot
                slot += 1
        self.num_cache_slots = slot

    @property
    def shared_layers(self):
        """How many base layers the draft shares with the full model (L, or L-1 with a private last block)."""
        return self.exit_layer - (1 if self.last_block is not None else 0)

    @property
    def draft_vocab(self):
        """K, the rows of a pruned head; None for the full vocabulary."""
        return None if self.vocab is None else self.vocab.numel()

    def config_dict(self):
        return {"exit_layer": self.exit_layer, "adapter": self.adapter_kind, "adapter_init": self.adapter_init,
                "last_block": self.last_block is not None, "head_init": self.head_init,
                "draft_vocab": self.draft_vocab}

    def blocks(self):
        return [b for b in (self.last_block, self.adapter) if b is not None]

    def hidden(self, h, *, mask=None, position_ids=None, position_embeddings=None, cache=None):
        """Run the private blocks on the shared hidden state; returns the state that enters the exit norm."""
        for block in self.blocks():
            h = block(h, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings,
                      past_key_values=cache, use_cache=cache is not None)
        return h

    def logits(self, h):
        """Full-vocabulary draft logits (..., V) of the state h; -inf outside a pruned head's vocabulary."""
        return self.expand(self.head(self.norm(h)))

    def expand(self, z):
        """The head's output (..., K) as full-vocabulary logits (..., V): a pruned head's K logits scattered into a
        -inf filled tensor (the full head's pass through)."""
        if self.vocab is None:
            return z
        out = z.new_full((*z.shape[:-1], self.vocab_size), float("-inf"))
        return out.index_copy_(-1, self.vocab, z)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: a directory with exit.safetensors + exit_config.json, written atomically.

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
