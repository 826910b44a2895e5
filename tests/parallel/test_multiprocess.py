"""Two processes x 4 CPU devices (gloo collectives) train like one process with 8 devices."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import TINY

pytestmark = pytest.mark.slow

MODEL = ["train.batch_size=8", "train.steps=8", "data.tokenizer=byte", "train.eval_batches=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(devices: int) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def overrides(corpus, run_dir, *extra):
    # TINY pins mesh.data=1; the later overrides here win.
    return [*TINY, *MODEL, f"data.source={corpus}", f"train.run_dir={run_dir}", *extra]


def launch(args, devices, **kw):
    cmd = [sys.executable, "-m", "jaxlm", "train", "configs/llama_tiny.yaml", *args, "--no-progress"]
    return subprocess.Popen(cmd, env=env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def run_processes(args, n=2, devices=4, heartbeat=10):
    port = free_port()
    procs = [
        launch(
            [
                *args,
                f"--coordinator=127.0.0.1:{port}",
                f"--num-processes={n}",
                f"--process-id={i}",
                f"--heartbeat-timeout={heartbeat}",
            ],
            devices,
        )
        for i in range(n)
    ]
    return procs


def losses(run_dir) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_two_processes_match_one_and_resume_on_another_mesh(tmp_path, corpus_file):
    ref_dir, mp_dir = tmp_path / "ref", tmp_path / "multi"
    ref = launch(overrides(corpus_file, ref_dir, "mesh.data=8"), devices=8)
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out

    procs = run_processes(overrides(corpus_file, mp_dir, "mesh.data=8") + ["--stop-after=4"])
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert (mp_dir / "checkpoints" / "4").is_dir()

    # The checkpoint written by 2 processes (data=8) restores in one process on fsdp=2 x tensor=2 x data=2.
    resume = launch(overrides(corpus_file, mp_dir, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"), devices=8)
    out, _ = resume.communicate(timeout=300)
    assert resume.returncode == 0, out

    want, got = losses(ref_dir), losses(mp_dir)
    assert sorted(got) == list(range(1, 9))
    np.testing.assert_allclose([got[s] for s in range(1, 9)], [want[s] for s in range(1, 9)], rtol=1e-5)


@pytest.mark.parametrize("victim", [1, 0])
def test_dead_process_fails_the_other_in_bounded_time(tmp_path, corpus_file, victim):
    run_dir = tmp_path / "run"
    args = overrides(corpus_file, run_dir, "mesh.data=8", "train.steps=100000", "train.log_every=1")
    procs = run_processes(args, heartbeat=5)
    try:
        deadline = time.time() + 240
        while not ((run_dir / "metrics.jsonl").is_file() and len(losses(run_dir)) >= 3):
            assert time.time() < deadline, "training did not start"
            assert all(p.poll() is None for p in procs), [p.communicate()[0] for p in procs]
            time.sleep(0.5)
        procs[victim].kill()
        killed = time.time()
        survivor = procs[1 - victim]
        out, _ = survivor.communicate(timeout=120)
        waited = time.time() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert survivor.returncode != 0
    assert waited < 60, waited
    # Whichever way the survivor's runtime noticed (gloo abort, coordination service, heartbeat),
    # its last line says in words that the peer died, and names it.
    last = out.strip().splitlines()[-1]
    want = f"error: process {1 - victim} of 2 stopped because process {victim} died or stopped answering"
    assert last.startswith(want), out[-3000:]


@pytest.mark.parametrize(
    "log, pid, n, peer",
    [
        (
            "terminate called after throwing an instance of 'gloo::IoException'\n  what():  [gloo] Received data size "
            "doesn't match expected size. Is there a distributed collective mismatch in your code?\n",
            1,
            2,
            "process 0",
        ),
        (
            "UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):\n/job:jax_worker/replica:0/"
            "task:2\n",
            0,
            4,
            "process 2",
        ),
        ("Failed to send RPC to coordination service. Either the leader task was preempted/died\n", 3, 4, "process 0"),
        ("[gloo] Connection closed by peer [127.0.0.1]:4567\n", 1, 4, "a peer process (which one is not known)"),
    ],
)
def test_peer_failure_messages_name_the_peer(log, pid, n, peer):
    from jaxlm.parallel.supervise import peer_failure

    msg = peer_failure([log], pid, n)
    assert msg.startswith(f"error: process {pid} of {n} stopped because {peer} died or stopped answering"), msg
    assert peer_failure(["Traceback ...\nValueError: something of our own\n"], pid, n) is None
