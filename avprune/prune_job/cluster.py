"""Where the job ran: Ray nodes at start and end, nodes lost, and the trials that were retried.

Each trial attempt records where it runs (:func:`record_attempt`: ``OUT/search/trials/ID/
attempt-PID.json`` with the Ray node id and the worker pid, written when the attempt starts), and
every Tune report carries the same two values (:func:`worker_identity`). The runner snapshots the
cluster's nodes when the job starts and when it ends (:func:`node_snapshot`) and writes the
``cluster`` block of ``report.json`` from them (:func:`cluster_block`): a node alive at the start
and gone at the end (or one a trial ran on that is gone) is *lost*, and a trial with more than one
attempt was *retried*, on the node(s) its later attempts name.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from perception.io import atomic_write_json

Row = dict[str, Any]


def worker_identity() -> Row:
    """The Ray node id and pid of the calling worker (inside a task or trial)."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "worker_pid": os.getpid()}


def record_attempt(work: Path) -> Path:
    """Record that a trial attempt starts here, in its work folder (one file per worker pid)."""
    where = worker_identity()
    path = work / f"attempt-{where['worker_pid']}.json"
    atomic_write_json(path, {**where, "started_at": time.time()})
    return path


def node_snapshot() -> list[Row]:
    """Every node the cluster knows (driver side): id, alive, address, CPUs."""
    import ray

    return [{"node_id": str(n.get("NodeID")), "alive": bool(n.get("Alive")),
             "address": n.get("NodeManagerAddress"), "cpus": float((n.get("Resources") or {}).get("CPU", 0.0))}
            for n in ray.nodes()]


def trial_attempts(out_dir: Path) -> dict[str, list[Row]]:
    """Attempts per trial (candidate id), in start order."""
    attempts: dict[str, list[Row]] = {}
    for p in sorted((out_dir / "search" / "trials").glob("*/attempt-*.json")):
        try:
            row = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        attempts.setdefault(p.parent.name, []).append(row)
    return {cid: sorted(rows, key=lambda r: r.get("started_at", 0.0)) for cid, rows in sorted(attempts.items())}


def cluster_block(start: list[Row], end: list[Row], attempts: dict[str, list[Row]]) -> Row:
    """The ``cluster`` block of report.json."""
    alive_start = [n["node_id"] for n in start if n["alive"]]
    alive_end = {n["node_id"] for n in end if n["alive"]}
    used = {a["node_id"] for rows in attempts.values() for a in rows}
    lost = sorted((set(alive_start) | used) - alive_end)
    trials = {cid: [{"node_id": a["node_id"], "worker_pid": a["worker_pid"]} for a in rows]
              for cid, rows in attempts.items()}
    retried = {cid: {"attempts": len(rows), "lost_on": sorted({a["node_id"] for a in rows[:-1]} & set(lost)),
                     "finished_on": rows[-1]["node_id"]}
               for cid, rows in trials.items() if len(rows) > 1}
    return {"nodes_start": start, "nodes_end": end, "lost_nodes": lost, "trials": trials, "retried": retried}


def write_cluster_block(report_json: Path, block: Row) -> None:
    """Add ``block`` as ``cluster`` to an existing report.json (atomically)."""
    doc = json.loads(report_json.read_text())
    doc["cluster"] = block
    atomic_write_json(report_json, doc)
