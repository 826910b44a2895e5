"""Runs one process of a multi-process job as a child, and says plainly when a peer died.

When a peer process dies mid-collective, the survivor does not get a Python
exception: gloo's C++ code aborts the process ("terminate called ... Received data
size doesn't match expected size"), or the JAX coordination client ends it with a
fatal log, whichever notices first. Neither lets Python print a message. So a
multi-process `jaxlm train` runs its work in a child process (like torchrun's
agent), passes its output through, forwards SIGTERM/SIGINT (the child saves a
checkpoint as usual), and when the child dies of a peer's failure prints one line
that says so, naming the peer where the logs or the process count tell which.
The child is killed with its supervisor, so killing the supervisor kills the process.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading

CHILD_ENV = "JAXLM_SUPERVISED"  # set in the child: run the work, do not supervise again

# What the survivor's logs say when the failure came from another process.
PEER_FAILURE = re.compile(
    r"another task died|unhealthy|heartbeat|leader task|Connection reset by peer|Connection closed by peer"
    r"|Socket closed|doesn't match expected size|collective mismatch|UNAVAILABLE|Broken pipe"
    r"|gloo.*(?:connection|closed|timed out)",
    re.IGNORECASE,
)
TASK_ID = re.compile(r"/task:(\d+)|\btask (\d+)\b")


def supervised() -> bool:
    """Whether this process is the supervised child."""
    return os.environ.get(CHILD_ENV) == "1"


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def peer_failure(lines: list[str], process_id: int | None, num_processes: int | None) -> str | None:
    """The survivor's message when `lines` (the child's last output) show a peer's failure, else None."""
    text = "".join(lines)
    if not PEER_FAILURE.search(text):
        return None
    peers = set()
    for m in TASK_ID.finditer(text):
        peers.add(int(m.group(1) or m.group(2)))
    if re.search(r"leader task", text, re.IGNORECASE):
        peers.add(0)
    peers.discard(process_id)
    if not peers and num_processes == 2 and process_id in (0, 1):
        peers = {1 - process_id}
    who = f"process {', '.join(map(str, sorted(peers)))}" if peers else "a peer process (which one is not known)"
    me = f"process {process_id} of {num_processes}" if process_id is not None else "this process"
    return (
        f"error: {me} stopped because {who} died or stopped answering; restart every process with the same "
        "command to resume from the last checkpoint"
    )


def run_supervised(argv: list[str], process_id: int | None, num_processes: int | None) -> int:
    """Runs `python -m jaxlm ARGV` as a child; returns its exit code, or 1 after a peer's failure."""
    cmd = [sys.executable, "-m", "jaxlm", *argv]
    child = subprocess.Popen(
        cmd,
        env={**os.environ, CHILD_ENV: "1"},
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        preexec_fn=_die_with_parent,
    )
    tail: collections.deque[str] = collections.deque(maxlen=400)

    def relay():
        for line in child.stderr:
            tail.append(line)
            sys.stderr.write(line)
            sys.stderr.flush()

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    forwarded = []

    def forward(signum, frame):
        forwarded.append(signum)
        child.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        rc = child.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    reader.join(timeout=5)
    if rc == 0 or (forwarded and rc in (128 + forwarded[-1], -forwarded[-1])):
        return rc
    message = peer_failure(list(tail), process_id, num_processes)
    if message is None:
        if rc < 0:
            print(f"error: the training process was killed by {signal.Signals(-rc).name}", file=sys.stderr)
            return 128 - rc
        return rc
    print(message, file=sys.stderr)
    return 1
