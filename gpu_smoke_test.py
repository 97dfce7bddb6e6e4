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
    assert names == ["machine", "exact_float32", "decode", "step_costs", "prefill_memory", "train_step", "graphs"]
    decode = next(line for line in lines if line["check"].startswith("decode"))["kinds"]
    assert decode["exit_chain_greedy"]["host_reads_per_cycle"] <= 2  # + the generation's own, over few cycles
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
