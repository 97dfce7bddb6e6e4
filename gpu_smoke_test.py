"""gpu_smoke.py runs its every check on a CPU, small, so the script a GPU session will run cannot rot."""
import json

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
