"""The early exit: what the draft adds on top of the base model's first L layers.

    layer-L hidden state --> [private copy of block L-1] --> [adapter] --> exit norm --> exit head --> draft logits

- exit norm: a copy of the base model's final RMSNorm.
- exit head: a copy of the LM head (or a random one), always its own tensor, even when the base ties its
  embeddings, so training it never touches the base.
- adapter (optional): an identity-initialised decoder block (a copy of block L-1 whose output projections
  start at zero) or an identity-initialised residual MLP (down projection at zero). Untrained, it changes nothing.
- last_block (optional): a private copy of decoder block L-1 that the draft uses instead of the shared one.
  The draft then shares only layers < L-1 with the full model, which stays untouched, so verification is exact.

Every parameter here is a fresh tensor; the base model is never modified. Blocks with attention keep their own
key/value cache (the exit cache), indexed by `cache_index`.
"""
import copy

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

ADAPTERS = (None, "block", "mlp")


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

    def __init__(self, base_model, exit_layer, *, adapter=None, last_block=False, head_init="copy"):
        super().__init__()
        layers, final_norm, lm_head = base_model.model.layers, base_model.model.norm, base_model.lm_head
        n = len(layers)
        if not 1 <= exit_layer <= n - 1:
            raise ValueError(f"exit_layer must be in 1..{n - 1} for this {n}-layer model, got {exit_layer}.")
        if adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of block, mlp or none, got {adapter!r}.")
        if head_init not in ("copy", "random"):
            raise ValueError(f"head_init must be copy or random, got {head_init!r}.")
        if last_block and exit_layer < 2:
            raise ValueError("last_block needs exit_layer >= 2: block L-1 must not be the embedding's first block.")
        config = base_model.config
        self.exit_layer = exit_layer
        self.adapter_kind = adapter
        self.head_init = head_init
        self.norm = _fresh_copy(final_norm)
        self.head = nn.Linear(lm_head.in_features, lm_head.out_features, bias=False)
        with torch.no_grad():
            if head_init == "copy":
                self.head.weight.copy_(lm_head.weight)
            else:
                nn.init.normal_(self.head.weight, std=getattr(config, "initializer_range", 0.02))
        self.head.to(lm_head.weight.dtype)

        # Blocks with their own attention, in the order the draft runs them, each with its own exit-cache slot.
        self.last_block = None
        if last_block:
            self.last_block = _fresh_copy(layers[exit_layer - 1])
        self.adapter = None
        if adapter == "block":
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

    def config_dict(self):
        return {"exit_layer": self.exit_layer, "adapter": self.adapter_kind,
                "last_block": self.last_block is not None, "head_init": self.head_init}

    def blocks(self):
        return [b for b in (self.last_block, self.adapter) if b is not None]

    def hidden(self, h, *, mask=None, position_ids=None, position_embeddings=None, cache=None):
        """Run the private blocks on the shared hidden state; returns the state that enters the exit norm."""
        for block in self.blocks():
            h = block(h, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings,
                      past_key_values=cache, use_cache=cache is not None)
        return h

    def logits(self, h):
        return self.head(self.norm(h))
