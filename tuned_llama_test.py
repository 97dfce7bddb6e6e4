"""The exit modules (tuned_llama.py): own tensors, identity-initialised adapters, a pruned head."""

import pytest
import torch

from conftest import make_tiny_llama
from truncated_llama import TruncatedLlama, model_fingerprint
from checkpoints import load_exit, save_exit
from tuned_llama import EarlyExit


@pytest.mark.parametrize("tie", [False, True])
def test_exit_parameters_are_their_own_tensors_and_base_is_untouched(tie):
    base = make_tiny_llama(tie=tie)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    exit = EarlyExit(base, 2, adapter="block", last_block=True)
    base_ptrs = {p.data_ptr() for p in base.parameters()}
    assert all(p.data_ptr() not in base_ptrs for p in exit.parameters())
    assert all(p.requires_grad for p in exit.parameters())
    with torch.no_grad():
        for p in exit.parameters():
            p.add_(1.0)
    tl = TruncatedLlama(base, 2, exit)
    assert not any(p.requires_grad for p in base.parameters())
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert list(tl.exit.parameters()) == list(exit.parameters())


@pytest.mark.parametrize("adapter", ["block", "mlp"])
def test_identity_initialised_adapter_changes_nothing(adapter):
    base = make_tiny_llama(init_std=0.1)
    ids = torch.randint(0, 259, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = TruncatedLlama(base, 2)(ids).exit_logits
        adapted = TruncatedLlama(base, 2, EarlyExit(base, 2, adapter=adapter))(ids).exit_logits
    torch.testing.assert_close(adapted, plain, rtol=0, atol=1e-6)


def test_next_block_adapter_starts_as_the_exit_one_layer_deeper():
    base = make_tiny_llama(init_std=0.1)
    ids = torch.randint(0, 259, (1, 9), generator=torch.Generator().manual_seed(4))
    exit = EarlyExit(base, 2, adapter="block", adapter_init="next")
    assert all(not torch.equal(a, b) for a, b in zip(exit.adapter.parameters(), base.model.layers[1].parameters())
               if a.dim() == 2)  # not block L-1
    with torch.no_grad():
        deeper = TruncatedLlama(base, 3)(ids).exit_logits
        adapted = TruncatedLlama(base, 2, exit)(ids).exit_logits
        identity = TruncatedLlama(base, 2, EarlyExit(base, 2, adapter="block"))(ids).exit_logits
    torch.testing.assert_close(adapted, deeper, rtol=0, atol=1e-5)
    assert (adapted - identity).abs().max() > 1e-2
    with pytest.raises(ValueError, match="adapter_init"):
        EarlyExit(base, 2, adapter="mlp", adapter_init="next")


def test_private_last_block_starts_equal_to_the_shared_one():
    base = make_tiny_llama(init_std=0.1)
    ids = torch.randint(0, 259, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = TruncatedLlama(base, 3)(ids)
        private = TruncatedLlama(base, 3, EarlyExit(base, 3, last_block=True))(ids)
    torch.testing.assert_close(private.exit_logits, plain.exit_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(private.logits, plain.logits, rtol=0, atol=0)


def test_pruned_head_keeps_full_vocabulary_logits_and_round_trips(tmp_path):
    base = make_tiny_llama(init_std=0.1)
    ids = torch.randint(0, 259, (1, 9), generator=torch.Generator().manual_seed(5))
    vocab = torch.tensor([3, 17, 40, 41, 200, 258])
    exit = EarlyExit(base, 2, vocab=vocab)
    assert exit.head.weight.shape == (6, 32) and exit.draft_vocab == 6
    assert torch.equal(exit.head.weight, base.lm_head.weight[vocab])  # initialised from the LM head's rows
    assert exit.head.weight.data_ptr() != base.lm_head.weight.data_ptr()
    with torch.no_grad():
        full = TruncatedLlama(base, 2)(ids).exit_logits
        pruned = TruncatedLlama(base, 2, exit)(ids).exit_logits
    assert pruned.shape == full.shape  # full vocabulary, for the loop and the target's shape
    torch.testing.assert_close(pruned[..., vocab], full[..., vocab], rtol=0, atol=1e-6)
    outside = torch.ones(259, dtype=torch.bool)
    outside[vocab] = False
    assert torch.isneginf(pruned[..., outside]).all()  # q is exactly 0 there
    assert pruned.softmax(-1)[..., outside].sum() == 0
    fp = model_fingerprint(base)
    save_exit(exit, tmp_path / "ck", base_name="tiny", base_fingerprint=fp, trained=["head"])
    loaded, cfg = load_exit(tmp_path / "ck", base, base_fingerprint=fp)
    assert cfg["draft_vocab"] == 6 and torch.equal(loaded.vocab, vocab)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in exit.state_dict().items())
    # a full exit saves no vocabulary, so checkpoints written before pruned heads existed load as before
    assert "vocab" not in EarlyExit(base, 2).state_dict() and EarlyExit(base, 2).config_dict()["draft_vocab"] is None
    with pytest.raises(ValueError, match="distinct token ids"):
        EarlyExit(base, 2, vocab=[1, 1, 2])
    with pytest.raises(ValueError, match="distinct token ids"):
        EarlyExit(base, 2, vocab=[1, 259])




def test_exit_is_built_on_the_base_models_device_in_its_dtype():
    """Head and adapter are made where the base lives: under a base on the meta device no tensor of the exit holds
    memory anywhere, so an 8B head is never materialised on the host first. A seed draws the same random head and MLP
    adapter whatever the dtype (drawn in float32, then rounded)."""
    meta = make_tiny_llama().to("meta")
    for adapter in ("block", "mlp"):
        exit = EarlyExit(meta, 2, adapter=adapter, last_block=True, head_init="random", vocab=[1, 5, 7])
        assert all(t.device.type == "meta" for t in (*exit.parameters(), *exit.buffers()))
    torch.manual_seed(0)
    e16 = EarlyExit(make_tiny_llama().to(torch.bfloat16), 2, adapter="mlp", head_init="random")
    torch.manual_seed(0)
    e32 = EarlyExit(make_tiny_llama(), 2, adapter="mlp", head_init="random")
    assert all(p.dtype == torch.bfloat16 for p in e16.parameters())
    assert all(torch.equal(a, b.to(torch.bfloat16)) for a, b in zip(e16.parameters(), e32.parameters()))
