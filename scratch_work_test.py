"""scratch_work.py: --device (a missing GPU is one sentence, exit 2), and the model, the prompt and both sampling
generators on that one device (generate.py refuses a CPU generator next to GPU tensors)."""
import pytest
import torch

import scratch_work
from cli import UsageError, resolve_device
from train_test import tiny_dir  # noqa: F401 (fixture: a tiny model saved like a real one)

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UsageError, match="--device: expected one of auto, cpu, cuda, got 'tpu'"):
        resolve_device("tpu")


@NO_GPU
def test_resolve_device_without_a_gpu():
    with pytest.raises(UsageError, match=r"^--device cuda: no CUDA GPU is available\.$"):
        resolve_device("cuda")


@pytest.mark.parametrize("device,says", [
    pytest.param("cuda", "scratch_work.py: error: --device cuda: no CUDA GPU is available.", marks=NO_GPU),
    ("tpu", "scratch_work.py: error: argument --device: invalid choice: 'tpu'"),
])
def test_bad_device_is_one_sentence_exit_2(tiny_dir, capsys, device, says):
    with pytest.raises(SystemExit) as e:
        scratch_work.main(["hi", "--model", str(tiny_dir), "--exit_layer", "2", "--device", device])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith(says) and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("temperature", ["0", "0.8"])
def test_generators_live_on_the_models_device(tiny_dir, capsys, monkeypatch, temperature):
    seen = []

    def spy(fn):
        def wrapped(model, ids, *a, generator=None, **k):
            seen.append((fn.__name__, generator.device, ids.device, model.base.device))
            return fn(model, ids, *a, generator=generator, **k)
        return wrapped

    for name in ("speculative_generate", "autoregressive_generate"):
        monkeypatch.setattr(scratch_work, name, spy(getattr(scratch_work, name)))
    scratch_work.main(["Tell me about the sea.", "--model", str(tiny_dir), "--exit_layer", "2", "--gamma", "3",
                       "--max_new_tokens", "12", "--temperature", temperature, "--dtype", "float32",
                       "--device", "cpu", "--no_color"])
    out = capsys.readouterr().out
    assert [s[0] for s in seen] == ["speculative_generate", "autoregressive_generate"] * 2  # warm-up, then timed
    assert all(g == ids == m == torch.device("cpu") for _, g, ids, m in seen)
    assert "--- accepted drafts per cycle" in out
    assert ("greedy output identical to autoregressive: True" in out) == (temperature == "0")
    speed = out.splitlines()[-1]
    assert speed.startswith("--- speed on this prompt: ") and " autoregressive: " in speed and "NaN" not in out
