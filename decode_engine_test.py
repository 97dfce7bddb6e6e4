"""The lean step against transformers' forward: same logits (float32, 1e-5), same cache behaviour, same weights."""
import pytest
import torch

import decode_engine
from conftest import make_tiny_llama
from truncated_llama import HFSteps, SpecCache, TruncatedLlama
from tuned_llama import EarlyExit


def lean_and_hf(base, layer, exit=None):
    return TruncatedLlama(base, layer, exit, engine="lean"), TruncatedLlama(base, layer, exit, engine="hf")


@pytest.mark.parametrize("tie", [False, True])
def test_lean_step_logits_equal_transformers_forward(tie):
    base = make_tiny_llama(layers=4, tie=tie, init_std=0.1)
    ids = torch.randint(0, 259, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(ids).logits
        lean = TruncatedLlama(base, 2, engine="lean")
        cache = lean.new_cache(capacity=16)  # too small on purpose: the cache must grow
        got = [lean.full_step(ids[:, :7], cache, 0)]
        for i in range(7, 40, 3):  # 3-token steps, as a verify would feed them
            got.append(lean.full_step(ids[:, i:i + 3], cache, i))
    torch.testing.assert_close(torch.cat(got, 1), ref, rtol=0, atol=1e-5)


def test_lean_and_hf_engines_agree_on_every_piece_with_an_adapter_exit():
    base = make_tiny_llama(layers=5, init_std=0.2)
    exit = EarlyExit(base, 3, adapter="block", last_block=True)
    with torch.no_grad():
        for p in exit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 259, (1, 12), generator=torch.Generator().manual_seed(4))
    outs = []
    with torch.no_grad():
        for tl in lean_and_hf(base, 3, exit):
            cache = tl.new_cache()
            prefill = tl.full_step(ids[:, :5], cache, 0, with_exit=True)
            h1, q1 = tl.draft_step(ids[:, 5:6], cache, 5)
            h2, _ = tl.extend(ids[:, 6:7], cache, 6)
            p = tl.verify(torch.cat([h1, h2], 1), cache, 5)
            cache.crop(6)
            h, q = tl.draft_step(ids[:, 6:9], cache, 6)
            outs.append((prefill, q1, p, q, tl.verify(h, cache, 6), [cache.length(i) for i in range(5)]))
    for a, b in zip(*outs):
        if isinstance(a, list):
            assert a == b == [9] * 5
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_one_cache_per_engine_and_the_exit_blocks_after_the_base_layers():
    """The engine is chosen once: the lean steps keep one StaticCache (base layers, then the exit's attention blocks),
    transformers' keep a SpecCache; both crop every layer at once."""
    base = make_tiny_llama(layers=4)
    lean, hf = lean_and_hf(base, 2, EarlyExit(base, 2, adapter="block", last_block=True))
    assert lean.lean and not hf.lean
    assert isinstance(lean.steps, decode_engine.LeanSteps) and isinstance(hf.steps, HFSteps)
    ids = torch.randint(0, 259, (1, 6), generator=torch.Generator().manual_seed(1))
    cache = lean.new_cache(capacity=32)
    assert isinstance(cache, decode_engine.StaticCache) and cache.capacity == 32 and len(cache.lengths) == 4 + 2
    assert isinstance(hf.new_cache(), SpecCache)
    with torch.no_grad():
        lean.full_step(ids[:, :5], cache, 0, with_exit=True)
        assert cache.lengths == [5] * 6
        lean.full_step(ids[:, 5:], cache, 5)  # without the exit: its slots keep their length
    assert cache.lengths == [6, 6, 6, 6, 5, 5]
    cache.crop(3)
    assert [cache.length(i) for i in range(6)] == [3] * 6
    assert lean.describe_engine().startswith("lean (qkv ") and hf.describe_engine() == "hf"


def test_weights_are_shared_not_copied():
    """The lean step re-lays the base's weights out in place: the parameters become views of its fused tensors."""
    base = make_tiny_llama(layers=2)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    nbytes = sum(p.numel() for p in base.parameters())
    engine = decode_engine.engine_for(base)
    qkv = engine.blocks[0].qkv.weight
    attn = base.model.layers[0].self_attn
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.weight.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    assert sum(p.numel() for p in base.parameters()) == nbytes
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert decode_engine.engine_for(base) is engine  # built once


