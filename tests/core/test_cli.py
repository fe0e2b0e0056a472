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
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the CLI sets it when stderr is piped


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
    assert code == 2 and one_line(err).startswith(
        "error: image 1: unsupported image URL scheme in 'ftp://example.com/x.png'"
    )


def test_bad_backend_name(capsys, image_files):
    code, out, err = run(capsys, "ask", str(image_files[0]), "--prompt", "hi", "--backend", "nonesuch")
    assert code == 2 and out == ""
    assert "invalid choice: 'nonesuch'" in err and "Traceback" not in err


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
    assert code == 0 and "--prompt" in out and "--backend {fal,local" in out
    assert "read from stdin" in out  # IMAGE and --prompt may be "-"


@pytest.mark.parametrize(
    "entry", [[sys.executable, "-m", "mantis_llm"], [str(Path(sys.executable).parent / "mantis-llm")]]
)
def test_entry_points_exit_2_without_key(entry, image_files):
    if not Path(entry[0]).exists():
        pytest.skip("console script not installed")
    env = {k: v for k, v in __import__("os").environ.items() if k not in FAL_ENV}
    out = subprocess.run(
        entry + ["ask", str(image_files[0]), "-p", "hi"], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 2 and out.stdout == ""
    assert one_line(out.stderr).startswith("error: FAL_KEY is not set")


# --- against the fal emulator ----------------------------------------------------------


def expected_text(fresh_emu) -> str:
    from mantis_llm.emulator import expected_output

    return expected_output(fresh_emu.submissions[-1].payload)


QUESTION = "What are the differences between these two images?"


@pytest.mark.parametrize("stream", [False, True])
def test_ask_prints_the_answer(capsys, fresh_emu, image_files, stream):
    argv = ["ask", *map(str, image_files), "--prompt", QUESTION] + (["--stream"] if stream else [])
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert len(fresh_emu.submissions) == 1
    payload = fresh_emu.submissions[0].payload
    assert payload["prompt"] == "<image> <image> " + QUESTION
    assert [i["image_url"][:22] for i in payload["images"]] == ["data:image/png;base64,", "data:image/jpeg;base64"]
    assert out == expected_text(fresh_emu) + "\n"
    assert "2 images" in out
    assert err == ""  # stderr is not a tty and --verbose is off: no progress lines


class Writes:
    """A stand-in for sys.stdout that keeps each write, to see the answer arrive in pieces."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_ask_stream_prints_the_answer_as_it_is_generated(monkeypatch, fresh_emu, image_files):
    answer = "one two three four five six seven eight nine ten eleven twelve"
    fresh_emu.script([answer])
    out = Writes()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["ask", str(image_files[0]), "-p", "count", "--stream"]) == 0
    assert "".join(out.writes) == answer + "\n"
    assert len([w for w in out.writes if w.strip()]) >= 3  # token by token, not one block at the end
    assert [r.route for r in fresh_emu.requests] == ["run_stream"]


class Stdin:
    """A stand-in for sys.stdin: text in ``read()``, bytes in ``buffer.read()``."""

    def __init__(self, data: bytes) -> None:
        import io

        self.buffer = io.BytesIO(data)

    def read(self) -> str:
        return self.buffer.read().decode()

    def isatty(self) -> bool:
        return False


def test_ask_reads_the_image_from_stdin(capsys, monkeypatch, fresh_emu, png_bytes, image_files):
    monkeypatch.setattr(sys, "stdin", Stdin(png_bytes))
    code, out, err = run(capsys, "ask", str(image_files[1]), "-", "-p", "compare")
    assert code == 0, err
    images = [i["image_url"] for i in fresh_emu.submissions[0].payload["images"]]
    assert images[0].startswith("data:image/jpeg;base64,") and images[1].startswith("data:image/png;base64,")
    assert out == expected_text(fresh_emu) + "\n" and "2 images" in out


def test_ask_reads_the_prompt_from_stdin(capsys, monkeypatch, fresh_emu, image_files):
    monkeypatch.setattr(sys, "stdin", Stdin(b"What is in this picture?\n"))
    code, out, err = run(capsys, "ask", str(image_files[0]), "-p", "-")
    assert code == 0, err
    assert fresh_emu.submissions[0].payload["prompt"] == "<image> What is in this picture?"
    assert out == expected_text(fresh_emu) + "\n"


@pytest.mark.parametrize(
    "argv, stdin, words",
    [
        (["-", "-p", "-"], b"", "the image and the prompt cannot both be read from stdin"),
        (["-", "-", "-p", "hi"], b"", "only one IMAGE can be read from stdin"),
        (["-", "-p", "hi"], b"", "image 1: stdin is empty"),
        (["IMG", "-p", "-"], b"  \n", "the prompt read from stdin is empty"),
        (["-", "-p", "hi"], b"not an image", "image 1 of message 1: unsupported image data"),
    ],
)
def test_stdin_usage_errors(capsys, monkeypatch, fresh_emu, image_files, argv, stdin, words):
    monkeypatch.setattr(sys, "stdin", Stdin(stdin))
    argv = [str(image_files[0]) if a == "IMG" else a for a in argv]
    code, out, err = run(capsys, "ask", *argv)
    assert code == 2 and out == ""
    line = one_line(err)
    assert line.startswith("error: ") and words in line, line
    assert fresh_emu.requests == []  # nothing was sent


def test_stdin_image_through_the_real_entry_point(fresh_emu, png_bytes):
    import os

    env = {**os.environ, **fresh_emu.env()}
    out = subprocess.run(
        [sys.executable, "-m", "mantis_llm", "ask", "-", "-p", "What is it?"],
        input=png_bytes,
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode() == expected_text(fresh_emu) + "\n" and out.stderr == b""
    assert fresh_emu.submissions[0].payload["images"][0]["image_url"].startswith("data:image/png;base64,")


@pytest.mark.parametrize("stream", [False, True])
def test_ask_json(capsys, fresh_emu, image_files, stream):
    argv = ["ask", str(image_files[0]), "-p", "Describe.", "--json", "--max-tokens", "3", "--temperature", "0"]
    code, out, err = run(capsys, *argv + (["--stream"] if stream else []))
    assert code == 0, err
    data = json.loads(out)  # exactly one JSON object, even when streaming
    assert set(data) == {"text", "model", "finish_reason", "usage", "request_id"}
    assert data["text"] == expected_text(fresh_emu) and len(data["text"].split()) == 3
    assert data["model"] == "fal-ai/mantis-llava-7b-v11"
    assert data["request_id"] == fresh_emu.submissions[0].request_id
    payload = fresh_emu.submissions[0].payload
    assert payload["max_tokens"] == 3 and payload["temperature"] == 0


def test_ask_verbose_prints_queue_updates(capsys, fresh_emu, image_files):
    code, out, err = run(capsys, "ask", str(image_files[0]), "-p", "hi", "--verbose")
    assert code == 0
    assert "[completed]" in err or "[in_progress]" in err
    assert out.strip() == expected_text(fresh_emu)


def test_ask_remote_url_passed_through(capsys, fresh_emu):
    url = "https://example.com/cat.png?sig=1"
    code, out, err = run(capsys, "ask", url, "-p", "hi")
    # the emulator cannot fetch the internet; what matters is that the URL went to fal untouched
    assert fresh_emu.submissions and fresh_emu.submissions[0].payload["images"] == [{"image_url": url}]


def test_ask_backend_failure_exits_1(capsys, fresh_emu, image_files):
    fresh_emu.faults = {"job_error": 1.0}
    code, out, err = run(capsys, "ask", str(image_files[0]), "-p", "hi")
    assert code == 1 and out == ""
    assert one_line(err).startswith("error: ") and "dummy-test-key" not in err


def test_ask_bad_key_exits_2(capsys, monkeypatch, image_files):
    from mantis_llm.emulator import FalEmulator

    with FalEmulator() as emulator:  # accepts only its own key
        monkeypatch.setenv("FAL_KEY", "wrong-key")
        monkeypatch.setenv("FAL_QUEUE_URL", emulator.url)
        monkeypatch.setenv("FAL_RUN_URL", emulator.url + "/run")
        code, out, err = run(capsys, "ask", str(image_files[0]), "-p", "hi")
    assert code == 2 and out == ""
    line = one_line(err)
    assert "HTTP 401" in line and "wrong-key" not in line


def test_ctrl_c_exits_130_without_traceback(image_files):
    import os
    import signal
    import time

    from mantis_llm.emulator import FalEmulator

    with FalEmulator(key=None, hang=True) as emulator:
        env = {k: v for k, v in os.environ.items() if k not in FAL_ENV}
        env.update(FAL_KEY="dummy", FAL_QUEUE_URL=emulator.url, FAL_RUN_URL=emulator.url + "/run")
        proc = subprocess.Popen(
            [sys.executable, "-m", "mantis_llm", "ask", str(image_files[0]), "-p", "hi"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 20
            while not emulator.submissions and time.monotonic() < deadline:
                time.sleep(0.05)
            assert emulator.submissions, "the CLI never submitted"
            time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 130, err
        assert "Traceback" not in err and err.strip() == "interrupted"
        assert emulator.cancelled == [emulator.submissions[0].request_id]  # fal job cancelled on the way out


# --- against a tiny random-weight local model --------------------------------------------


@pytest.fixture
def tiny_model_dir(tiny_model) -> str:
    """The shared tiny model's directory, as the str the command line gets."""
    return str(tiny_model)


def test_ask_local_backend(capsys, tiny_model_dir, image_files):
    base = [
        "ask",
        *map(str, image_files),
        "-p",
        QUESTION,
        "--backend",
        "local",
        "--model",
        tiny_model_dir,
        "--max-tokens",
        "6",
        "--temperature",
        "0",
    ]
    code, out, err = run(capsys, *base, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["model"] == tiny_model_dir and data["finish_reason"] in ("stop", "length")
    assert 1 <= data["usage"]["output_tokens"] <= 6 and data["usage"]["input_tokens"] > 2 * 16
    code, streamed, err = run(capsys, *base, "--stream")
    assert code == 0, err
    assert streamed == data["text"] + "\n"  # greedy: the streamed deltas add up to the same answer


def test_ask_local_missing_model(capsys, tmp_path, image_files):
    pytest.importorskip("mantis_llm.backends.local", reason="the local backend has not landed yet")
    code, out, err = run(
        capsys, "ask", str(image_files[0]), "-p", "hi", "--backend", "local", "--model", str(tmp_path / "no-such-model")
    )
    assert code == 2 and out == ""
    assert one_line(err).startswith("error: ")
