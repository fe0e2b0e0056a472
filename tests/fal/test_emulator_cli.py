"""``python -m mantis_llm.emulator`` as a subprocess, the way a non-Python client runs it:
a busy port is one error line (exit 2), scripted answers from a JSON file, fault flags, and
the two endpoint switches (text-only questions, no token stream)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import httpx
import pytest

from mantis_llm.emulator import DEFAULT_APPS, HANG, JobError, expected_output

APP = DEFAULT_APPS[0]
KEY = "k:s"
ONE_IMAGE = {"prompt": "hi", "images": [{"image_url": "https://a/b.png"}]}

pytestmark = pytest.mark.slow  # each test starts a Python process


def start(*args: str) -> tuple[subprocess.Popen, dict[str, str]]:
    """Start the emulator with ``args``; return it and the environment it printed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mantis_llm.emulator", "--key", KEY, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    env = {}
    for _ in range(5):
        line = proc.stdout.readline()
        assert line.startswith("export "), (line, proc.stderr.read() if proc.poll() is not None else "")
        k, v = line.removeprefix("export ").strip().split("=", 1)
        env[k] = v
    assert proc.stdout.readline().startswith("# fal emulator on ")
    return proc, env


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def running(request):
    procs = []

    def run(*args: str) -> tuple[httpx.Client, dict[str, str]]:
        proc, env = start(*args)
        procs.append(proc)
        client = httpx.Client(headers={"Authorization": f"Key {KEY}"}, timeout=10)
        request.addfinalizer(client.close)
        return client, env

    yield run
    for proc in procs:
        stop(proc)


def run_to_error(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mantis_llm.emulator", *args], capture_output=True, text=True, timeout=60
    )


def queue_answer(client: httpx.Client, env: dict[str, str], payload: dict) -> httpx.Response:
    sub = client.post(f"{env['FAL_QUEUE_URL']}/{APP}", json=payload).json()
    with client.stream("GET", sub["status_url"] + "/stream") as r:
        r.read()
    return client.get(sub["response_url"])


@pytest.mark.parametrize("module", ["mantis_llm.emulator", "mantis_llm.testing.emulator"])
def test_a_busy_port_is_one_error_line_and_exit_2(module):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", module, "--port", str(port)], capture_output=True, text=True, timeout=60
        )
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        f"error: port {port} is in use on 127.0.0.1; pick another with --port, or --port 0 for a free one"
    ]


def test_scripted_answers_from_a_json_file(running, tmp_path):
    script = tmp_path / "answers.json"
    error = {"status_code": 503, "detail": "Runner disconnected", "error_type": "runner_disconnected"}
    script.write_text(json.dumps(["first answer", {"error": error}, None, {"answer": "HANG"}, "HANG"]))
    client, env = running("--script", str(script))
    run = f"{env['FAL_RUN_URL']}/{APP}"
    assert client.post(run, json=ONE_IMAGE).json()["output"] == "first answer"
    failed = queue_answer(client, env, ONE_IMAGE)  # the error entry, on the queue path
    assert failed.status_code == 503
    assert failed.json() == {"detail": "Runner disconnected", "error_type": "runner_disconnected"}
    assert client.post(run, json=ONE_IMAGE).json()["output"] == expected_output(ONE_IMAGE)  # null: the fake model
    assert client.post(run, json=ONE_IMAGE).json()["output"] == "HANG"  # {"answer": ...} is literal
    sub = client.post(f"{env['FAL_QUEUE_URL']}/{APP}", json=ONE_IMAGE).json()  # "HANG": never finishes
    time.sleep(0.3)
    assert client.get(sub["status_url"]).json()["status"] == "IN_PROGRESS"
    assert client.put(sub["cancel_url"]).status_code == 202
    assert client.post(run, json=ONE_IMAGE).json()["output"] == expected_output(ONE_IMAGE)  # script used up