def test_every_product_form_computes_the_same_product():
    w = torch.randn(24, 16)
    stored = {"w": w, "t": w.t().contiguous()}
    for rows in (1, 3):
        x = torch.randn(rows, 16)
        for name, (storage, fn) in decode_engine.FORMS.items():
            if name == "mv" and rows > 1:
                continue
            torch.testing.assert_close(fn(x, stored[storage]), x @ w.t(), rtol=1e-5, atol=1e-6)


def test_forms_are_chosen_by_measurement_per_shape(monkeypatch):
    """The storage and forms come from the timings: a form made to look fastest is picked; row-invariant, one form
    serves every row count: the kernel or F.linear, whichever the timings favour."""
    kernel_cost = {}

    def fake(weights, passes=2, names=None, rows=decode_engine.ROW_BUCKETS):
        times = {name: {m: 1.0 for m in rows} for name in (names or decode_engine.FORMS)}
        if names is None:
            times["mv"] = {1: 0.1}
            times["w@x"][5] = 0.2
        if "kernel" in times:
            times["kernel"] = {m: kernel_cost[m] for m in rows}
        return times
    monkeypatch.setattr(decode_engine, "measure_forms", fake)
    monkeypatch.setattr(decode_engine, "_CHOICES", {})
    monkeypatch.setattr(decode_engine, "ROW_INVARIANT", False)
    kernel_cost.update({1: 2.0, 2: 2.0, 5: 2.0})
    assert decode_engine.choose_forms([torch.randn(7, 5)]) == ("w", {1: "mv", 5: "w@x"})
    monkeypatch.setattr(decode_engine, "ROW_INVARIANT", True)  # the default: one form, whatever is fastest
    assert decode_engine.choose_forms([torch.randn(7, 5)]) == ("w", {1: "linear", 5: "linear"})
    if decode_engine.kernel_serves(torch.randn(7, 5)):
        kernel_cost.update({1: 0.5, 2: 0.5, 5: 0.5})
        assert decode_engine.choose_forms([torch.randn(9, 5)]) == ("w", {1: "kernel", 5: "kernel"})


def test_row_invariant_steps_read_the_whole_capacity_and_pad_short_calls(monkeypatch):
    """A one-token step and a 5-token verify give a token's logits the same bits (bf16; on SmolLM2 in
    test_smollm2_bf16_greedy_is_exact), and a one-row product pads to two rows where one row rounds otherwise."""
    base = make_tiny_llama(layers=4, init_std=0.2).to(torch.bfloat16)
    ids = torch.randint(0, 259, (1, 30), generator=torch.Generator().manual_seed(0))
    tl = TruncatedLlama(base, 2)
    with torch.no_grad():
        cache = tl.new_cache(40)
        tl.full_step(ids[:, :25], cache, 0)
        verify = tl.full_step(ids[:, 25:30], cache, 25)
        cache.crop(25)
        steps = torch.cat([tl.full_step(ids[:, i:i + 1], cache, i) for i in range(25, 30)], 1)
    assert torch.equal(verify, steps)
    assert cache.fixed_span and cache.span(26) == cache.capacity
    calls = []
    monkeypatch.setattr(decode_engine, "one_row_invariant", lambda w: False)  # as if this machine's gemv differed
    monkeypatch.setattr(decode_engine.F, "linear", lambda x, w, *a: calls.append(x.shape[0]) or x @ w.t())
    product = decode_engine.Product([torch.nn.Linear(8, 4, bias=False)], ("w", {1: "linear", 5: "linear"}))
    assert product(torch.randn(1, 8)).shape == (1, 4) and calls == [2]


def test_other_architectures_keep_the_transformers_engine():
    base = make_tiny_llama(layers=2)
    base.config.sliding_window = 4
    assert not decode_engine.supports(base)
    assert not TruncatedLlama(base, 1).lean
    with pytest.raises(ValueError, match="lean engine"):
        TruncatedLlama(base, 1, engine="lean")


