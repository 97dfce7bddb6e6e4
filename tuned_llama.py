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

Every parameter here is a fresh tensor, made on the base model's device in its dtype (nothing is built on the host
first and moved); the base model is never modified. Blocks with attention keep their own key/value cache (the exit
cache), indexed by `cache_index`.
"""
import copy

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from cli import UsageError

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


def run_layers(layers, h: torch.Tensor, ctx: tuple, cache=None) -> torch.Tensor:
    """Run transformers decoder layers (or ResidualMLPs, which ignore the context) on hidden states h (B, T, D).

    ctx = (attention mask, position_ids, rotary (cos, sin)) for h's positions; with `cache` (a transformers Cache)
    each attention layer also appends its keys and values there, at its own `layer_idx`. The one loop over layers
    that the one-pass forward, the exit and the transformers-layers generation steps share."""
    mask, position_ids, position_embeddings = ctx
    for layer in layers:
        h = layer(h, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings,
                  past_key_values=cache, use_cache=cache is not None)
    return h


def shared_layer_count(exit_layer, last_block):
    """The base layers an exit at `exit_layer` shares with the full model: L, or L-1 with a private last block."""
    return exit_layer - (1 if last_block else 0)


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
        # built where the base lives, in its dtype: an 8B model's head (1 GB in bfloat16) never exists on the host
        where = dict(device=lm_head.weight.device, dtype=lm_head.weight.dtype)
        self.head = nn.Linear(lm_head.in_features, V if vocab is None else vocab.numel(), bias=False, **where)
        with torch.no_grad():
            if head_init in ("copy", "lstsq"):
                self.head.weight.copy_(lm_head.weight if vocab is None else lm_head.weight[self.vocab])
            else:  # drawn in float32, so a seed gives the same head (rounded) whatever the base's dtype
                std = getattr(config, "initializer_range", 0.02)
                self.head.weight.copy_(torch.empty_like(self.head.weight, dtype=torch.float32).normal_(std=std))

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
            with where["device"]:  # drawn in float32 on the base's device, then cast (as the random head)
                self.adapter = ResidualMLP(config).to(where["dtype"])
        slot = 0
        for block in (self.last_block, self.adapter):
            if block is not None and hasattr(block, "self_attn"):
                block.self_attn.layer_idx = slot
                slot += 1
        self.num_cache_slots = slot

    @property
    def shared_layers(self):
        """How many base layers the draft shares with the full model (L, or L-1 with a private last block)."""
        return shared_layer_count(self.exit_layer, self.last_block is not None)

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
        """Run the private blocks on the shared hidden state; returns the state that enters the exit norm.
        An MLP adapter ignores the attention context (and keeps no cache)."""
        return run_layers(self.blocks(), h, (mask, position_ids, position_embeddings), cache)

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


TRAINABLE = ("head", "norm", "adapter", "last_block")  # the exit's parts, as train.py --train names them


def parse_train(value: str) -> list:
    """--train's comma list -> the exit's parts in TRAINABLE order; UsageError for anything else."""
    parts = [p.strip() for p in value.split(",") if p.strip()]
    bad = [p for p in parts if p not in TRAINABLE]
    if bad or not parts:
        raise UsageError(f"--train must be a comma list of {', '.join(TRAINABLE)}, got {value!r}.")
    return sorted(set(parts), key=TRAINABLE.index)
