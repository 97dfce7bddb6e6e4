"""Our CPU product (linear_kernel.py): exact to float32 / bf16 rounding, each row's bits independent of the other rows
on every instruction-set path this CPU runs, the engine using it without padding, and torch's products as the
fallback where it cannot be built."""
import copy

import pytest
import torch
import torch.nn.functional as F

import decode_engine
import linear_kernel
from conftest import make_tiny_llama
from generate import autoregressive_generate, plan, speculative_generate
from truncated_llama import TruncatedLlama

needs_kernel = pytest.mark.skipif(not linear_kernel.available(), reason="linear_kernel not built here")
PATHS = linear_kernel.paths()
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)]
# (N, K): tails of K past every vector width (8, 16, 32), N past the panel of 16 rows, a K below one vector
SHAPES = [(37, 19), (5, 3), (33, 45), (70, 200), (16, 64), (9, 1031)]


def cases():
    for path in PATHS:
        for xd, wd in DTYPES:
            if path != "avx512bf16" or xd == wd == torch.bfloat16:  # the dot-product path takes bf16 x and W only
                yield path, xd, wd


@needs_kernel
@pytest.mark.parametrize("path,xd,wd", list(cases()))
def test_the_kernel_matches_a_float64_reference(path, xd, wd):
    g = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        w = torch.randn(n, k, generator=g).to(wd)
        x = torch.randn(7, k, generator=g).to(xd)
        y = linear_kernel.linear(x, w, path)
        assert y.dtype == xd and y.shape == (7, n)
        ref = x.double() @ w.double().t()
        # float32 sums over k of float32 (or exact bf16 x bf16) products; a bf16 y is also rounded once at the end
        bound = (2**-8 if xd == torch.bfloat16 else 1e-6 * k ** 0.5) * ref.abs().max()
        assert (y.double() - ref).abs().max() <= bound, (n, k)


@needs_kernel
@pytest.mark.parametrize("path,xd,wd", list(cases()))
def test_a_rows_bits_do_not_depend_on_the_other_rows(path, xd, wd):
    """Every row count 1-16, 17-70 (past the kernel's 64-row sweep) and rows in another company: the same bits."""
    g = torch.Generator().manual_seed(1)
    for n, k in SHAPES:
        w = torch.randn(n, k, generator=g).to(wd)
        x = torch.randn(70, k, generator=g).to(xd)
        alone = torch.cat([linear_kernel.linear(x[i:i + 1], w, path) for i in range(70)])
        for rows in [*range(1, 17), 17, 33, 64, 65, 70]:
            assert torch.equal(linear_kernel.linear(x[:rows].contiguous(), w, path), alone[:rows]), (n, k, rows)
        shuffled = torch.randperm(70, generator=g)[:11]
        assert torch.equal(linear_kernel.linear(x[shuffled].contiguous(), w, path), alone[shuffled])


@needs_kernel
def test_paths_the_cpu_cannot_run_and_bad_tensors_are_refused():
    x, w = torch.randn(2, 8), torch.randn(3, 8)
    if "avx512bf16" in PATHS:
        with pytest.raises(RuntimeError, match="bfloat16 x and W"):
            linear_kernel.linear(x, w, "avx512bf16")
    with pytest.raises(RuntimeError, match="contiguous"):
        linear_kernel.linear(torch.randn(8, 2).t(), w)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        linear_kernel.linear(x.double(), w.double())
    assert linear_kernel.linear(x[:0], w).shape == (0, 3)


@pytest.fixture
def no_kernel(monkeypatch):
    """As on a machine where the build fails (no compiler): the state reset, the build raising."""
    def fail():
        raise RuntimeError("Error building extension 'linear_kernel': c++: command not found")
    monkeypatch.setattr(linear_kernel, "_state", {})
    monkeypatch.setattr(linear_kernel, "_load", fail)
    monkeypatch.setattr(decode_engine, "_CHOICES", {})


