"""gpu_smoke.py runs its every check on a CPU, small, so the script a GPU session will run cannot rot."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpu_smoke


def test_the_smoke_script_passes_every_check_on_a_cpu(capsys):
    status = gpu_smoke.main(["--device", "cpu", "--shape", "tiny", "--prompts", "1", "--new_tokens", "16",
                             "--prefill", "256"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert status == 0, [line for line in lines if not line["ok"]]
    names = [line["check"].split(":")[0] for line in lines]
    assert names == ["machine", "decode", "step_costs", "prefill_memory", "exact_float32", "train_step", "graphs"]
    assert all(line["seconds"] <= line["limit_s"] == gpu_smoke.LIMITS[name] for line, name in zip(lines, names))
    decode = next(line for line in lines if line["check"].startswith("decode"))["kinds"]
    assert decode["exit_chain_greedy"]["host_reads_per_cycle"] <= 2  # + the generation's own, over few cycles
    assert all(k == "autoregressive" or v["speedup_vs_autoregressive"] > 0 for k, v in decode.items())
    exact = next(line for line in lines if line["check"].startswith("exact_float32"))
    assert exact["first_divergence"] == {} and all(exact["equal"].values())
    graphs = next(line for line in lines if line["check"].startswith("graphs"))
    assert graphs["graphs_compiled"] > 0 and set(graphs["compiled_step"]["v"]) == {"2", "4", "8"}
    assert set(next(line for line in lines if line["check"].startswith("step_costs"))["v"]) == {
        "2", "4", "8", "16", "32", "64"}


def test_a_failing_check_is_reported_and_the_others_still_run(capsys, monkeypatch):
    monkeypatch.setattr(gpu_smoke, "step_costs", lambda *a: 1 / 0)
    status = gpu_smoke.main(["--device", "cpu", "--shape", "tiny", "--prompts", "1", "--new_tokens", "8",
                             "--prefill", "64", "--skip", "graphs", "exact_float32", "train_step"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert status == 1
    assert [(line["check"].split(":")[0], line["ok"]) for line in lines] == [
        ("machine", True), ("decode", True), ("step_costs", False), ("prefill_memory", True)]
    assert "ZeroDivisionError" in lines[2]["error"]


@pytest.mark.parametrize("argv,says", [
    (["--prompts", "0"], "--prompts"), (["--skip", "decoding"], "--skip"),
    pytest.param(["--device", "cuda"], "--device cuda: no CUDA GPU is available.",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU"))])
def test_bad_input_is_one_sentence_and_exit_2(argv, says):
    run = subprocess.run([sys.executable, "gpu_smoke.py", *argv], capture_output=True, text=True,
                         cwd=Path(gpu_smoke.__file__).parent)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("gpu_smoke.py: error:") and says in run.stderr


def test_the_gpu_checks_exclude_the_math_attention_kernel():
    import torch

    import gpu_smoke
    assert set(gpu_smoke.FUSED_ONLY) == {"decode", "step_costs", "prefill_memory"}
    with gpu_smoke.fused_attention_only(torch.device("cuda")):
        assert not torch.backends.cuda.math_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.math_sdp_enabled()
    with gpu_smoke.fused_attention_only(torch.device("cpu")):  # a CPU keeps every kernel
        assert torch.backends.cuda.math_sdp_enabled()


def test_a_check_past_its_time_limit_is_reported_and_the_run_goes_on(capsys):
    import time
    assert gpu_smoke.check("slow", lambda: time.sleep(3) or {}, limit=1) is False
    assert gpu_smoke.check("quick", lambda: {"x": 1}, limit=5) is True
    slow, quick = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert slow["ok"] is False and "over its 1 s limit" in slow["error"] and slow["seconds"] < 2.5
    assert quick == {"check": "quick", "ok": True, "seconds": quick["seconds"], "limit_s": 5, "x": 1}


def test_first_divergence_names_the_position_and_the_margin():
    model = gpu_smoke.random_model("tiny", "cpu", torch.float32, seed=1)
    prompt = torch.tensor([[5, 6, 7]])
    want = torch.tensor([10, 11, 12, 13])
    d = gpu_smoke.first_divergence(model, prompt, want, torch.tensor([10, 11, 99, 13]))
    with torch.no_grad():
        top = model(torch.tensor([[5, 6, 7, 10, 11]])).logits[0, -1].topk(2).values
    assert d == {"at": 2, "margin": round(float(top[0] - top[1]), 6)}
