"""`make lab`: the JupyterLab server starts headless for root and non-root users, and serves the notebooks."""

import json
import os
import socket
import subprocess
import time
import urllib.request

from ember.notebooks import NOTEBOOK_DIR, lab_command


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, json.loads(response.read())


def test_lab_server_starts_and_lists_the_notebooks(tmp_path):
    """Hardening #19: `make lab` failed for root (JupyterLab refuses without --allow-root, as in most
    containers). The server `make lab` runs answers its status endpoint and lists notebooks/, then stops."""
    port, token = _free_port(), "ember-test-token"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp_path)}
    log = tmp_path / "lab.log"
    with log.open("w") as out:
        server = subprocess.Popen(lab_command(port, token), env=env, stdout=out, stderr=subprocess.STDOUT)
    base, status = f"http://127.0.0.1:{port}", None
    try:
        for _ in range(120):  # startup: poll until the server answers (or has exited)
            if server.poll() is not None:
                break
            try:
                status, body = _get(f"{base}/api/status?token={token}")
                break
            except OSError:
                time.sleep(0.5)
        assert server.poll() is None, f"the lab server exited: {log.read_text()[-2000:]}"
        assert status == 200 and "started" in body
        status, listing = _get(f"{base}/api/contents/notebooks?token={token}")
        names = {item["name"] for item in listing["content"]}
        assert status == 200 and {p.name for p in NOTEBOOK_DIR.glob("*.ipynb")} <= names
        assert "fig2_prefill_share.ipynb" in names
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert f"127.0.0.1:{port}/lab?token=" in log.read_text()  # the URL with its token is printed