@pytest.mark.parametrize(
    "content, words",
    [
        ("{not json", "Expecting property name"),
        ('{"answers": []}', "a script is a JSON list"),
        ("[1]", "script entry 0: expected a string"),
        ('["ok", {"error": {"status_code": 200}}]', "script entry 1: status_code must be an HTTP error"),
        ('[{"error": {"code": 500}}]', "unknown error keys ['code']"),
    ],
)
def test_a_bad_script_is_one_error_line(tmp_path, content, words):
    script = tmp_path / "bad.json"
    script.write_text(content)
    out = run_to_error("--script", str(script))
    assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"error: --script {script}: ") and words in line
    out = run_to_error("--script", str(tmp_path / "missing.json"))
    assert (
        out.returncode == 2
        and out.stderr.strip() == f"error: --script {tmp_path / 'missing.json'}: No such file or directory"
    )


def test_parse_script_entries():
    from mantis_llm.emulator import parse_script

    assert parse_script(["a", None, "HANG", {"answer": "HANG"}, {"error": {}}, {"error": {"status_code": 422}}]) == [
        "a",
        None,
        HANG,
        "HANG",
        JobError(),
        JobError(422, JobError().detail, JobError().error_type),
    ]


def test_fault_flags(running):
    client, env = running("--fault", "error_503=1", "--fault", "routes=run", "--fault", "seed=3")
    r = client.post(f"{env['FAL_RUN_URL']}/{APP}", json=ONE_IMAGE)
    assert r.status_code == 503 and "nginx" in r.text and "x-fal-request-id" not in r.headers
    assert client.post(f"{env['FAL_QUEUE_URL']}/{APP}", json=ONE_IMAGE).status_code == 200  # routes=run only


def test_fault_flags_retry_after_and_429(running):
    client, env = running("--fault", "error_429=1.0", "--fault", "retry_after=7")
    r = client.post(f"{env['FAL_RUN_URL']}/{APP}", json=ONE_IMAGE)
    assert r.status_code == 429 and r.headers["retry-after"] == "7"


@pytest.mark.parametrize(
    "flag, words",
    [
        ("error_503", "expected NAME=VALUE"),
        ("nonsense=0.1", "expected NAME=VALUE"),
        ("drop=2", "drop must be a rate from 0 to 1"),
        ("drop=lots", "drop must be a number"),
        ("slow_delay=-1", "slow_delay must be a non-negative number of seconds"),
        ("seed=x", "seed must be an integer"),
        ("routes=submit,nowhere", "routes are comma-separated names"),
    ],
)
def test_bad_fault_flags_are_usage_errors(flag, words):
    out = run_to_error("--fault", flag)
    assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr


def test_endpoint_switches(running):
    text_only = {"prompt": "hi", "images": []}
    client, env = running()
    assert client.post(f"{env['FAL_RUN_URL']}/{APP}", json=text_only).status_code == 422  # the default
    client, env = running("--no-require-images", "--stream-endpoint", "405")
    r = client.post(f"{env['FAL_RUN_URL']}/{APP}", json=text_only)
    assert r.status_code == 200 and r.json()["output"] == expected_output(text_only)
    assert "0 images" in r.json()["output"]
    assert client.post(f"{env['FAL_RUN_URL']}/{APP}/stream", json=ONE_IMAGE).status_code == 405
    client, env = running("--stream-endpoint", "404")
    assert client.post(f"{env['FAL_RUN_URL']}/{APP}/stream", json=ONE_IMAGE).status_code == 404


def test_a_non_python_client_runs_the_queue_flow(running):
    """What a curl-style client does: submit, status, result, with the key the emulator printed."""
    client, env = running()
    assert env["FAL_KEY"] == KEY  # the printed key is the one accepted
    r = queue_answer(client, env, ONE_IMAGE)
    assert r.status_code == 200 and r.json() == {"output": expected_output(ONE_IMAGE), "partial": False}
