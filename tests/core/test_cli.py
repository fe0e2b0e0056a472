"""The mantis-llm command line: error paths in-process, the real entry points in subprocesses,
and the happy path against the fal emulator."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mantis_llm.cli import main

FAL_ENV = ("FAL_KEY", "FAL_KEY_ID", "FAL_KEY_SECRET", "FAL_QUEUE_URL", "FAL_RUN_URL")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in FAL_ENV:
        monkeypatch.delenv(name, raising=False)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_missing_fal_key(capsys, image_files):
    code, out, err = run(capsys, "ask", str(image_files[0]), "--prompt", "hi")
    assert code == 2 and out == ""
    line = one_line(err)
    assert line.startswith("error: FAL_KEY is not set") and "export FAL_KEY=..." in line


def test_key_id_and_secret_count_as_a_key(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FAL_KEY_ID", "id")
    monkeypatch.setenv("FAL_KEY_SECRET", "secret")
    code, _, err = run(capsys, "ask", str(tmp_path / "nope.png"), "--prompt", "hi")
    assert code == 2 and "FAL_KEY" not in err and "image file not found" in err


def test_missing_image_file(capsys, monkeypatch, tmp_path, image_files):
    monkeypatch.setenv("FAL_KEY", "dummy-secret")
    missing = tmp_path / "missing.png"
    code, out, err = run(capsys, "ask", str(image_files[0]), str(missing), "--prompt", "hi")
    assert code == 2 and out == ""
    assert one_line(err) == f"error: image 2: image file not found: {missing}"
    assert "dummy-secret" not in err


def test_unsupported_scheme(capsys, monkeypatch):
    monkeypatch.setenv("FAL_KEY", "dummy")
    code, _, err = run(capsys, "ask", "ftp://example.com/x.png", "--prompt", "hi")
    assert code == 2 and one_line(err).startswith("error: image 1: unsupported image URL scheme in 'ftp://example.com/x.png'")


def test_bad_backend_name(capsys, image_files):
    code, out, err = run(capsys, "ask", str(image_files[0]), "--prompt", "hi", "--backend", "openai")
    assert code == 2 and out == ""
    assert "invalid choice: 'openai'" in err and "Traceback" not in err


def test_no_images(capsys):
    code, _, err = run(capsys, "ask", "--prompt", "hi")
    assert code == 2 and "the following arguments are required: IMAGE" in err


def test_no_prompt_and_no_command(capsys, image_files):
    code, _, err = run(capsys, "ask", str(image_files[0]))
    assert code == 2 and "--prompt" in err
    code, _, err = run(capsys)
    assert code == 2 and "COMMAND" in err


def test_invalid_generation_params(capsys, monkeypatch, image_files):
    monkeypatch.setenv("FAL_KEY", "dummy")
    code, _, err = run(capsys, "ask", str(image_files[0]), "--prompt", "hi", "--max-tokens", "0")
    assert code == 2 and one_line(err) == "error: max_tokens=0 is invalid: must be at least 1"
    code, _, err = run(capsys, "ask", str(image_files[0]), "--prompt", "hi", "--temperature", "hot")
    assert code == 2 and "invalid float value" in err


def test_help_and_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("mantis-llm ")
    code, out, _ = run(capsys, "ask", "--help")
    assert code == 0 and "--prompt" in out and "--backend {fal,local}" in out


@pytest.mark.parametrize("entry", [[sys.executable, "-m", "mantis_llm"], [str(Path(sys.executable).parent / "mantis-llm")]])
def test_entry_points_exit_2_without_key(entry, image_files):
    if not Path(entry[0]).exists():
        pytest.skip("console script not installed")
    env = {k: v for k, v in __import__("os").environ.items() if k not in FAL_ENV}
    out = subprocess.run(entry + ["ask", str(image_files[0]), "-p", "hi"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert one_line(out.stderr).startswith("error: FAL_KEY is not set")
