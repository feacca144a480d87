"""The `taxiway` command line: help lists the commands; generate --chat answers on the CPU."""

import subprocess
import sys

import pytest


def taxiway(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "taxiway.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_help_lists_the_commands():
    out = taxiway("--help")
    assert out.returncode == 0
    for command in ("generate", "serve", "client", "bench"):
        assert command in out.stdout


def test_version():
    from taxiway import __version__

    out = taxiway("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"taxiway {__version__}"


def test_generate_chat_answers_the_capital_of_france(default_model_dir):
    out = taxiway("generate", "What is the capital of France?", "--chat", "--max-tokens", "32", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["generate", "hi", "--max-tokens", "0"], "max_tokens must be at least 1"),
    (["generate", "hi", "--model", "/nonexistent/model"], "neither a folder nor a preset"),
])
def test_generate_reports_bad_input_clearly(args, message, default_model_dir):
    out = taxiway(*args)
    assert out.returncode == 1
    assert message in out.stderr
