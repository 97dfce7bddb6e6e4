"""The lean decode step: a Llama decoder layer as a dozen plain torch calls on a static, position-written KV cache.

transformers' forward is general (any batch, any mask, a cache that grows by concatenation); a batch-1 decode step
needs little of that, and on a CPU most of its time goes to the generality. This module runs the same weights as
gpt-fast does:

    x -> rms_norm -> [q k v] (one product) -> RoPE (q and k together, tables precomputed) -> write k, v at their
      positions -> attention over the cache's first n positions -> o -> + x -> rms_norm -> [gate up] (one product)
      -> silu(gate) * up -> down -> + x

- Weights are not copied: q/k/v (and gate/up) are concatenated once into one tensor and the base model's parameters
  become views of it, so the model stays one model in memory and training or the one-pass forward see the same
  numbers.
- Each product is computed in the form measured fastest on this machine for its shape (`Product`): on a CPU our own
  kernel (linear_kernel.py: the weights read once for up to 64 rows, each row's bits independent of the others) or
  torch's F.linear; with ROW_INVARIANT off, per row count among F.linear, W @ x^T, x @ W^T with W stored transposed
  and the kernel.
- The KV cache (`StaticCache`) is written by position; rejecting drafts is a change of length, nothing is freed.
  One cache serves a whole generation: the base model's layers in slots 0..N-1, the exit's private attention
  blocks after them.
- `LeanSteps` is TruncatedLlama's generation steps (extend / verify / exit logits) on this engine.

The step runs eagerly. `LeanSteps.use_static` runs chain steps as the static step instead (positions as a device
tensor, fixed shapes and addresses: torch.compile can capture it as a CUDA graph); benchmark_torch_compile.py
--compile times the three. Long prefills from position 0 take the fused causal kernel (FUSED_PREFILL_ROWS).
`supports(model)` says whether a model's layers have the Llama structure this step reproduces; other models keep
transformers' layers (TruncatedLlama's HFSteps). The tests compare this step with transformers' forward.
"""
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import linear_kernel

# ----------------------------------------------------------------------------------------------------------------
# Products in their fastest measured form


def _forms() -> dict[str, tuple[str, Callable]]:
    """name -> (storage, fn(x, stored)): x is (M, in); 'w' storage is (out, in) as nn.Linear keeps it, 't' is its
    transpose made contiguous. `mv` is for one row only; `kernel` (linear_kernel.py) for up to
    linear_kernel.MAX_ROWS rows on a CPU where it was built."""
    return {
        "linear": ("w", lambda x, w: F.linear(x, w)),
        "w@x": ("w", lambda x, w: torch.mm(w, x.t()).t()),
        "mv": ("w", lambda x, w: torch.mv(w, x[0]).unsqueeze(0)),
        "x@t": ("t", lambda x, t: torch.mm(x, t)),
        "linear_t": ("t", lambda x, t: F.linear(x, t.t())),
        "kernel": ("w", lambda x, w: linear_kernel.linear(x.contiguous(), w)),
    }


FORMS = _forms()
# Row-invariant steps (the default): a token's logits get the same bits whether it is decoded alone or among the rows
# of a verify, so that greedy self-speculation equals autoregressive decoding in bfloat16 as in float32. Each product
# then takes one form for every row count: our kernel (row-invariant by construction, linear_kernel.py) or F.linear
# (whose calls of 2 or more rows agree; one row is run as two where its one-row kernel rounds otherwise: `pad_one`),
# whichever is measured faster for the shape; and attention reads the cache's capacity (StaticCache).
# False: the forms measured fastest per row count, attention over the committed prefix only.
ROW_INVARIANT = True
# Which products may take the kernel: "measured" (the default: where it is faster, shape by shape), "kernel" (every
# product it can serve), "torch" (none).
KERNEL = "measured"
ROW_BUCKETS = (1, 5)  # rows timed: one-token steps; short verifies (2-16 rows); longer inputs use F.linear
_CHOICES = {}  # (out, in, dtype, device, threads, ROW_INVARIANT, KERNEL) -> (storage, {bucket: form})


def _bucket(m: int) -> int | None:
    return 1 if m == 1 else 5 if m <= 16 else None


def kernel_serves(w: torch.Tensor) -> bool:
    """Whether our kernel can compute products with this weight (a float32 or bfloat16 CPU tensor), and is built."""
    return (KERNEL != "torch" and w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16)
            and linear_kernel.available())


