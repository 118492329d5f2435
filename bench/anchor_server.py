"""One anchor (aibrix-kvcache or LMCache) in its own interpreter, one round per request.

``bench/kvcache.py`` interleaves the anchors with its memcpy and Shoal rounds (see
``bench/rounds.py`` for why), but the anchors cannot run in its process: LMCache and
aibrix leave background threads (telemetry, event loops) that would steal CPU from every
later measurement, and LMCache forces the "spawn" start method process-wide. So each
anchor lives in a process of this script for the whole run, set up once per block size
(``bench/anchors.py``'s ``*_session``), and answers one request at a time. Between its
turns the caller stops it with SIGSTOP (``AnchorProcess``), so its threads take no CPU
from the other contenders' rounds.

Protocol: one JSON object per line on stdin; each answer is one line on stdout that starts
with ``@@anchor `` (LMCache may print its own lines; they are skipped):

    {"op": "setup", "block_bytes": n, "num_blocks": n, "threads": n}  -> {"info": {...}}
    {"op": "round"}   -> {"put_block": s, "get_block": s, "put_seq": s, "get_seq": s}
    {"op": "close"}   -> {}          (tears the current setup down)

Every answer may instead be ``{"error": "..."}``; end of input ends the process.

    python bench/anchor_server.py aibrix|lmcache
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

PREFIX = "@@anchor "
HERE = Path(__file__).resolve().parent


def _die_with_parent() -> None:
    """SIGKILL this process when its parent dies: a stopped process would wait forever."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def serve(name: str) -> int:
    _die_with_parent()
    import anchors  # bench/ is sys.path[0] when this file runs as a script

    sessions = {"aibrix": anchors.aibrix_session, "lmcache": anchors.lmcache_session}
    if name not in sessions:
        print(f"anchor_server: unknown anchor {name!r}", file=sys.stderr)
        return 2
    stack: contextlib.ExitStack | None = None
    session: Any = None

    def answer(payload: dict[str, Any]) -> None:
        sys.stdout.write(PREFIX + json.dumps(payload) + "\n")
        sys.stdout.flush()

    for line in sys.stdin:
        request = json.loads(line)
        op = request.get("op")
        try:
            if op == "setup":
                if stack is not None:
                    stack.close()
                stack = contextlib.ExitStack()
                session = stack.enter_context(
                    sessions[name](
                        request["block_bytes"], request["num_blocks"], request["threads"]
                    )
                )
                session.round(check=True)  # warm-up: code paths, pool pages
                answer({"info": session.info})
            elif op == "round":
                if session is None:
                    raise RuntimeError("round before setup")
                answer(session.round(check=True))
            elif op == "close":
                if stack is not None:
                    stack.close()
                stack, session = None, None
                answer({})
            else:
                answer({"error": f"unknown op {op!r}"})
        except Exception as exc:  # reported to the caller, which prints it in its table
            answer(anchors._error(exc))
            if op == "setup" and stack is not None:
                with contextlib.suppress(Exception):
                    stack.close()
                stack, session = None, None
    if stack is not None:
        stack.close()
    return 0


class AnchorProcess:
    """The caller's side: a stopped-between-turns process of this script for one anchor."""

    def __init__(self, name: str, python: str = sys.executable) -> None:
        self.name = name
        env = {**os.environ, "LMCACHE_TRACK_USAGE": "false", "LMCACHE_LOG_LEVEL": "WARNING"}
        self._process = subprocess.Popen(
            [python, str(HERE / "anchor_server.py"), name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # progress bars and warnings; errors come as answers
            text=True,
            env=env,
        )
        self._stopped = False

    @property
    def pid(self) -> int:
        return self._process.pid

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and wait for its answer (the process runs only meanwhile)."""
        assert self._process.stdin is not None and self._process.stdout is not None
        self._resume()
        try:
            self._process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
            self._process.stdin.flush()
            while True:
                line = self._process.stdout.readline()
                if not line:
                    return {"error": f"{self.name} exited with {self._process.wait(30)}"}
                if line.startswith(PREFIX):
                    answer: dict[str, Any] = json.loads(line[len(PREFIX) :])
                    return answer
        except BrokenPipeError:
            return {"error": f"{self.name} exited with {self._process.wait(30)}"}
        finally:
            self._pause()

    def _pause(self) -> None:
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGSTOP)
            self._stopped = True

    def _resume(self) -> None:
        if self._stopped and self._process.poll() is None:
            self._process.send_signal(signal.SIGCONT)
        self._stopped = False

    def close(self) -> None:
        self._resume()
        assert self._process.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self._process.stdin.close()
        try:
            self._process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1] if len(sys.argv) > 1 else ""))
