"""A prune job on a two-node Ray cluster that loses its worker node mid-search (issue 15).

Two nodes are started with ``ray start`` on this machine: a head and a worker, each with 1 CPU,
its own custom resource, its own ``--temp-dir`` and a capped object store (small /dev/shm). The
tiny job (``tests.conftest``'s ``assets``) runs through the CLI with ``--address``. A watcher
maps each trial's worker process to its node (the process's command line names its raylet's
socket, inside that node's temp dir); once a trial on the worker node has written its first
training checkpoint, the worker node is SIGKILLed (the trial's worker, the raylet and all the
raylet started, as when a machine dies). The job must still finish on the head
and select a candidate. Every process of both nodes is stopped by pid afterwards, and none may be
left running.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from tests.conftest import PY, ROOT, _free_port, _stop_cluster, make_job_assets, tiny_job  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

OBJECT_STORE = 80 * 1024**2  # Ray's minimum is 75 MiB
# Fast node-death detection: the GCS marks the lost node dead after ~3 missed 1 s health checks
# (the default takes ~30 s), so Tune sees the trial fail and restarts it promptly.
HEALTH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
          "RAY_health_check_failure_threshold": "3"}


@dataclass
class TwoNodes:
    address: str
    head_dir: str
    worker_dir: str
    env: dict[str, str]
    extra_pids: set[int] = field(default_factory=set)  # processes orphaned by the raylet kill

    def node_of(self, pid: int) -> str | None:
        """'head' or 'worker': the node of the raylet that started the process (Ray workers
        retitle themselves ``ray::...``, so their own command line no longer says)."""
        try:
            proc = psutil.Process(pid)
            chain = [proc, *proc.parents()]
            for p in chain:
                cmd = " ".join(p.cmdline())
                if self.worker_dir in cmd:
                    return "worker"
                if self.head_dir in cmd:
                    return "head"
        except psutil.Error:
            return None
        return None

    def raylet(self, node_dir: str) -> psutil.Process:
        for p in psutil.process_iter(["name", "cmdline"]):
            with contextlib.suppress(psutil.Error, TypeError):
                if p.info["name"] == "raylet" and node_dir in " ".join(p.info["cmdline"] or []):
                    return p
        raise AssertionError(f"no raylet for {node_dir}")

    def processes(self) -> list[psutil.Process]:
        """Every live process of either node (command line or RAY_TMPDIR), and the orphans seen."""
        found = []
        for p in psutil.process_iter(["cmdline", "environ"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
                tmp = (p.info["environ"] or {}).get("RAY_TMPDIR")
            except (psutil.Error, TypeError):
                continue
            if p.pid != os.getpid() and (self.head_dir in cmd or self.worker_dir in cmd
                                         or tmp in (self.head_dir, self.worker_dir) or p.pid in self.extra_pids):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
        return found


def _ray_start(args: list[str], node_dir: str, env: dict[str, str]) -> None:
    ray_bin = Path(PY).with_name("ray")
    res = subprocess.run([str(ray_bin), "start", *args, "--temp-dir", node_dir, "--num-cpus", "1",
                          "--object-store-memory", str(OBJECT_STORE), "--disable-usage-stats"],
                         env={**env, "RAY_TMPDIR": node_dir}, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]


@contextlib.contextmanager
def two_nodes() -> Iterator[TwoNodes]:
    # Short paths: Unix socket paths inside the temp dirs are capped at 107 bytes.
    head_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    worker_dir = tempfile.mkdtemp(prefix="rw", dir="/tmp")
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", **HEALTH}
    cluster = TwoNodes(f"127.0.0.1:{port}", head_dir, worker_dir, env)
    try:
        _ray_start(["--head", "--port", str(port), "--node-ip-address", "127.0.0.1", "--include-dashboard=false",
                    "--resources", json.dumps({"avprune_head": 1})], head_dir, env)
        _ray_start(["--address", cluster.address, "--node-ip-address", "127.0.0.1",
                    "--resources", json.dumps({"avprune_worker": 1})], worker_dir, env)
        yield cluster
    finally:
        for p in cluster.processes():  # orphans of the killed raylet first (no tmp dir in their env)
            if p.pid in cluster.extra_pids:
                with contextlib.suppress(psutil.Error):
                    p.kill()
        _stop_cluster(worker_dir)
        _stop_cluster(head_dir)
        shutil.rmtree(head_dir, ignore_errors=True)
        shutil.rmtree(worker_dir, ignore_errors=True)


def _watch(cluster: TwoNodes, out: Path, seen: dict[str, list[tuple[int, str]]], killed: list[int],
           stop: list[bool]) -> None:
    """Record each trial worker (pid, node) per candidate; SIGKILL the worker node (the trial's
    worker, its raylet and everything the raylet started) once a trial there has written its
    first training checkpoint (mid fine-tune, mid search)."""
    from avprune.prune_job.search import pid_files

    deadline = time.monotonic() + 600
    while not stop and time.monotonic() < deadline:
        for cid, pid in pid_files(out).items():
            node = cluster.node_of(pid)
            if node and pid not in [p for p, _ in seen.get(cid, [])]:
                seen.setdefault(cid, []).append((pid, node))
            work = out / "search" / "trials" / cid
            if (not killed and node == "worker" and (work / "train" / "last.pt").exists()
                    and not (work / "pruned.pt").exists()):  # fine-tuning, not finished
                # A lost machine loses every process on it at once. Killing only the raylet lets
                # the trial's worker finish its last steps and report before it notices (the
                # tiny fine-tune is seconds long), and then nothing is retried: so the trial's
                # worker goes first, then the raylet and everything it started.
                raylet = cluster.raylet(cluster.worker_dir)
                with contextlib.suppress(psutil.Error):  # its agents would be orphaned: track them
                    cluster.extra_pids.update(c.pid for c in raylet.children(recursive=True))
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                os.kill(raylet.pid, signal.SIGKILL)
                for orphan in cluster.extra_pids - {pid}:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(orphan, signal.SIGKILL)
                killed.append(raylet.pid)
        time.sleep(0.2)


def run_node_loss(work: Path, assets: dict[str, Path] | None = None) -> dict:
    """Run the tiny job on two nodes, lose the worker node mid-search; what happened, as data."""
    assets = assets or make_job_assets(work / "assets")
    out = work / "job"
    job = work / "job.yaml"
    # No dense shadow (a sequential trial before the candidates; tested in test_prune_job) and one
    # scanned layer: the node loss is what this test is about, and it runs in CI's time.
    job.write_text(yaml.safe_dump(tiny_job(assets, out, **{"search.max_failures": 3, "search.shadow_dense": False,
                                                           "sensitivity.max_layers": 1})))
    seen: dict[str, list[tuple[int, str]]] = {}
    killed: list[int] = []
    stop: list[bool] = []
    t0 = time.monotonic()
    with two_nodes() as cluster:
        proc = subprocess.Popen([PY, "-m", "avprune", "prune", str(job), "--no-progress", "--address", cluster.address],
                                cwd=ROOT, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        watcher = threading.Thread(target=_watch, args=(cluster, out, seen, killed, stop), daemon=True)
        watcher.start()
        try:
            stdout, stderr = proc.communicate(timeout=780)
        finally:
            stop.append(True)
            watcher.join()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    seconds = time.monotonic() - t0
    left = [" ".join(p.cmdline()[:2]) for p in cluster.processes()]
    lost = [cid for cid, runs in seen.items() if any(node == "worker" for _, node in runs)]
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}
    select = out / "stages" / "select.json"
    return {
        "exit_code": proc.returncode, "seconds": round(seconds, 1), "stdout": stdout, "stderr_tail": stderr[-4000:],
        "trial_nodes": {cid: [node for _, node in runs] for cid, runs in seen.items()},
        "raylet_killed": killed[0] if killed else None,
        "lost": lost, "retried": [cid for cid in lost if seen[cid][-1][1] == "head"],
        "status": {c["candidate_id"]: c["status"] for c in report.get("candidates", [])},
        "selected": json.loads(select.read_text())["result"]["candidate_id"] if select.is_file() else None,
        "cluster": report.get("cluster", {}),
        "processes_left": left,
    }


def test_job_survives_losing_the_worker_node(assets, tmp_path):  # assets: the conftest fixture
    run = run_node_loss(tmp_path, assets)
    assert run["exit_code"] == 0, run["stderr_tail"]
    assert {n for nodes in run["trial_nodes"].values() for n in nodes} == {"head", "worker"}, run  # spread
    assert run["raylet_killed"], f"no trial ran long enough on the worker node to be killed there: {run}"
    # the trial that lost its node was restarted on the head (the only node left) and finished
    assert run["retried"] and all(run["status"][cid] == "done" for cid in run["retried"]), run
    selected = run["selected"]
    assert selected and selected.split("@")[0] in run["status"] and f"candidate {selected}" in run["stdout"]
    assert not run["processes_left"], run["processes_left"]  # every process of both nodes stopped: no orphans
    # report.json records it: two nodes at the start, the worker node lost, the retried trials and where
    cluster = run["cluster"]
    alive_start = [n["node_id"] for n in cluster["nodes_start"] if n["alive"]]
    assert len(alive_start) == 2 and len(cluster["lost_nodes"]) == 1, cluster
    (lost,) = cluster["lost_nodes"]
    (head,) = set(alive_start) - {lost}
    assert lost in alive_start and {n["node_id"]: n["alive"] for n in cluster["nodes_end"]}[lost] is False
    assert set(cluster["retried"]) == set(run["retried"]), cluster
    for r in cluster["retried"].values():
        assert r["lost_on"] == [lost] and r["finished_on"] == head and r["attempts"] >= 2
    assert {a["node_id"] for rows in cluster["trials"].values() for a in rows} == {head, lost}  # spread
    print(f"two-node run: {run['trial_nodes']}, raylet {run['raylet_killed']} killed, retried {run['retried']}, "
          f"selected {selected}, {run['seconds']} s")