def measure_forms(weights: Sequence[torch.Tensor], passes: int = 2, names: Sequence[str] | None = None,
                  rows: Sequence[int] = ROW_BUCKETS) -> dict[str, dict[int, float]]:
    """Seconds per product of each form (default: every one that serves these weights) at each row count,
    {form: {rows: s}}, timed on the model's own weights.

    Each timing runs the product over every weight given (e.g. all layers' q/k/v), in order, as a decode step does:
    one weight timed over and over would sit in the caches and could rank the forms wrongly. The forms take turns
    within each pass, so a slow moment of the machine hits them alike."""
    w0 = weights[0]
    if names is None:
        names = [n for n in FORMS if n != "kernel" or kernel_serves(w0)]
    stored = {"w": weights}
    if any(FORMS[n][0] == "t" for n in names):
        stored["t"] = [w.t().contiguous() for w in weights]
    sync = torch.cuda.synchronize if w0.device.type == "cuda" else (lambda: None)
    times = {name: {} for name in names}
    for m in rows:
        x = torch.randn(m, w0.shape[1], device=w0.device).to(w0.dtype)
        for p in range(passes + 1):  # the first pass warms up
            for name in names:
                if name == "mv" and m > 1:
                    continue
                storage, fn = FORMS[name]
                sync()
                t = time.perf_counter()
                for weight in stored[storage]:
                    fn(x, weight)
                sync()
                if p:
                    times[name][m] = min(times[name].get(m, float("inf")), (time.perf_counter() - t) / len(weights))
    return times


ROW_INVARIANT_CHOICE = ("w", {m: "linear" for m in ROW_BUCKETS})
KERNEL_CHOICE = ("w", {m: "kernel" for m in ROW_BUCKETS})
TIMED_BYTES = 256 * 2**20  # weights timed per role when measuring: past the CPU's caches, a bounded transient


def timed_layers(layers: Sequence[nn.Module], linears: Callable) -> Sequence[nn.Module]:
    """The first layers whose weights reach TIMED_BYTES (all of a small model): timing them in turn keeps a weight
    out of the caches as a decode step would, while measuring never copies a large model's every weight (fused
    copies plus a transposed one of all 32 layers of an 8B model are ~14 GiB)."""
    total = 0
    for i, layer in enumerate(layers):
        total += sum(w.weight.numel() * w.weight.element_size() for role in Block.ROLES for w in linears(layer, role))
        if total >= TIMED_BYTES:
            return layers[: i + 1]
    return layers


def choose_forms(weights: Sequence[torch.Tensor]) -> tuple[str, dict[int, str]]:
    """(storage, {rows bucket: form}) for weights of one shape, measured once per shape, dtype and thread count.

    Row-invariant (the default): the kernel for every row count, or F.linear for every row count, whichever costs
    less (F.linear's one row timed as two where `pad_one` will run it so). Otherwise the storage whose best forms
    cost least. One-token steps (most of decoding) weigh 3:1 against short verifies."""
    w0 = weights[0]
    if ROW_INVARIANT and not kernel_serves(w0):
        return ROW_INVARIANT_CHOICE
    if ROW_INVARIANT and KERNEL == "kernel":
        return KERNEL_CHOICE
    key = (*w0.shape, w0.dtype, str(w0.device), torch.get_num_threads(), ROW_INVARIANT, KERNEL)
    if key not in _CHOICES:
        if ROW_INVARIANT:
            one = 1 if one_row_invariant(w0) else 2
            times = measure_forms(weights, names=("kernel", "linear"), rows=sorted({one, *ROW_BUCKETS}))
            cost = {n: 3 * times[n][one if n == "linear" else 1] + times[n][5] for n in times}
            _CHOICES[key] = KERNEL_CHOICE if cost["kernel"] < cost["linear"] else ROW_INVARIANT_CHOICE
        else:
            times = measure_forms(weights)
            best = {}
            for storage in ("w", "t"):
                names = [n for n in times if FORMS[n][0] == storage]
                picks = {m: min((n for n in names if m in times[n]), key=lambda n: times[n][m]) for m in ROW_BUCKETS}
                cost = sum((3 if m == 1 else 1) * times[picks[m]][m] for m in ROW_BUCKETS)
                best[storage] = (cost, picks)
            storage = min(best, key=lambda s: best[s][0])
            _CHOICES[key] = (storage, best[storage][1])
    return _CHOICES[key]


def fused_weight(linears: Sequence[nn.Linear]) -> torch.Tensor:
    """The weights of nn.Linear modules that share an input, stacked into one (out, in) tensor."""
    ws = [lin.weight.detach() for lin in linears]
    return torch.cat(ws) if len(ws) > 1 else ws[0]