@pytest.mark.slow
def test_smollm2_lean_logits_equal_transformers_forward(smollm2):
    base, tok = smollm2
    ids = tok("The lean step must agree with the reference forward on real weights.", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = base(ids).logits
        lean = TruncatedLlama(base, 8, engine="lean")
        cache = lean.new_cache()
        got = torch.cat([lean.full_step(ids[:, :4], cache, 0)]
                        + [lean.full_step(ids[:, i:i + 1], cache, i) for i in range(4, ids.shape[1])], 1)
    # float32 sums in another order: the gap is ~1e-6 of the logits' range (a 1e-5 bound, relative to that range)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.slow
def test_smollm2_bf16_greedy_is_exact():
    """Row-invariant steps (the default): greedy self-speculation equals autoregressive decoding bitwise in bfloat16,
    for a chain, a lookup draft and a verify of several rows. Before them, 4 of 8 ShareGPT prompts parted."""
    from generate import autoregressive_generate, plan, speculative_generate
    from truncated_llama import load_base_model
    if not torch.backends.cpu.get_cpu_capability() or torch.bfloat16 is None:
        pytest.skip("no bf16")
    model, tok = load_base_model("smollm2-135m", dtype=torch.bfloat16)
    tl = TruncatedLlama(model, 3)
    texts = ["Write a short poem about the sea.", "List three uses of a paperclip and explain each one.",
             "Translate into French: the cat sleeps on the warm windowsill every afternoon."]
    for text in texts:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        ar, _ = autoregressive_generate(tl, ids, 40)
        for kw in (dict(gamma=1), dict(gamma=4), dict(gamma=4, draft="lookup"), dict(gamma=1, draft="exit+lookup")):
            sp, _ = speculative_generate(tl, ids, 40, **plan(**kw))
            assert torch.equal(sp, ar), (text, kw)


# ----------------------------------------------------------------------------------------------------------------
# The static step (positions as a device tensor, fixed shapes: capturable as a CUDA graph) and long prefills

STATIC_RUNS = [dict(gamma=3), dict(gamma=2, temperature=1.0, top_p=0.9), dict(gamma=4, draft="lookup"),
               dict(gamma=1, draft="exit+lookup", lookup_tokens=3), dict(gamma=2, tree_width=2)]


def static_outputs(tl, prompt, runs, new=24):
    from generate import autoregressive_generate, plan, speculative_generate
    outs = [autoregressive_generate(tl, prompt, new)[0]]
    for kw in runs:
        outs.append(speculative_generate(tl, prompt, new, **plan(**kw), generator=torch.Generator().manual_seed(0))[0])
    return outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_static_step_run_eagerly_gives_the_default_steps_tokens(dtype):
    """The same numbers, only positions passed as a tensor and keys written by index_copy_: identical tokens in both
    dtypes (greedy, sampled, lookup, trees), and the cache holds the same keys."""
    base = make_tiny_llama(layers=4, init_std=0.2, seed=3).to(dtype)
    prompt = torch.tensor([[5, 17, 5, 17, 40, 5, 17, 9, 5, 17]])
    default, static = TruncatedLlama(base, 2), TruncatedLlama(base, 2)
    static.steps.use_static()
    for a, b in zip(static_outputs(default, prompt, STATIC_RUNS), static_outputs(static, prompt, STATIC_RUNS)):
        assert torch.equal(a, b)


def test_the_compiled_static_step_equals_the_eager_one():
    """torch.compile (fullgraph, static shapes: what mode reduce-overhead captures as CUDA graphs on a GPU) of the
    static step: on a CPU, the same greedy tokens, logits within float32 rounding; prefills stay eager."""
    base = make_tiny_llama(layers=2, init_std=0.2, seed=3)
    prompt = torch.tensor([[5, 17, 5, 17, 40, 5, 17, 9, 5, 17]])
    eager, compiled = TruncatedLlama(base, 1), TruncatedLlama(base, 1)
    eager.steps.use_static()
    compiled.steps.use_static(compile=True, max_rows=4)
    for a, b in zip(static_outputs(eager, prompt, [dict(gamma=2)]), static_outputs(compiled, prompt, [dict(gamma=2)])):
        assert torch.equal(a, b)
    with torch.inference_mode():
        logits = []
        for tl in (eager, compiled):
            cache = tl.new_cache(64)
            tl.full_step(prompt[:, :6], cache, 0)
            logits.append(torch.cat([tl.full_step(prompt[:, 6:9], cache, 6), tl.full_step(prompt[:, 9:], cache, 9)], 1))
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-5)


def test_a_long_prefill_takes_the_causal_kernel_and_agrees(monkeypatch):
    """Prefills from position 0 of FUSED_PREFILL_ROWS tokens or more attend with is_causal and no mask (a fused
    kernel's case on a GPU); their logits agree with the masked path's, and no size^2 table is kept."""
    base = make_tiny_llama(layers=2, init_std=0.2, seed=3)
    ids = torch.randint(0, 259, (1, 40), generator=torch.Generator().manual_seed(0))
    got = {}
    for rows in (10**6, 16):
        monkeypatch.setattr(decode_engine, "FUSED_PREFILL_ROWS", rows)
        tl = TruncatedLlama(base, 1)
        with torch.inference_mode():
            cache = tl.new_cache(64)
            got[rows] = torch.cat([tl.full_step(ids[:, :39], cache, 0), tl.full_step(ids[:, 39:], cache, 39)], 1)
    torch.testing.assert_close(got[16], got[10**6], rtol=0, atol=1e-5)
    assert not hasattr(decode_engine.engine_for(base).tables, "causal")


