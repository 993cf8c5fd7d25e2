"""Helpers for the reward-service tests: a running service, a fake user scoring service
on 127.0.0.1, and worker functions for the deadline pool (importable by worker processes).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from reward import RewardServer, RewardSettings


@contextlib.contextmanager
def running_service(**settings: object) -> Iterator[str]:
    """A reward service on 127.0.0.1 with a free port; yields its base URL."""
    defaults: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 0,
        "workers": 1,
        "log_level": "warning",
    }
    server = RewardServer(RewardSettings(**{**defaults, **settings}))
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


def item(id: str, completion: str, reference: str | None = None, **extra: object) -> dict:
    body: dict[str, object] = {"id": id, "prompt": "Q", "completion": completion}
    if reference is not None:
        body["reference"] = reference
    return {**body, **extra}


def _last_step(field: str, value: object):
    def breaks(result: dict, completion: str) -> None:
        result["step_rewards"][-1][field] = value

    return breaks


BROKEN_STEPS = {
    "nan": _last_step("reward", float("nan")),  # json.dumps writes NaN, Infinity
    "inf": _last_step("reward", float("inf")),
    "null": _last_step("reward", None),
    "past": lambda result, completion: result["step_rewards"][-1].update(end=len(completion) + 1),
    "unrewarded": lambda result, completion: result.update(reward=None),
}
"""How `/steps/v1/score` breaks the result of an item whose completion starts with the key."""


class FakeUserService:
    """A user's scoring service, misbehaving on purpose depending on the path.

    - `/ok/v1/score`: v1; reward 1.0 if the reference occurs in the completion, and one
      step reward per line;
    - `/flaky/v1/score`: 500 on the first call, then like `/ok`;
    - `/down/v1/score`: always 500;  `/hang/v1/score`: sleeps `hang_s`, then like `/ok`;
    - `/nonjson/v1/score`: 200 with HTML;  `/short/v1/score`: one result too few;
    - `/bad/v1/score`: 400;  `/throttled/v1/score`: 429 once, then like `/ok`;
    - `/auth/v1/score`: like `/ok` but needs `Authorization: Bearer secret-token`;
    - `/orm/get_reward`: OpenRLHF format; reward 1.0 if the label occurs in the query;
    - `/steps/v1/score`: like `/ok`, but an item whose completion starts with a word of
      `BROKEN_STEPS` gets that breakage in its last step (or its reward).
    """

    def __init__(self, hang_s: float = 3.0):
        self.calls: Counter[str] = Counter()
        self.hang_s = hang_s
        self._lock = threading.Lock()
        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                return None

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with service._lock:
                    service.calls[self.path] += 1
                    count = service.calls[self.path]
                status, payload = service.answer(self.path, count, body, self.headers)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                kind = "application/json" if not isinstance(payload, bytes) else "text/html"
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeUserService:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    @staticmethod
    def _v1(body: dict) -> dict:
        results = []
        for entry in body["items"]:
            completion, reference = entry["completion"], entry.get("reference") or "\0"
            ends, offset = [], 0
            for line in completion.split("\n"):
                offset += len(line)
                ends.append({"end": offset, "reward": 0.5})
                offset += 1
            reward = 1.0 if reference in completion else 0.0
            results.append(
                {"id": entry["id"], "status": "ok", "reward": reward, "step_rewards": ends}
            )
        return {"results": results}

    def answer(self, path: str, count: int, body: dict, headers: object) -> tuple[int, object]:
        kind = path.split("/")[1]
        if kind == "orm":
            rewards = [
                1.0 if label and label in q else 0.0
                for q, label in zip(body["query"], body["labels"], strict=True)
            ]
            return 200, {"rewards": rewards, "scores": rewards, "extra_logs": {}}
        if kind == "down" or (kind == "flaky" and count == 1):
            return 500, {"detail": "internal trouble"}
        if kind == "throttled" and count == 1:
            return 429, {"detail": "slow down"}
        if kind == "bad":
            return 400, {"detail": "I do not like this batch"}
        if kind == "nonjson":
            return 200, b"<html>oops</html>"
        if kind == "auth" and headers.get("Authorization") != "Bearer secret-token":  # type: ignore[attr-defined]
            return 401, {"detail": "no token"}
        if kind == "hang":
            time.sleep(self.hang_s)
        answer = self._v1(body)
        if kind == "short":
            answer["results"] = answer["results"][:-1]
        if kind == "steps":
            for entry, result in zip(body["items"], answer["results"], strict=True):
                breaks = BROKEN_STEPS.get(entry["completion"].partition("\n")[0])
                if breaks is not None:
                    breaks(result, entry["completion"])
        return 200, answer