def test_without_a_compiler_torchs_products_serve_and_it_is_said_once(no_kernel, capsys):
    assert not linear_kernel.available() and not linear_kernel.available()
    err = capsys.readouterr().err
    assert err.count("linear_kernel: not used") == 1 and "command not found" in err and "Traceback" not in err
    base = make_tiny_llama(layers=4, init_std=0.2, seed=3)
    prompt = torch.randint(0, 259, (1, 9), generator=torch.Generator().manual_seed(0))
    ref = base.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, 9:]
    tl = TruncatedLlama(base, 2)
    assert "kernel" not in tl.describe_engine()
    assert torch.equal(speculative_generate(tl, prompt, 16, **plan(gamma=3))[0], ref)


def test_linear_kernel_off_is_taken_at_its_word(monkeypatch, capsys):
    monkeypatch.setattr(linear_kernel, "_state", {})
    monkeypatch.setenv(linear_kernel.ENV, "off")
    assert not linear_kernel.available() and linear_kernel.unavailable_reason() == f"${linear_kernel.ENV}=off"
    assert capsys.readouterr().err == ""  # asked for: nothing to say
    monkeypatch.setattr(linear_kernel, "_state", {})
    monkeypatch.setenv(linear_kernel.ENV, "sse")
    assert not linear_kernel.available() and "is not one of" in capsys.readouterr().err


@pytest.fixture
def kernel_everywhere(monkeypatch):
    if not linear_kernel.available():
        pytest.skip("linear_kernel not built here")
    monkeypatch.setattr(decode_engine, "KERNEL", "kernel")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_engine_takes_the_kernel_and_pads_nothing(kernel_everywhere, monkeypatch, dtype):
    """Every product on the kernel, no one-row-as-two padding: F.linear is never called for 1..64 rows; greedy self-
    speculation equals autoregressive decoding bitwise in both dtypes (and `generate` in float32)."""
    base = make_tiny_llama(layers=6, init_std=0.2, seed=3, tie=dtype == torch.bfloat16).to(dtype)
    prompt = torch.randint(0, 259, (1, 9), generator=torch.Generator().manual_seed(0))
    ref = base.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False)[0, 9:]
    tl = TruncatedLlama(base, 2)
    engine = decode_engine.engine_for(base)
    products = [p for b in engine.blocks for p in (b.qkv, b.o, b.gate_up, b.down)] + [engine.head]
    assert all(p.forms == decode_engine.KERNEL_CHOICE[1] and not p.pad_one for p in products)
    linear = F.linear
    monkeypatch.setattr(decode_engine.F, "linear", lambda x, w, *a: pytest.fail("F.linear called") if x.shape[0] <= 64
                        else linear(x, w, *a))
    ar, _ = autoregressive_generate(tl, prompt, 24)
    if dtype == torch.float32:
        assert torch.equal(ar, ref)
    for kw in (dict(gamma=1), dict(gamma=4), dict(gamma=16), dict(gamma=3, draft="lookup"), dict(gamma=2, tree_width=2),
               dict(gamma=1, draft="exit+lookup", lookup_tokens=3)):
        assert torch.equal(speculative_generate(tl, prompt, 24, **plan(**kw))[0], ar), kw


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_smollm2_greedy_on_the_kernel_equals_autoregressive_and_generate(kernel_everywhere, smollm2, dtype):
    """SmolLM2 with every product on the kernel: greedy self-speculation (a chain, a tree, lookup) equals our
    autoregressive decoding token for token in both dtypes, and transformers' generate in float32."""
    base, tok = smollm2
    base = copy.deepcopy(base).to(dtype)  # the session's model stays as it is
    tl = TruncatedLlama(base, 8)
    assert "lm_head w:kernel/kernel" in tl.describe_engine()
    for text in ("Write a short poem about the sea.", "List three uses of a paperclip and explain each one."):
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        ar, _ = autoregressive_generate(tl, ids, 32)
        if dtype == torch.float32:
            ref = base.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, ids.shape[1]:]
            assert torch.equal(ar, ref), text
        for kw in (dict(gamma=4), dict(gamma=2, tree_width=2), dict(gamma=4, draft="lookup")):
            assert torch.equal(speculative_generate(tl, ids, 32, **plan(**kw))[0], ar), (text, kw)
