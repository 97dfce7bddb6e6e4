"""TruncatedLlama: one pass gives teacher and draft; nothing is copied or changed in the base."""
import pytest
import torch

from conftest import make_tiny_llama
from truncated_llama import ModelLoadError, TruncatedLlama, load_base_model, model_fingerprint
from tuned_llama import EarlyExit


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("layer", [1, 2, 3])
def test_one_pass_gives_full_and_exit_logits(tie, layer):
    base = make_tiny_llama(tie=tie, init_std=0.1)
    ids = torch.randint(0, 259, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(ids, output_hidden_states=True)
        out = TruncatedLlama(base, layer)(ids)
        want_exit = base.lm_head(base.model.norm(ref.hidden_states[layer]))
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.exit_logits, want_exit, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.exit_hidden, ref.hidden_states[layer], rtol=0, atol=1e-6)


def test_padding_mask_matches_base_forward():
    base = make_tiny_llama(init_std=0.1)
    ids = torch.randint(0, 259, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    with torch.no_grad():
        ref = base(ids, attention_mask=mask).logits
        out = TruncatedLlama(base, 2)(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], rtol=0, atol=1e-6)


def test_base_pass_is_the_one_pass_forward_without_the_exit():
    """base_pass gives the states the forward builds on: the shared state, the final norm, every residual state."""
    base = make_tiny_llama(init_std=0.1)
    tl = TruncatedLlama(base, 3, EarlyExit(base, 3, last_block=True))
    ids = torch.randint(0, 259, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = tl(ids, all_hidden_states=True)
        p = tl.base_pass(ids)
        every = tl.base_pass(ids, torch.ones_like(ids), all_hidden_states=True)  # no padding: a plain causal mask
        shared = tl.base_pass(ids, stop_at_shared=True, all_hidden_states=True)
        assert torch.equal(tl(ids, torch.ones_like(ids)).logits, out.logits)
    assert torch.equal(p.shared, out.exit_hidden) and torch.equal(base.lm_head(p.final), out.logits)
    assert p.hidden_states is None and len(every.hidden_states) == 5 and torch.equal(every.shared, p.shared)
    assert all(torch.equal(a, b) for a, b in zip(every.hidden_states, out.hidden_states))
    assert shared.final is None and len(shared.hidden_states) == tl.shared_layers + 1 == 3
    assert torch.equal(shared.shared, p.shared) and torch.equal(shared.hidden_states[-1], p.shared)
    mask, position_ids, _ = p.ctx
    assert torch.equal(position_ids, torch.arange(9).unsqueeze(0))
    assert (mask is None) == (tl.context(p.shared, torch.ones_like(ids))[0] is None)


@pytest.mark.parametrize("layer", [0, 4, -1, 2.0])
def test_exit_layer_out_of_range_names_the_range(layer):
    base = make_tiny_llama(layers=4)
    with pytest.raises(ValueError, match=r"1\.\.3"):
        TruncatedLlama(base, layer)


@pytest.mark.parametrize("kw", [{}, dict(adapter="block"), dict(adapter="mlp"), dict(last_block=True),
                                dict(last_block=True, adapter="block")])
def test_incremental_pieces_equal_one_pass(kw):
    """draft_step / extend / verify over a shared cache, with a crop in between, reproduce the one-pass logits."""
    base = make_tiny_llama(layers=5, init_std=0.2)
    exit = EarlyExit(base, 3, **kw)
    with torch.no_grad():
        for p in exit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tl = TruncatedLlama(base, 3, exit)
    ids = torch.randint(0, 259, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = tl(ids)
        cache = tl.new_cache()
        prefill = tl.full_step(ids[:, :5], cache, 0, with_exit=True)
        h1, q1 = tl.draft_step(ids[:, 5:6], cache, 5)
        h2, q2 = tl.draft_step(ids[:, 6:7], cache, 6)
        h3, _ = tl.extend(ids[:, 7:8], cache, 7)
        p = tl.verify(torch.cat([h1, h2, h3], 1), cache, 5)
        assert [cache.length(i) for i in range(5)] == [8] * 5
        cache.crop(6)  # reject from position 6 on
        assert [cache.length(i) for i in range(5)] == [6] * 5
        h, q = tl.draft_step(ids[:, 6:9], cache, 6)
        p2 = tl.verify(h, cache, 6)
    close = dict(rtol=0, atol=2e-5)
    torch.testing.assert_close(prefill, ref.logits[:, :5], **close)
    torch.testing.assert_close(torch.cat([q1, q2], 1), ref.exit_logits[:, 5:7], **close)
    torch.testing.assert_close(p, ref.logits[:, 5:8], **close)
    torch.testing.assert_close(q, ref.exit_logits[:, 6:9], **close)
    torch.testing.assert_close(p2, ref.logits[:, 6:9], **close)


def test_missing_model_path_is_one_clear_sentence(tmp_path):
    with pytest.raises(ModelLoadError, match="--model: no model directory"):
        load_base_model(str(tmp_path / "nope"))


def test_local_directory_loads_unchanged(tmp_path, tiny_tokenizer):
    base = make_tiny_llama()
    base.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    model, tok = load_base_model(str(tmp_path / "m"))
    assert model_fingerprint(model) == model_fingerprint(base)
    # the fingerprint names the model, not its dtype: a bfloat16 load is the same base, another model is not
    half, _ = load_base_model(str(tmp_path / "m"), dtype=torch.bfloat16)
    assert half.lm_head.weight.dtype == torch.bfloat16 and model_fingerprint(half) == model_fingerprint(base)
    assert model_fingerprint(make_tiny_llama(seed=1)) != model_fingerprint(base)
    assert tok.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(smollm2):
    model, tok = smollm2
    assert model.config.num_hidden_layers == 30
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=20, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
