"""benchmark_torch_compile: the torch.compile'd lean block computes what decode_engine.Block computes (float32); the
training-step benchmark prints its side-by-side ratio."""
import pytest
import torch

import benchmark_torch_compile as btc
import decode_engine
from conftest import make_tiny_llama
from train_test import tiny_dir  # noqa: F401  (fixture)


@pytest.mark.parametrize("compiled", [False, True], ids=["plain_step", "torch_compile"])
def test_compiled_block_equals_the_eager_block(compiled):
    base = make_tiny_llama(layers=2, init_std=0.1)
    engine = decode_engine.engine_for(base)
    block = engine.blocks[1]
    other = btc.CompiledBlock(block, btc.compiled_step(engine.device) if compiled else btc.plain_step)
    x = torch.randn(12, base.config.hidden_size, generator=torch.Generator().manual_seed(0))
    # caches over the committed prefix (the compiled step's own span); row-invariant ones: the greedy tests
    new_cache = lambda: decode_engine.StaticCache(2, engine.kv_heads, engine.head_dim, 16, engine.dtype,
                                                  engine.device, fixed_span=False)
    eager_cache, other_cache = new_cache(), new_cache()
    with torch.inference_mode():
        # the prompt goes in eagerly (the compiler specialises start=0; one graph serves the steps below)
        cos, sin, mask = engine.tables.at(0, 3)
        for cache in (eager_cache, other_cache):
            block(x[:3], cache, 1, 0, cos, sin, mask)
        for start, t in ((3, 4), (7, 5)):  # verify-sized steps at new positions and lengths
            cos, sin, mask = engine.tables.at(start, t)
            want = block(x[start:start + t], eager_cache, 1, start, cos, sin, mask)
            got = other(x[start:start + t], other_cache, 1, start, cos, sin, mask)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert other_cache.lengths == eager_cache.lengths == [0, 12]
    for name in ("k", "v"):
        torch.testing.assert_close(getattr(other_cache, name)[1, :, :12], getattr(eager_cache, name)[1, :, :12],
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("vocab", ["0", "100"])
def test_benchmark_prints_a_side_by_side_ratio(tiny_dir, capsys, vocab):
    ratio = btc.main(["--model", str(tiny_dir), "--exit_layer", "3", "--batch_size", "2", "--seq_len", "16",
                      "--train_step", "--draft_vocab", vocab, "--dtype", "float32"])
    out = capsys.readouterr().out
    assert ratio > 0 and f"ratio {ratio:.2f} (median of 5 side-by-side pairs" in out


def test_exits_benchmark_times_a_shared_pass_against_separate_runs(tiny_dir, capsys):
    res = btc.main(["--model", str(tiny_dir), "--batch_size", "2", "--seq_len", "16", "--exits", "1", "3",
                    "--draft_vocab", "64", "--dtype", "float32"])
    out = capsys.readouterr().out.splitlines()
    assert sorted(res) == [1, 3] and all(t > 0 and s > 0 for t, s in res.values())
    assert out[0].startswith("1 exit(s) at layers 2: one shared base pass") and \
        out[1].startswith("3 exit(s) at layers 2, 3, 4: one shared base pass") and "3 separate runs" in out[1]
