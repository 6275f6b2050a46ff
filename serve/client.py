"""A small Python client of the recognition service's HTTP API (what a camera's uploader does).

    client = ServiceClient("http://127.0.0.1:8000", token=None)
    client.enrol("alice", [jpeg_bytes, ...]); client.open("cam-1")
    answer = client.push("cam-1", seq, jpeg_bytes, ts=time.time())   # answer["decision"]
    client.close("cam-1")

`push` resends a frame that got no answer (connection lost, 502/503/504): the service counts a frame once
per (stream, seq), so a resend is never counted twice; an answer it already gave comes back with
"duplicate": true.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import requests

RETRY_STATUSES = (502, 503, 504)


class ServiceRefused(RuntimeError):
    """A 4xx/5xx answer: `status` and the service's one-line `message`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


class ServiceClient:
    def __init__(self, url: str, token: str | None = None, timeout_s: float = 60.0, retry_s: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s, self.retry_s = timeout_s, retry_s
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.resends = 0

    def _request(self, method: str, path: str, retry: bool = False, **kwargs) -> Any:
        deadline = time.monotonic() + self.retry_s
        while True:
            try:
                resp = self.session.request(method, self.url + path, timeout=self.timeout_s, **kwargs)
            except (requests.ConnectionError, requests.Timeout):
                if not retry or time.monotonic() > deadline:
                    raise
                self.resends += 1
                time.sleep(0.2)
                continue
            if retry and resp.status_code in RETRY_STATUSES and time.monotonic() < deadline:
                self.resends += 1
                time.sleep(0.2)
                continue
            if resp.status_code >= 400:
                try:
                    message = resp.json().get("error") or resp.text
                except ValueError:
                    message = resp.text
                raise ServiceRefused(resp.status_code, message)
            return resp.json()

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health", retry=True)

    def enrol(self, identity: str, images: list[bytes]) -> dict[str, Any]:
        return self._request("PUT", f"/gallery/{identity}", retry=True, json={"images": _b64(images)})

    def remove(self, identity: str) -> dict[str, Any]:
        return self._request("DELETE", f"/gallery/{identity}")

    def gallery(self) -> list[dict[str, Any]]:
        return self._request("GET", "/gallery", retry=True)["identities"]

    def score(self, images: list[bytes]) -> list[dict[str, Any]]:
        return self._request("POST", "/score", retry=True, json={"images": _b64(images)})["results"]

    def open(self, stream: str | None = None) -> dict[str, Any]:
        return self._request("POST", "/streams", retry=True, json={"stream": stream} if stream else None)

    def push(self, stream: str, seq: int, frame: bytes, ts: float | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"seq": seq, **({"ts": ts} if ts is not None else {})}
        return self._request("POST", f"/streams/{stream}/frames", retry=True, params=params, data=frame,
                             headers={"Content-Type": "application/octet-stream"})

    def status(self, stream: str) -> dict[str, Any]:
        return self._request("GET", f"/streams/{stream}", retry=True)

    def close(self, stream: str) -> dict[str, Any]:
        return self._request("DELETE", f"/streams/{stream}", retry=True)


def _b64(images: list[bytes]) -> list[str]:
    return [base64.b64encode(data).decode("ascii") for data in images]
