"""Checkpoints (checkpoints.py): exits round-trip through safetensors, another model or layer is refused, writes are
atomic."""
import copy

import pytest
import torch

import checkpoints
from checkpoints import CheckpointError, load_exit, save_exit, write_dir_atomically
from conftest import make_tiny_llama
from truncated_llama import TruncatedLlama, model_fingerprint
from tuned_llama import EarlyExit


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
    old = checkpoints._dtype_bound_fingerprint(base)
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