class Product:
    """y = x W^T (+ b) for the weights of one or more nn.Linear modules sharing an input, fused into one product.

    The modules' weights become views of the fused, re-laid-out tensor (no copy is kept)."""

    def __init__(self, linears: Sequence[nn.Linear], choice: tuple[str, dict[int, str]]):
        self.storage, self.forms = choice
        with torch.no_grad():
            fused = fused_weight(linears)
            stored = fused.t().contiguous() if self.storage == "t" else fused.contiguous()
        row = 0
        for lin in linears:  # point each module at its slice of the fused tensor
            n = lin.weight.shape[0]
            lin.weight.data = stored[:, row:row + n].t() if self.storage == "t" else stored[row:row + n]
            row += n
        self.weight = stored
        biases = [lin.bias for lin in linears]
        self.bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        self.fns = {m: FORMS[name][1] for m, name in self.forms.items()}
        self.default = FORMS["linear_t" if self.storage == "t" else "linear"][1]
        # row-invariant on the kernel: every call of up to MAX_ROWS rows takes it (longer ones: prefills)
        self.kernel_rows = linear_kernel.MAX_ROWS if ROW_INVARIANT and choice == KERNEL_CHOICE else 16
        self.pad_one = (ROW_INVARIANT and stored.device.type == "cpu" and self.storage == "w"  # a CPU's rounding
                        and self.forms[1] == "linear" and not one_row_invariant(stored))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (k, in) -> (k, out), contiguous."""
        m = x.shape[0]
        if self.pad_one and m == 1:  # a one-row product rounds unlike the same row among others here
            y = F.linear(x.expand(2, -1), self.weight)[:1]
        else:
            y = self.fns[_bucket(m) or 5](x, self.weight) if m <= self.kernel_rows else self.default(x, self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y if y.is_contiguous() else y.contiguous()

    def describe(self) -> str:
        return f"{self.storage}:" + "/".join(self.forms[m] for m in ROW_BUCKETS) + (" (1 row as 2)" if self.pad_one
                                                                                       else "")


_ONE_ROW = {}  # (out, in, dtype, device, threads) -> whether F.linear of one row equals that row among two


def one_row_invariant(weight: torch.Tensor, trials: int = 32) -> bool:
    """Whether F.linear gives a row the same bits alone as among 2 rows, for this weight's shape on this machine
    (measured once per shape on random inputs: a CPU may run one row through another kernel, e.g. a matrix-vector
    one that sums in another order; measured here for the 576 x 1536 down projection in bf16, 2 rows in 20 differ).
    Calls of 2 or more rows agree with each other (measured up to 16)."""
    key = (*weight.shape, weight.dtype, str(weight.device), torch.get_num_threads())
    if key not in _ONE_ROW:
        g = torch.Generator(device=weight.device).manual_seed(0)
        same = True
        for _ in range(trials):
            x = torch.randn(2, weight.shape[1], generator=g, device=weight.device).to(weight.dtype)
            same &= torch.equal(F.linear(x[:1], weight), F.linear(x, weight)[:1])
        _ONE_ROW[key] = bool(same)
    return _ONE_ROW[key]


# ----------------------------------------------------------------------------------------------------------------
# The static cache


class StaticCache:
    """Keys and values of `slots` attention layers, (slots, kv_heads, capacity, head_dim) each, written by position.

    `lengths[i]` is how many positions layer i holds; `crop(n)` only shortens lengths. Capacity doubles when a write
    would pass it (rare: the generate functions size it for the prompt, the new tokens and one cycle's drafts).

    Fixed span (`fixed_span`, the default): every attention call reads the whole capacity, positions past the query's
    masked out, so a query row sees the same keys (and the same masked padding) whether it comes alone (a one-token
    step) or among the rows of a verify. On CPUs the attention kernel's bits depend on the span of keys, not on the
    number of query rows, so greedy self-speculation then equals autoregressive decoding bitwise in bfloat16 too,
    where a verify over a span of n + k keys rounds unlike one-token steps over n + 1 (docs/design.md). The buffers
    start as zeros: masked positions must hold finite numbers."""

    def __init__(self, slots: int, kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype,
                 device: torch.device, fixed_span: bool = True):
        shape = (slots, kv_heads, max(16, capacity), head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * slots
        self.fixed_span = fixed_span

    def span(self, end: int) -> int:
        """How many key positions an attention call over positions [0, end) reads."""
        return self.capacity if self.fixed_span else end

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def length(self, layer: int = 0) -> int:
        """How many positions slot `layer` holds."""
        return self.lengths[layer]

    def reserve(self, n: int) -> None:
        if n > self.capacity:
            cap = max(n, 2 * self.capacity)
            for name in ("k", "v"):
                old = getattr(self, name)
                new = old.new_zeros((old.shape[0], old.shape[1], cap, old.shape[3]))
                new[:, :, : old.shape[2]] = old
                setattr(self, name, new)

    def write(self, slot: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (kv_heads, t, head_dim) keys/values at positions start..start+t-1; return the keys and values
        attention reads: the layer's whole prefix, or with a fixed span the whole capacity."""
        end = start + k.shape[1]
        self.reserve(end)
        self.k[slot, :, start:end] = k
        self.v[slot, :, start:end] = v
        self.lengths[slot] = end
        span = self.span(end)
        return self.k[slot, :, :span], self.v[slot, :, :span]

    def write_at(self, slot: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """`write` at positions given as a device tensor (the static step): no host integer, no growth, the lengths
        left to the caller; returns the whole capacity (a fixed span)."""
        self.k[slot].index_copy_(1, positions, k)
        self.v[slot].index_copy_(1, positions, v)
        return self.k[slot], self.v[slot]

    def written(self, slots: Sequence[int], end: int) -> None:
        """After a static step wrote positions up to `end` in `slots` (write_at leaves the lengths to its caller)."""
        for slot in slots:
            self.lengths[slot] = end

    def crop(self, n: int) -> None:
        """Drop every position >= n from every slot (rejected drafts): only the lengths change."""
        self.lengths = [min(length, n) for length in self.lengths]

    def keep(self, n: int, positions: Sequence[int]) -> None:
        """Move the keys and values at `positions` (a tree's accepted path, in order) to n, n+1, .. in every slot and
        drop everything after them: the cache then holds the committed tokens only, none recomputed."""
        m = len(positions)
        if list(positions) != list(range(n, n + m)):
            index = torch.as_tensor(positions, device=self.k.device)
            for buf in (self.k, self.v):
                buf[:, :, n:n + m] = buf.index_select(2, index)  # a gather first, then the write: no overlap
        self.lengths = [min(length, n + m) for length in self.lengths]


# ----------------------------------------------------------------------------------------------------------------
# The step


def supports(model: nn.Module) -> bool:
    """True when every decoder layer is a plain Llama layer with SiLU MLP and no sliding window."""
    c = model.config
    return (all(type(layer) is LlamaDecoderLayer for layer in model.model.layers)
            and getattr(c, "hidden_act", "silu") == "silu" and not getattr(c, "sliding_window", None))


class Block:
    """One decoder layer's weights, run as the lean step (see the module docstring)."""

    ROLES = {"qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")), "o": ("self_attn", ("o_proj",)),
             "gate_up": ("mlp", ("gate_proj", "up_proj")), "down": ("mlp", ("down_proj",))}

    @classmethod
    def linears(cls, layer: nn.Module, role: str) -> list[nn.Linear]:
        parent, names = cls.ROLES[role]
        return [getattr(getattr(layer, parent), n) for n in names]

    @classmethod
    def choices(cls, layers: Sequence[nn.Module]) -> dict[str, tuple[str, dict[int, str]]]:
        """The measured storage and forms of each product role, timed over some of these layers' weights (fused
        copies made only when measuring, and only of as many layers as `timed_layers` says)."""
        if ROW_INVARIANT and not kernel_serves(cls.linears(layers[0], "qkv")[0].weight):
            return {role: ROW_INVARIANT_CHOICE for role in cls.ROLES}  # F.linear: nothing to time or copy
        picked = timed_layers(layers, cls.linears)
        return {role: choose_forms([fused_weight(cls.linears(layer, role)) for layer in picked]) for role in cls.ROLES}

    def __init__(self, layer: nn.Module, choices: dict[str, tuple[str, dict[int, str]]]):
        a, m = layer.self_attn, layer.mlp
        self.heads, self.kv_heads = a.config.num_attention_heads, a.config.num_key_value_heads
        self.head_dim, self.scaling = a.head_dim, a.scaling
        self.ln1, self.eps1 = layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon
        self.ln2, self.eps2 = layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon
        self.qkv, self.o, self.gate_up, self.down = (Product(self.linears(layer, r), choices[r]) for r in self.ROLES)
        self.inter = m.gate_proj.weight.shape[0]

    def __call__(self, x: torch.Tensor, cache: StaticCache, slot: int, start: int | torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, mask: torch.Tensor | None | str) -> torch.Tensor:
        """x (t, hidden) at positions start..start+t-1 -> (t, hidden); writes the layer's keys/values. `start` may be
        the positions themselves, a (t,) device tensor (the static step). `mask` CAUSAL: a long prefill from
        position 0 (see FUSED_PREFILL_ROWS)."""
        t, hd, H, KV = x.shape[0], self.head_dim, self.heads, self.kv_heads
        qkv = self.qkv(rms_norm(x, self.ln1, self.eps1))
        qk = rope(qkv[:, : (H + KV) * hd].view(t, H + KV, hd), cos, sin)  # q and k rotated in one go
        v = qkv[:, (H + KV) * hd:].view(t, KV, hd).transpose(0, 1)
        k = qk[:, H:].transpose(0, 1)
        keys, values = (cache.write(slot, start, k, v) if isinstance(start, int) else
                        cache.write_at(slot, start, k, v))
        q = qk[:, :H].transpose(0, 1)
        path = attention_path(x.device.type, t, mask, cache.fixed_span)
        if path == "causal":  # keys 0..t-1 only, heads repeated, no mask: a fused kernel's case
            keys, values = (kv[:, :t].repeat_interleave(H // KV, 0) for kv in (keys, values))
            att = F.scaled_dot_product_attention(q.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
                                                 is_causal=True, scale=self.scaling)
        elif path == "folded":
            att = folded_attention(q, keys, values, mask, self.scaling)
        else:
            if path == "padded":  # see MIN_QUERY_ROWS
                q, mask = _padded(q, mask, keys.shape[1], MIN_QUERY_ROWS)
            att = F.scaled_dot_product_attention(q.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
                                                 attn_mask=mask, scale=self.scaling, enable_gqa=KV != H)
        return self._rest(x, att, t)

    def _rest(self, x: torch.Tensor, att: torch.Tensor, t: int) -> torch.Tensor:
        """The attention output's projection, the residual and the MLP."""
        hd, H = self.head_dim, self.heads
        x = x + self.o(att[0, :, :t].transpose(0, 1).reshape(t, H * hd))
        gu = self.gate_up(rms_norm(x, self.ln2, self.eps2))
        return x + self.down(F.silu(gu[:, : self.inter]) * gu[:, self.inter:])


# On CPUs (torch 2.13, bf16) scaled_dot_product_attention gives a query row the same bits whether 4, 5 or 16 rows
# share the call (over the same keys and mask), but takes another path for 1 or 2 rows, whose bits differ. With a fixed
# span, calls of fewer rows are padded to this many (copies of the last row, dropped after): one-token steps, chains'
# two-row verifies and long verifies then round alike.
MIN_QUERY_ROWS = 4
# A prefill from position 0 of at least this many tokens attends with is_causal over its own keys, heads repeated, no
# mask: a bool mask with enable_gqa rules out the fused kernels on a GPU (the math kernel would hold every score: ~16
# GiB a layer at 16k tokens). Shorter prefills keep the masked call over the capacity (their bits unchanged).
FUSED_PREFILL_ROWS = 1024
CAUSAL = "causal"


def attention_path(device_type: str, t: int, mask, fixed_span: bool) -> str:
    """Which attention call a block makes for t query rows, by device (its one decision, tested per device):
      causal  a long prefill from position 0: is_causal over its own keys, no mask (every device; FUSED_PREFILL_ROWS)
      padded  CPU, fixed span, t < MIN_QUERY_ROWS: rows padded so that one-token steps round like verifies
      masked  CPU otherwise: the mask (or none) with enable_gqa, over the span
      fused   a GPU, no mask (a one-token step over the exact span of keys): flash / cuDNN take it with GQA
      folded  a GPU with a mask (verifies, trees, the static step over the capacity): the GQA group folded into
              the query rows (folded_attention), so the memory-efficient kernel takes the mask and no K/V is copied
    Flash attention refuses any mask and the memory-efficient kernel refuses enable_gqa with unequal head counts,
    so a masked GQA call would fall to the math kernel (K and V repeated to every head, every score in float32)."""
    if mask is CAUSAL:
        return "causal"
    if device_type == "cpu":
        return "padded" if fixed_span and t < MIN_QUERY_ROWS else "masked"
    return "fused" if mask is None else "folded"


def folded_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """Grouped-query attention as plain multi-head attention over the KV heads: q (H, t, hd) with query head h
    reading KV head h // G (G = H / KV, Llama's grouping) becomes (KV, G t, hd), row g t + i being head kv G + g's
    query i, and the (t, span) mask is tiled G times; keys and values (KV, span, hd) are read as they are. Returns
    (1, H, t, hd), as scaled_dot_product_attention(..., enable_gqa=True) does."""
    H, t, hd = q.shape
    KV = keys.shape[0]
    G = H // KV
    att = F.scaled_dot_product_attention(q.reshape(1, KV, G * t, hd), keys.unsqueeze(0), values.unsqueeze(0),
                                         attn_mask=None if mask is None else mask.repeat(G, 1), scale=scale)
    return att.view(1, H, t, hd)


def _padded(q: torch.Tensor, mask: torch.Tensor | None, span: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(heads, t, hd) queries and their (t, span) mask (None: every key), the last row repeated to `rows` rows."""
    extra = rows - q.shape[1]
    if mask is None:
        mask = torch.ones(q.shape[1], span, dtype=torch.bool, device=q.device)
    return (torch.cat([q, q[:, -1:].expand(-1, extra, -1)], dim=1),
            torch.cat([mask, mask[-1:].expand(extra, -1)], dim=0))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm as one fused call (it accumulates in float32 like transformers', and rounds once, at the end)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (t, heads, head_dim): x cos + rotate_half(x) sin, with rotate_half(x) = roll(x) * sign
    and the sign folded into the precomputed `sin` table (see Tables)."""
    return torch.addcmul(x * cos.unsqueeze(1), torch.roll(x, x.shape[-1] // 2, -1), sin.unsqueeze(1))


class Tables:
    """RoPE cos/sin rows for positions 0..n-1 (from the model's own rotary module, so scaled RoPE variants match) and
    a causal mask, both grown by doubling and sliced per step."""

    def __init__(self, rotary: nn.Module, dtype: torch.dtype, device: torch.device):
        self.rotary, self.dtype, self.device = rotary, dtype, device
        self.cos = self.sin = torch.empty(0, device=device)

    def reserve(self, n: int) -> None:
        """Tables for positions 0..n-1 at least (grown by doubling)."""
        if n > self.cos.shape[0]:
            size = max(n, 2 * self.cos.shape[0], 256)
            probe = torch.empty(1, 1, dtype=self.dtype, device=self.device)
            pos = torch.arange(size, device=self.device).unsqueeze(0)
            cos, sin = self.rotary(probe, position_ids=pos)
            half = sin.shape[-1] // 2
            self.cos, self.sin = cos[0], torch.cat((-sin[0, :, :half], sin[0, :, half:]), -1)  # rotate_half's sign

    def at(self, start: int, t: int, tree: "TreeRows | None" = None, span: int | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(cos, sin, mask) for t queries written at start..start+t-1 over keys 0..span-1 (default start+t): causal
        (mask None if t=1 and the span ends at the query), or for the rows of a draft tree, at their own RoPE
        positions and with their tree mask (padded with False to the span)."""
        end = start + t
        span = end if span is None else span
        if tree is not None:
            self.reserve(tree.end)
            mask = tree.mask
            if span > mask.shape[1]:
                mask = torch.cat([mask, mask.new_zeros(t, span - mask.shape[1])], dim=1)
            return self.cos[tree.positions], self.sin[tree.positions], mask
        self.reserve(max(end, span))
        if start == 0 and t >= FUSED_PREFILL_ROWS:
            return self.cos[:end], self.sin[:end], CAUSAL
        mask = None if t == 1 and span == end else causal_mask(torch.arange(start, end, device=self.device), span)
        return self.cos[start:end], self.sin[start:end], mask

    def at_positions(self, positions: torch.Tensor, span: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cos, sin, mask) for queries at `positions` (a device tensor: the static step; the tables must already
        cover them, `reserve`), each seeing keys 0..its position of `span`."""
        return self.cos.index_select(0, positions), self.sin.index_select(0, positions), causal_mask(positions, span)


def causal_mask(positions: torch.Tensor, span: int) -> torch.Tensor:
    """(t, span) bool: query i sees keys 0..positions[i] (made per call, t x span: no table of size^2 kept)."""
    return torch.arange(span, device=positions.device) <= positions.unsqueeze(1)


class TreeRows(NamedTuple):
    """Rows of a draft tree written at cache positions start..start+t-1: each row's RoPE position (n + its depth) and
    the (t, start+t) attention mask that lets it see the committed prefix and its own ancestors only; `end`, the
    largest position + 1, known on the host (reading it from `positions` would wait for the device)."""
    positions: torch.Tensor
    mask: torch.Tensor
    end: int


class Engine:
    """The lean step for one base model: its blocks, final norm and LM head, and the RoPE/mask tables."""

    def __init__(self, model: nn.Module):
        d = model.model
        self.embed = d.embed_tokens
        choices = Block.choices(d.layers)
        self.blocks = [Block(layer, choices) for layer in d.layers]
        self.norm, self.norm_eps = d.norm.weight, d.norm.variance_epsilon
        # a head tied to the embedding keeps the (vocab, hidden) storage: stored transposed, the embedding would
        # become a strided view and every token lookup a strided gather
        tied = model.lm_head.weight is d.embed_tokens.weight
        self.head = Product([model.lm_head], ROW_INVARIANT_CHOICE if tied and not ROW_INVARIANT else
                            choose_forms([model.lm_head.weight.detach()]))  # row-invariant forms keep (out, in)
        self.dtype, self.device = self.head.weight.dtype, self.head.weight.device
        self.tables = Tables(d.rotary_emb, self.dtype, self.device)
        first = self.blocks[0]
        self.kv_heads, self.head_dim = first.kv_heads, first.head_dim

    def new_cache(self, slots: int, capacity: int, fixed_span: bool | None = None) -> StaticCache:
        """A cache whose attention calls read a fixed span (the whole capacity) with ROW_INVARIANT on a CPU, where
        bits depend on the span, or when asked (the static step's fixed shapes); on a GPU otherwise the exact span
        of keys, so a one-token step attends with no mask (attention_path)."""
        if fixed_span is None:
            fixed_span = ROW_INVARIANT and self.device.type == "cpu"
        return StaticCache(slots, self.kv_heads, self.head_dim, capacity, self.dtype, self.device, fixed_span)

    def run(self, blocks: Sequence[Block], x: torch.Tensor, cache: StaticCache, first_slot: int,
            start: int | torch.Tensor, tree: TreeRows | None = None) -> torch.Tensor:
        """The blocks on x (t, hidden) written at positions start.. (or at the positions of a device tensor: the
        static step), block i in cache slot first_slot + i."""
        cos, sin, mask = _rows(self.tables, cache, start, x.shape[0], tree)
        for i, block in enumerate(blocks):
            x = block(x, cache, first_slot + i, start, cos, sin, mask)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(rms_norm(x, self.norm, self.norm_eps))

    def describe(self) -> str:
        b = self.blocks[0]
        return (f"qkv {b.qkv.describe()}, o {b.o.describe()}, gate_up {b.gate_up.describe()}, "
                f"down {b.down.describe()}, lm_head {self.head.describe()}")


def _rows(tables: Tables, cache: StaticCache, start: int | torch.Tensor, t: int, tree: TreeRows | None) -> tuple:
    """(cos, sin, mask) of t rows at start.. (the cache grown first: the span is read after), or at the positions of
    a device tensor, over the whole capacity (the static step: nothing grows, no host integer)."""
    if isinstance(start, int):
        cache.reserve(start + t)
        return tables.at(start, t, tree, cache.span(start + t))
    return tables.at_positions(start, cache.capacity)


def weights_key(module: nn.Module) -> tuple:
    """Where a module's weights live: a lean step built for them is stale once any parameter is replaced."""
    return tuple(p.data_ptr() for p in module.parameters())


def _built_for(module, build):
    """build(module), kept on the module and made once (again if its weights were replaced, e.g. by .to(dtype))."""
    engine = module.__dict__.get("_lean_engine")
    if engine is None or engine.key != weights_key(module):
        engine = build(module)
        module.__dict__["_lean_engine"] = engine  # a plain attribute: not a submodule, not in the state dict
        engine.key = weights_key(module)  # after building: the fused views are the weights' new home
    return engine


def engine_for(model: nn.Module) -> Engine:
    """The base model's Engine, built once."""
    return _built_for(model, Engine)


class ExitEngine:
    """The lean step for an EarlyExit's private blocks, norm and head (their cache slots follow the base's)."""

    def __init__(self, exit: nn.Module):
        attention = [b for b in exit.blocks() if type(b) is LlamaDecoderLayer]
        choices = Block.choices(attention) if attention else None
        self.blocks = [Block(b, choices) if type(b) is LlamaDecoderLayer else b for b in exit.blocks()]
        self.norm, self.norm_eps = exit.norm.weight, exit.norm.variance_epsilon
        self.head = Product([exit.head], choose_forms([exit.head.weight.detach()]))
        self.expand = exit.expand  # a pruned head's K logits -> full vocabulary, -inf elsewhere

    def hidden(self, x: torch.Tensor, cache: StaticCache, first_slot: int, start: int, tables: Tables,
               tree: TreeRows | None = None) -> torch.Tensor:
        """The exit's private blocks on shared states x (t, hidden), attention blocks in cache slots first_slot..;
        an MLP adapter has no attention, no cache slot."""
        cos, sin, mask = _rows(tables, cache, start, x.shape[0], tree)
        slot = first_slot
        for block in self.blocks:
            if isinstance(block, Block):
                x = block(x, cache, slot, start, cos, sin, mask)
                slot += 1
            else:
                x = block(x)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.head(rms_norm(x, self.norm, self.norm_eps)))


def exit_engine_for(exit: nn.Module) -> ExitEngine:
    """The EarlyExit's ExitEngine, built once."""
    return _built_for(exit, ExitEngine)


# ----------------------------------------------------------------------------------------------------------------
# TruncatedLlama's generation steps on the lean engine


STATIC_CAPACITY_STEP = 256  # compiled static steps: cache capacities in multiples of this (fewer graphs)


class LeanSteps:
    """Generation steps for a base model and its EarlyExit on the lean engine; every tensor is (1, k, ...) at
    positions start..start+k-1. One StaticCache holds the base's layers (slots 0..N-1) and the exit's private
    attention blocks (slots N..). The other implementation is truncated_llama.HFSteps (same methods)."""

    def __init__(self, base: nn.Module, exit: nn.Module):
        self.base, self.exit = base, exit
        self._static, self.static_rows, self.compiled, self._pool = None, 0, False, {}
        self._build()  # now (its products timed), not inside the first timed generation

    def use_static(self, compile: bool | str = False, max_rows: int = 16) -> None:
        """Run chain steps of up to `max_rows` tokens (one-token steps, drafts, chain verifies) as the static step:
        positions passed as a device tensor, keys and values written with index_copy_, attention over the cache's
        whole capacity with a mask made from the positions, so every shape and address is fixed for a row count and
        nothing is read back. `compile`: run it under torch.compile (True, or a mode: "reduce-overhead" captures a
        CUDA graph per row count on a GPU); False: eagerly (the same numbers as the default step). Prefills, trees
        and longer inputs keep the default step. A cache must be made with its final capacity (new_cache).

        Compiled: each (row count, with or without the exit's blocks, cache) is one graph, so dynamo's recompile
        limits are raised (a process-wide setting) to hold a sweep's; every weight and the RoPE tables (made for
        the model's whole context first) are marked static, so a CUDA graph reads them in place rather than copying
        them in at each replay; what a call returns is cloned (a graph's outputs live in buffers its next replay
        overwrites: a chain's drafts replay one graph); and new_cache rounds capacities up to STATIC_CAPACITY_STEP
        and hands out one cache per (capacity, layout), its buffers kept (static addresses: a graph writes into
        them), zeroed per request: a cache made later of the same capacity replaces the earlier one."""
        if not ROW_INVARIANT:
            raise ValueError("the static step attends over the cache's whole capacity: it needs "
                             "decode_engine.ROW_INVARIANT (the default).")
        self.static_rows, self.compiled = max_rows, bool(compile)
        steps = (self._extend, self._verify)
        if compile:
            mode = None if compile is True else compile
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, 256)
            config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 1024)
            self.engine.tables.reserve(self.base.config.max_position_embeddings)
            for t in self._static_tensors():
                torch._dynamo.mark_static_address(t)
            steps = tuple(torch.compile(f, mode=mode, dynamic=False, fullgraph=True) for f in steps)
        self._static = steps

    def _static_tensors(self) -> list[torch.Tensor]:
        """Every tensor a static step reads besides its inputs and the cache: weights, norms, RoPE tables."""
        eng, ex = self.engine, self.exit_engine
        blocks = [b for b in eng.blocks + ex.blocks if isinstance(b, Block)]
        products = [p for b in blocks for p in (b.qkv, b.o, b.gate_up, b.down)] + [eng.head, ex.head]
        return ([p.weight for p in products] + [p.bias for p in products if p.bias is not None]
                + [w for b in blocks for w in (b.ln1, b.ln2)] + [eng.norm, ex.norm, eng.embed.weight, eng.tables.cos,
                                                                 eng.tables.sin])

    def _static_fits(self, cache: StaticCache, start: int, t: int, tree: TreeRows | None) -> bool:
        return (self._static is not None and tree is None and t <= self.static_rows and cache.fixed_span
                and (start > 0 or t == 1) and start + t <= cache.capacity)  # prefills stay eager

    def _extend(self, ids: torch.Tensor, cache: StaticCache, start: int | torch.Tensor, with_exit: bool,
                tree: TreeRows | None = None) -> tuple:
        """Embed + shared layers (+ the exit's blocks) on ids (t,) at start.. or at a device tensor's positions (the
        static step, also compiled): (shared states, exit states or None), both (t, hidden)."""
        eng = self.engine
        h = eng.run(eng.blocks[: self.exit.shared_layers], eng.embed(ids), cache, 0, start, tree)
        return h, self.exit_engine.hidden(h, cache, len(eng.blocks), start, eng.tables, tree) if with_exit else None

    def _verify(self, h: torch.Tensor, cache: StaticCache, start: int | torch.Tensor,
                tree: TreeRows | None = None, head: bool = True) -> torch.Tensor | None:
        """The remaining layers, final norm and head on shared states h (t, hidden): logits (t, vocab) (`head`
        False: the layers only; None)."""
        eng, s = self.engine, self.exit.shared_layers
        h = eng.run(eng.blocks[s:], h, cache, s, start, tree)
        return eng.logits(h) if head else None

    def _positions(self, cache: StaticCache, start: int, t: int, device: torch.device) -> torch.Tensor:
        self.engine.tables.reserve(cache.capacity)  # the tables cover the capacity before a static call
        return torch.arange(start, start + t, device=device)

    def _build(self) -> None:
        """The engines of the base and of the exit: re-built if their weights were replaced since (e.g. .to())."""
        self.engine = engine_for(self.base)
        self.exit_engine = exit_engine_for(self.exit)

    def new_cache(self, capacity: int = 256) -> StaticCache:
        """An empty cache for every base layer and the exit's attention blocks, `capacity` positions reserved."""
        self._build()
        slots, eng = len(self.engine.blocks) + self.exit.num_cache_slots, self.engine
        fixed = True if self._static is not None else None  # the static step's fixed shapes; else by device
        if not self.compiled:
            return eng.new_cache(slots, capacity, fixed)
        capacity = -(-max(capacity, 1) // STATIC_CAPACITY_STEP) * STATIC_CAPACITY_STEP
        key = (capacity, slots, eng.kv_heads, eng.head_dim, eng.dtype, str(eng.device))
        cache = self._pool.get(key)
        if cache is None:
            cache = self._pool[key] = eng.new_cache(slots, capacity, fixed)
            torch._dynamo.mark_static_address(cache.k)  # a captured graph writes into these buffers in place
            torch._dynamo.mark_static_address(cache.v)
        else:
            cache.k.zero_(), cache.v.zero_()
            cache.lengths = [0] * slots
        return cache

    def extend(self, input_ids: torch.Tensor, cache: StaticCache, start: int, *, with_exit: bool = True,
               tree: TreeRows | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embed + shared layers (+ the exit's private blocks): (shared states, the state entering the exit norm).
        `tree`: the rows are nodes of a draft tree (their RoPE positions and tree mask)."""
        eng, t = self.engine, input_ids.shape[1]
        if self._static_fits(cache, start, t, tree):
            h, e = self._static[0](input_ids[0], cache, self._positions(cache, start, t, input_ids.device), with_exit)
            if self.compiled:  # a graph's outputs are overwritten by its next replay
                h, e = h.clone(), None if e is None else e.clone()
            n, shared = len(eng.blocks), self.exit.shared_layers
            cache.written(list(range(shared)) + (list(range(n, n + self.exit.num_cache_slots)) if with_exit else []),
                          start + t)
        else:
            h, e = self._extend(input_ids[0], cache, start, with_exit, tree)
        return h.unsqueeze(0), None if e is None else e.unsqueeze(0)

    def verify(self, shared_hidden: torch.Tensor, cache: StaticCache, start: int,
               tree: TreeRows | None = None, head: bool = True) -> torch.Tensor | None:
        """The remaining layers + final norm + LM head on shared states: the target's logits (`head` False: the
        layers only, filling the cache; None)."""
        eng, s, t = self.engine, self.exit.shared_layers, shared_hidden.shape[1]
        if not head:
            return self._verify(shared_hidden[0], cache, start, tree, head=False)
        if self._static_fits(cache, start, t, tree):
            logits = self._static[1](shared_hidden[0], cache, self._positions(cache, start, t, shared_hidden.device))
            logits = logits.clone() if self.compiled else logits
            cache.written(range(s, len(eng.blocks)), start + t)
            return logits.unsqueeze(0)
        return self._verify(shared_hidden[0], cache, start, tree).unsqueeze(0)

    def exit_logits(self, e: torch.Tensor) -> torch.Tensor:
        """The exit norm + head on the exit's states: the draft's full-vocabulary logits."""
        return self.exit_engine.logits(e[0]).unsqueeze(0)

    def describe(self) -> str:
        return "lean (" + engine_for(self.base).describe() + ")"
