"""`gptwo serve` as a user runs it: a real process, a port, a clean stop; and its one-line errors."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import openai
from serve_testing import save_tiny_model

GPTWO = [sys.executable, "-m", "gptwo.cli"]


def test_gptwo_serve_answers_and_stops_cleanly(tmp_path):
    save_tiny_model(str(tmp_path / "tiny"))
    proc = subprocess.Popen(
        [*GPTWO, "serve", "--model", str(tmp_path / "tiny"), "--port", "0"], stderr=subprocess.PIPE, text=True
    )
    try:
        url, deadline, seen = None, time.monotonic() + 60, []
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            seen.append(line)
            found = re.search(r"serving tiny at (http://127\.0\.0\.1:\d+)", line)
            url = found and found.group(1)
        assert url, "".join(seen)
        while time.monotonic() < deadline:  # the log line comes just before uvicorn accepts connections
            try:
                health = json.loads(urllib.request.urlopen(url + "/health", timeout=5).read())
                break
            except OSError:
                time.sleep(0.1)
        assert health["status"] == "ok"
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert client.completions.create(model="tiny", prompt="Hi", max_tokens=5).usage.completion_tokens == 5
        assert "<title>gptwo playground</title>" in urllib.request.urlopen(url + "/", timeout=5).read().decode()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert proc.returncode == 0


def test_gptwo_serve_errors_are_one_line(tmp_path):
    missing = subprocess.run(
        [*GPTWO, "serve", "--model", str(tmp_path / "nothing-here")], capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = subprocess.run(
            [*GPTWO, "serve", "--model", str(tmp_path), "--port", str(taken.getsockname()[1])],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert (
        busy.returncode == 2
        and busy.stderr.startswith("error: cannot listen on 127.0.0.1")
        and len(busy.stderr.strip().splitlines()) == 1
    )