def test_measuring_forms_times_a_bounded_subset_and_keeps_a_tied_embedding_contiguous(monkeypatch):
    """With measured forms (ROW_INVARIANT off): only the first layers up to TIMED_BYTES are copied for timing, and a
    head tied to the embedding is never stored transposed (the embedding would become a strided view)."""
    monkeypatch.setattr(decode_engine, "ROW_INVARIANT", False)
    base = make_tiny_llama(layers=6, tie=True, seed=2)
    one_layer = sum(w.weight.numel() * 4 for role in decode_engine.Block.ROLES
                    for w in decode_engine.Block.linears(base.model.layers[0], role))
    monkeypatch.setattr(decode_engine, "TIMED_BYTES", 2 * one_layer)
    assert len(decode_engine.timed_layers(base.model.layers, decode_engine.Block.linears)) == 2
    engine = decode_engine.engine_for(base)
    assert engine.head.storage == "w" and base.model.embed_tokens.weight.is_contiguous()
    assert base.lm_head.weight is base.model.embed_tokens.weight


def test_attention_takes_the_path_of_its_device():
    """One decision per call (decode_engine.attention_path), checked per device: a CPU pads short calls over a fixed
    span and masks with enable_gqa (its bits depend on the span: row invariance); a GPU attends with no mask over the
    exact span for a one-token step (flash / cuDNN with GQA) and folds the GQA group into the query rows wherever a
    mask is needed (the memory-efficient kernel takes masks, not enable_gqa); a long prefill is causal anywhere."""
    path, mask = decode_engine.attention_path, torch.ones(3, 8, dtype=torch.bool)
    CAUSAL = decode_engine.CAUSAL
    assert [path("cpu", 1, None, True), path("cpu", 3, mask, True), path("cpu", 5, mask, True),
            path("cpu", 1, None, False), path("cpu", 2048, CAUSAL, True)] == ["padded", "padded", "masked", "masked",
                                                                             "causal"]
    assert [path("cuda", 1, None, False), path("cuda", 5, mask, False), path("cuda", 1, mask, True),
            path("cuda", 2048, CAUSAL, False)] == ["fused", "folded", "folded", "causal"]


@pytest.mark.parametrize("heads,kv_heads,t,span", [(9, 3, 5, 40), (8, 2, 1, 16), (4, 4, 3, 7)])
def test_folded_attention_is_grouped_query_attention(heads, kv_heads, t, span):
    g = torch.Generator().manual_seed(heads * t)
    q, k, v = (torch.randn(n, rows, 16, generator=g) for n, rows in ((heads, t), (kv_heads, span), (kv_heads, span)))
    mask = torch.rand(t, span, generator=g) < 0.6
    mask[:, 0] = True  # every row sees a key
    for m in (mask, None):
        ref = torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=m, scale=0.25,
                                                               enable_gqa=heads != kv_heads)
        got = decode_engine.folded_attention(q, k, v, m, 0.25)
        assert got.shape == ref.shape == (1, heads, t, 16)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    broken = decode_engine.folded_attention(q, k, v, mask.flip(0), 0.25)  # a mask row given to the wrong query
    assert not torch.allclose(broken, torch.nn.functional.scaled_dot_product_attention(
        q[None], k[None], v[None], attn_mask=mask, scale=0.25, enable_gqa=heads != kv_heads)) or t == 1


def test_off_the_cpu_no_fixed_span_and_no_one_row_as_two():
    """Row invariance is a CPU's need: on another device (here `meta`, standing in for a GPU) a cache reads the
    exact span unless the static step asks for a fixed one, and a one-row product is not run as two rows."""
    tl = TruncatedLlama(make_tiny_llama(layers=2), 1, engine="lean")
    tl.new_cache(32)  # builds the engine
    eng = tl.steps.engine
    assert eng.new_cache(2, 32).fixed_span is decode_engine.ROW_INVARIANT
    eng.device = torch.device("meta")
    assert eng.new_cache(2, 32).fixed_span is False and eng.new_cache(2, 32, True).fixed_span is True
    lin = torch.nn.Linear(64, 32, bias=False, device="meta")
    assert decode_engine.Product([lin], decode_engine.ROW_INVARIANT_CHOICE).pad_one is False
