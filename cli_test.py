"""Command-line plumbing (cli.py): lengths held to the model, SIGINT / SIGTERM as a clean stop, the resume command."""
import pytest

import cli


# -----------------------------------------------------------------------------
# lengths held to the model's context

def test_check_context_names_the_flag_the_numbers_and_the_limit():
    from transformers import LlamaConfig
    config = LlamaConfig(max_position_embeddings=8192)
    cli.check_context(config, "--seq_len", 8192)
    with pytest.raises(ValueError, match=r"^--seq_len 100000 is more than this model's limit of 8192 positions "
                                         r"\(max_position_embeddings\); use --seq_len 8192 or less\.$"):
        cli.check_context(config, "--seq_len", 100000)
    cli.check_context(config, "--max_new_tokens", 8000, prompt=192)
    with pytest.raises(cli.UsageError, match=r"^--max_new_tokens 9000 plus the longest prompt's 212 tokens needs "
                                                    r"9212 positions, more than this model's limit of 8192 positions "
                                                    r"\(max_position_embeddings\); use --max_new_tokens 7980 or less\.$"):
        cli.check_context(config, "--max_new_tokens", 9000, prompt=212, prompt_name="the longest prompt")
    with pytest.raises(ValueError, match=r"the prompt alone fills it\.$"):
        cli.check_context(config, "--max_new_tokens", 1, prompt=8192)
    cli.check_context(object(), "--seq_len", 10**9)  # a config without a limit: nothing to check


# -----------------------------------------------------------------------------
# SIGINT / SIGTERM

def _stopped(stop, capsys, body):
    """Run body() inside `stop` (entered); return (exit status, the last line printed to stderr)."""
    with pytest.raises(SystemExit) as e:
        with stop:
            body()
    return e.value.code, capsys.readouterr().err.strip().splitlines()[-1]


def test_a_signal_stops_at_once_with_one_line_and_exit_status_130_or_143(capsys, monkeypatch):
    import os
    import signal
    import sys
    monkeypatch.setattr(cli.shutil, "which", lambda name: sys.executable if name == "python" else None)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    old = signal.getsignal(signal.SIGINT)
    done = []

    def work():
        os.kill(os.getpid(), signal.SIGINT)
        done.append("after the signal")  # never reached
    stop = cli.SignalStop("x.py", ["--out_dir", "o d", "--resume"])
    assert _stopped(stop, capsys, work) == (
        130, "x.py: stopped by SIGINT; nothing was kept; start again with: python x.py --out_dir 'o d'")
    assert done == [] and signal.getsignal(signal.SIGINT) is old  # the old handler is back

    def held_work():  # a held block finishes first; a second signal is ignored
        with stop.held():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            done.append("held")
            stop.kept, stop.resumable = "kept step 2", True
        done.append("after the block")  # never reached
    stop = cli.SignalStop("x.py", ["--out_dir", "o"])
    assert _stopped(stop, capsys, held_work) == (
        143, "x.py: stopped by SIGTERM; kept step 2; continue with: python x.py --out_dir o --resume")
    assert done == ["held"]

    def failing_after_a_signal():  # e.g. a collective operation whose peer process stopped
        with stop.held():
            os.kill(os.getpid(), signal.SIGTERM)
            raise RuntimeError("Connection closed by peer")
    stop = cli.SignalStop("x.py", [])
    assert _stopped(stop, capsys, failing_after_a_signal)[0] == 143
    with pytest.raises(RuntimeError):  # without a signal, an error is an error
        with cli.SignalStop("x.py", []):
            raise RuntimeError("boom")


def test_resume_command_names_this_python_or_torchrun(monkeypatch):
    import os
    import sys
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    found = {"python": sys.executable, "torchrun": torchrun}
    monkeypatch.setattr(cli.shutil, "which", lambda name: found.get(name))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli.resume_command("train.py", ["--lr", "1e-3"]) == "python train.py --lr 1e-3 --resume"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cli.resume_command("train.py", ["--lr", "1e-3"]) == (
        "torchrun --nnodes 2 --nproc_per_node 2 train.py --lr 1e-3 --resume")
    found.clear()  # not on the PATH (no active venv): the full path
    assert cli.resume_command("train.py", [], resume=False).startswith(f"{torchrun} --nnodes 2")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cli.resume_command("train.py", []) == f"{sys.executable} train.py --resume"
