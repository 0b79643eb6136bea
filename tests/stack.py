"""A real Orthanc and a real node (``python -m dicom_node serve``) started by the tests.

Orthanc runs with temporary storage on free ports, the node registered as a modality; extra
Orthanc configuration (plugins, a Python-plugin script) is merged in. Waits are polls with
deadlines, never fixed sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import require_tool
from tests.factories import free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]


class Orthanc:
    def __init__(self, root: Path, node_port: int, extra: dict[str, Any] | None = None) -> None:
        self.http_port, self.dicom_port = free_port(), free_port()
        config: dict[str, Any] = {
            "Name": "orthonode-e2e",
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {"orthonode": ["ORTHONODE", "127.0.0.1", node_port]},
            "DicomCheckCalledAet": False,
            "StableAge": 1,
            "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        config.update(extra or {})
        (root / "orthanc.json").write_text(json.dumps(config))
        self.log = (root / "orthanc.log").open("w")
        self.process = subprocess.Popen(
            [require_tool("Orthanc"), str(root / "orthanc.json")],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._alive, 60, "Orthanc to answer /system")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def _alive(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError("Orthanc exited; see orthanc.log")
        try:
            return bool(self.get("/system"))
        except (urllib.error.URLError, ConnectionError):
            return False

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url(path), timeout=10) as response:
            return json.loads(response.read())

    def get_bytes(self, path: str, accept: str | None = None) -> bytes:
        request = urllib.request.Request(self.url(path))
        if accept:
            request.add_header("Accept", accept)
        with urllib.request.urlopen(request, timeout=30) as response:
            return bytes(response.read())

    def study_instances(self, study_uid: str) -> list[dict[str, Any]]:
        body = json.dumps({"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}).encode()
        request = urllib.request.Request(self.url("/tools/find"), data=body, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            studies = json.loads(response.read())
        if not studies:
            return []
        return list(self.get(f"/studies/{studies[0]}/instances"))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


class Node:
    def __init__(self, root: Path, config: dict[str, Any]) -> None:
        path = root / "conf.yaml"
        path.write_text(yaml.safe_dump(config))
        self.port = config["node"]["port"]
        self.http_port = config["node"]["http_port"]
        self.log_path = root / "node.log"
        self.log = self.log_path.open("w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dicom_node", "serve", "--config", str(path)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )
        wait_for(self.echo, 120, "the node to answer C-ECHO")

    def echo(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError("node exited:\n" + self.log_path.read_text()[-3000:])
        result = subprocess.run(
            [
                require_tool("echoscu"),
                "-aet",
                "E2E",
                "-aec",
                "ORTHONODE",
                "127.0.0.1",
                str(self.port),
            ],
            capture_output=True,
            timeout=30,
        )
        return result.returncode == 0

    def metric(self, name: str) -> float:
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return 0.0

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=60)
        finally:
            self.log.close()
        return code
