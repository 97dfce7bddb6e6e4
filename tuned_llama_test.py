"""The exit modules (tuned_llama.py): own tensors, identity-initialised adapters, atomic safetensors checkpoints."""
import copy

import pytest
import torch

from conftest import make_tiny_llama
from truncated_llama import TruncatedLlama, model_fingerprint
import tuned_llama
from tuned_llama import CheckpointError, EarlyExit, load_exit, save_exit, write_dir_atomically


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


def test_checkpoint_round_trip_and_refusals(tmp_path):
    base = make_tiny_llama()
    exit = EarlyExit(base, 2, adapter="mlp")
    with torch.no_grad():
        exit.head.weight.add_(1.0)
    fp = model_fingerprint(base)
    save_exit(exit, tmp_path / "ck", base_name="tiny", base_fingerprint=fp, trained=["head"], extra={"step": 7})
    loaded, cfg = load_exit(tmp_path / "ck", base, base_fingerprint=fp)
    assert cfg["step"] == 7 and cfg["exit_layer"] == 2 and cfg["adapter"] == "mlp"
    for k, v in exit.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    other = make_tiny_llama(seed=1)
    with pytest.raises(CheckpointError, match="--exit_ckpt"):
        load_exit(tmp_path / "ck", other, base_fingerprint=model_fingerprint(other))
    with pytest.raises(CheckpointError, match="exit layer 2, not 3"):
        load_exit(tmp_path / "ck", base, exit_layer=3)
    with pytest.raises(CheckpointError, match="not an exit checkpoint"):
        load_exit(tmp_path / "missing", base)
    (tmp_path / "ck" / "exit.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_exit(tmp_path / "ck", base)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary directories left behind


@pytest.mark.parametrize("adapter", ["block", "mlp"])
def test_exit_trained_in_one_dtype_loads_on_a_base_of_the_other(tmp_path, adapter):
    fp32 = make_tiny_llama()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    other = {torch.float32: make_tiny_llama(seed=1)}
    other[torch.bfloat16] = copy.deepcopy(other[torch.float32]).to(torch.bfloat16)
    assert model_fingerprint(fp32) == model_fingerprint(bf16)
    assert model_fingerprint(other[torch.float32]) == model_fingerprint(other[torch.bfloat16]) != model_fingerprint(fp32)
    ids = torch.randint(0, 259, (1, 7), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    for src, dst in ((fp32, bf16), (bf16, fp32)):
        exit = EarlyExit(src, 2, adapter=adapter, last_block=True)
        with torch.no_grad():
            for p in exit.parameters():
                p.add_(0.01 * torch.randn_like(p))  # "trained": no longer a copy of the base
        ck = tmp_path / f"{src.dtype}".replace("torch.", "")
        save_exit(exit, ck, base_name="tiny", base_fingerprint=model_fingerprint(src), trained=["head", "adapter"])
        loaded, _ = load_exit(ck, dst, base_fingerprint=model_fingerprint(dst))
        dtype = dst.lm_head.weight.dtype
        for k, v in exit.state_dict().items():  # the base's dtype, the saved values
            assert loaded.state_dict()[k].dtype == dtype and torch.equal(loaded.state_dict()[k], v.to(dtype)), k
        with torch.no_grad():
            assert TruncatedLlama(dst, 2, loaded)(ids).exit_logits.dtype == dtype
        with pytest.raises(CheckpointError, match="trained on base model 'tiny'"):
            load_exit(ck, other[dtype], base_fingerprint=model_fingerprint(other[dtype]))


def test_checkpoint_with_the_older_dtype_bound_fingerprint_still_loads_on_its_base(tmp_path):
    base, other = make_tiny_llama(), make_tiny_llama(seed=1)
    old = tuned_llama._dtype_bound_fingerprint(base)
    assert old != model_fingerprint(base)
    save_exit(EarlyExit(base, 2), tmp_path / "ck", base_name="tiny", base_fingerprint=old)
    load_exit(tmp_path / "ck", base, base_fingerprint=model_fingerprint(base))
    with pytest.raises(CheckpointError, match="trained on base model"):
        load_exit(tmp_path / "ck", other, base_fingerprint=model_fingerprint(other))


def test_atomic_write_keeps_the_old_directory_when_writing_fails(tmp_path):
    out = tmp_path / "ck"
    write_dir_atomically(out, lambda tmp: (tmp / "a.txt").write_text("old"))
    (out / "checkpoints").mkdir()  # older step checkpoints sit in subfolders and are carried over

    def crash(tmp):
        (tmp / "a.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_dir_atomically(out, crash)
    assert (out / "a.txt").read_text() == "old"
    write_dir_atomically(out, lambda tmp: (tmp / "a.txt").write_text("new"))
    assert (out / "a.txt").read_text() == "new" and (out / "checkpoints").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary directories left behind


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


def test_pruned_checkpoint_refusals(tmp_path):
    import json

    from safetensors.torch import load_file, save_file
    base = make_tiny_llama()
    save_exit(EarlyExit(base, 2, vocab=torch.arange(10)), tmp_path / "ck", base_name="tiny", base_fingerprint="x")
    state = load_file(str(tmp_path / "ck" / "exit.safetensors"))
    duplicate = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 8])
    save_file({**state, "vocab": duplicate}, str(tmp_path / "ck" / "exit.safetensors"))
    with pytest.raises(CheckpointError, match="pruned head's vocabulary"):
        load_exit(tmp_path / "ck", base)
    save_file(state, str(tmp_path / "ck" / "exit.safetensors"))
    cfg = json.loads((tmp_path / "ck" / "exit_config.json").read_text())
    (tmp_path / "ck" / "exit_config.json").write_text(json.dumps({**cfg, "draft_vocab": 12}))
    with pytest.raises(CheckpointError, match="do not fit"):  # 10 rows saved, 12 announced
        load_exit(tmp_path / "ck", base)
    (tmp_path / "ck" / "exit_config.json").write_text(json.dumps({**cfg, "draft_vocab": None}))
    with pytest.raises(CheckpointError, match="do not fit"):  # a pruned head's weights under a full exit's config
        load_exit(tmp_path / "ck", base)
