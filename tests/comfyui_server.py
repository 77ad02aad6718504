"""A headless ComfyUI server for the real-ComfyUI tests (and bench/bench_calibration_comfyui.py).

`running_server` starts ComfyUI (COMFYUI_PATH) on a free local port with a temporary --base-directory
whose custom_nodes/ holds a symlink to this repository and whose models/ holds generated models
(tests/tiny_models.py); `Server` drives it through its HTTP API. The module-scoped `server` fixture
that the tests use is in conftest.py.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import tiny_models
from real_comfyui import COMFYUI_PATH

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "example_workflows"
PACK_DIR_NAME = "learned_rounding_fp16"
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"  # the names the example workflows use
LORA = "example_lora.safetensors"
START_TIMEOUT = 180
PROMPT_TIMEOUT = 600


class Server:
    def __init__(self, base: Path, port: int, process: subprocess.Popen):
        self.base, self.url, self.process = base, f"http://127.0.0.1:{port}", process

    def log_tail(self, chars: int = 4000) -> str:
        return (self.base / "comfyui.log").read_text(errors="replace")[-chars:]

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, data: dict | None = None):
        body = json.dumps(data or {}).encode()
        request = urllib.request.Request(self.url + path, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read()
        return json.loads(text) if text else None

    def queue(self, prompt: dict) -> str:
        try:
            return self.post("/prompt", {"prompt": prompt, "client_id": "integration-test"})["prompt_id"]
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"prompt refused: {exc.read().decode()}") from None

    def wait(self, prompt_id: str, timeout: float = PROMPT_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"ComfyUI exited ({self.process.returncode}):\n{self.log_tail()}")
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                if entry["status"]["status_str"] == "success" or entry["status"]["completed"] is False:
                    return entry
            time.sleep(0.25)
        raise AssertionError(f"prompt {prompt_id} not finished after {timeout} s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = PROMPT_TIMEOUT) -> dict:
        entry = self.wait(self.queue(prompt), timeout)
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[-3000:]
        return entry["outputs"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(base: Path):
    """A ComfyUI server on a free local port, `base` its --base-directory (models generated there); always stopped."""
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / PACK_DIR_NAME).symlink_to(ROOT, target_is_directory=True)
    tiny_models.write_models(base / "models", CHECKPOINT, LORA)
    port = _free_port()
    command = [
        sys.executable,
        "main.py",
        "--cpu",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--base-directory",
        str(base),
        "--database-url",
        "sqlite:///:memory:",
    ]
    with open(base / "comfyui.log", "wb") as log:
        process = subprocess.Popen(
            command, cwd=COMFYUI_PATH, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    running = Server(base, port, process)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                raise AssertionError(f"ComfyUI exited at start ({process.returncode}):\n{running.log_tail()}")
            try:
                running.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"ComfyUI did not answer within {START_TIMEOUT} s:\n{running.log_tail()}"
                    ) from None
                time.sleep(0.5)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API form of a UI workflow: widget values mapped to input names in the order ComfyUI declares them."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        info = object_info[node["type"]]
        linked = {i["name"]: links[i["link"]] for i in node["inputs"] if i.get("link") is not None}
        values = iter(node["widgets_values"])
        inputs = {}
        for section in ("required", "optional"):
            for name in info["input_order"].get(section, []):
                if name in linked:
                    _, origin, slot, *_ = linked[name]
                    inputs[name] = [str(origin), slot]
                    continue
                spec = info["input"][section][name]
                if isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                    inputs[name] = next(values)
                    if len(spec) > 1 and spec[1].get("control_after_generate"):
                        next(values)  # the "fixed" / "randomize" widget
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def load_workflow(name: str) -> tuple[dict, dict]:
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    return ui, api
