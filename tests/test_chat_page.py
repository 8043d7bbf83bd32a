"""The chat page in headless Chromium (Debian's `chromium`), driven over the DevTools protocol on loopback:
type a prompt, see tokens arrive, press stop, and the request is cancelled in the mesh."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import websocket

from http_gateway import wait_for, worker_load


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed here when missing (as root, through apt). CI fails without it; locally
    the test is skipped."""
    path = shutil.which("chromium")
    if path is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600, check=False)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"],
            env=env, capture_output=True, timeout=900, check=False,
        )  # fmt: skip
        path = shutil.which("chromium")
    if path is None:
        message = "headless Chromium is needed for the chat page test: apt-get install chromium"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


class DevTools:
    """A page target over the Chrome DevTools protocol (JSON over a WebSocket)."""

    def __init__(self, url: str) -> None:
        self.socket = websocket.create_connection(url, timeout=30, suppress_origin=True)
        self.last_id = 0

    def call(self, method: str, **params) -> dict:
        self.last_id += 1
        self.socket.send(json.dumps({"id": self.last_id, "method": method, "params": params}))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.last_id:
                assert "error" not in message, message
                return message["result"]
        raise TimeoutError(method)

    def eval(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def browser(chromium, tmp_path):
    profile = tmp_path / "profile"
    process = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "--remote-allow-origins=*",
         f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        port_file = Path(profile, "DevToolsActivePort")
        assert wait_for(lambda: port_file.exists() and port_file.read_text().strip(), timeout=60), "no DevTools port"
        port = int(port_file.read_text().splitlines()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as reply:
            page = next(t for t in json.load(reply) if t["type"] == "page")
        devtools = DevTools(page["webSocketDebuggerUrl"])
        yield devtools
        devtools.close()
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_chat_page_streams_tokens_and_stop_cancels_the_request(browser, gateway, mesh):
    browser.call("Page.enable")
    browser.call("Page.navigate", url=f"http://{gateway.http}/")
    assert wait_for(lambda: browser.eval("document.querySelectorAll('#model option').length") == 1, timeout=30)
    assert browser.eval("document.getElementById('model').value") == "meshserve-tiny"
    assert browser.eval("[...document.querySelectorAll('#priority option')].map(o => o.value).join()") == (
        "critical,high,normal,low,batch"
    )
    before = worker_load(mesh)
    # Greedy on the built-in model runs the whole 1,500 tokens (no end-of-sequence), so stop ends it.
    browser.eval(
        """
        document.getElementById('priority').value = 'high';
        document.getElementById('max-tokens').value = '1500';
        document.getElementById('temperature').value = '0';
        document.getElementById('prompt').value = 'Tell me a long story';
        document.getElementById('send').click();
        """
    )
    answer = "(document.querySelector('.assistant') || {}).textContent || ''"
    assert wait_for(lambda: len(browser.eval(answer)) > 0, timeout=30), browser.eval("document.body.innerText")
    first = len(browser.eval(answer))
    assert wait_for(lambda: len(browser.eval(answer)) > first, timeout=30), "no more tokens arrived"
    assert browser.eval("document.getElementById('stop').disabled") is False
    assert worker_load(mesh).running_sequences == 1

    browser.eval("document.getElementById('stop').click()")
    assert wait_for(lambda: browser.eval("document.getElementById('status').textContent") == "stopped", timeout=10)
    assert browser.eval("document.getElementById('send').disabled") is False
    assert wait_for(lambda: worker_load(mesh).sequences_cancelled == before.sequences_cancelled + 1), (
        "stop did not cancel the request on the worker"
    )
    after = worker_load(mesh)
    assert after.running_sequences == 0
    assert after.generated_tokens - before.generated_tokens < 1500
    stopped_text = browser.eval(answer)
    time.sleep(0.3)
    assert browser.eval(answer) == stopped_text, "text kept arriving after stop"
    assert browser.eval("document.querySelector('.user').textContent") == "Tell me a long story"
