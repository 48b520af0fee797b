"""The prune job's Ray layer: a session, parallel tasks and Tune trials, generic over what they compute.

Nothing here knows about detectors (it lives in the prune job, not in ``pruning/``, because only
the job runs on Ray; the pruning engine stays pure PyTorch). Functions handed to Ray must be
importable (module-level) or picklable; task arguments may be picklable dataclasses, Tune trial
configs are plain dicts (Tune stores them in its experiment state for restores).

Ray facts this module relies on (Ray 2.60): ``local_mode`` is gone; a local instance started by
``ray.init`` uses token auth by default since 2.59 and handles it itself; a cluster started with
``ray start`` needs the same ``RAY_AUTH_*`` environment on the driver; ``/dev/shm`` may be
small, so the object store is capped.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

#: A Tune trial config or metrics row: plain JSON-like data.
Row = dict[str, Any]
T = TypeVar("T")

log = logging.getLogger(__name__)

DEFAULT_OBJECT_STORE_BYTES = 256 * 1024**2  # models here are a few MB; a small cap keeps /dev/shm safe


@dataclass(frozen=True)
class RaySessionInfo:
    """What the job reports about where it ran."""

    address: str
    started_here: bool
    num_cpus: float
    num_gpus: float
    nodes: int


@contextlib.contextmanager
def ray_session(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    object_store_memory: int | None = DEFAULT_OBJECT_STORE_BYTES,
    runtime_env: Row | None = None,
) -> Iterator[RaySessionInfo]:
    """Connect to Ray for the duration of a ``with`` block.

    ``address`` (or ``RAY_ADDRESS``) connects to a running cluster; otherwise a local instance
    is started with the detected CPUs and no dashboard. An instance already initialised in this
    process (a test fixture, a notebook) is reused and left running. Whatever this call started
    is shut down on exit, also on errors.
    """
    import ray

    if ray.is_initialized():
        yield _info(started_here=False)
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: Row = {
        "include_dashboard": False,
        "log_to_driver": False,  # worker logs stay in Ray's session folder; progress comes from us
        "configure_logging": False,
    }
    if runtime_env:
        kwargs["runtime_env"] = runtime_env
    if address:
        # A running cluster owns its resources: passing num_cpus/object_store_memory is an error there.
        log.info("connecting to Ray cluster at %s", address)
        ray.init(address=address, **kwargs)
    else:
        cpus = num_cpus or len(os.sched_getaffinity(0))
        log.info("starting a local Ray instance with %d CPUs", cpus)
        # address="local": always a fresh instance, never a cluster another process left running.
        ray.init(address="local", num_cpus=cpus, object_store_memory=object_store_memory, **kwargs)
    try:
        yield _info(started_here=True)
    finally:
        ray.shutdown()


def _info(*, started_here: bool) -> RaySessionInfo:
    import ray

    res = ray.cluster_resources()
    ctx = ray.get_runtime_context()
    return RaySessionInfo(
        address=str(getattr(ctx, "gcs_address", "")),
        started_here=started_here,
        num_cpus=float(res.get("CPU", 0.0)),
        num_gpus=float(res.get("GPU", 0.0)),
        nodes=len([n for n in ray.nodes() if n.get("Alive")]),
    )


def map_tasks(
    fn: Callable[..., T],
    kwargs_list: Sequence[dict[str, object]],
    *,
    num_cpus_per_task: float = 1,
    num_gpus_per_task: float = 0,
    max_retries: int = 2,
    max_calls: int = 0,
    on_result: Callable[[int, T], None] | None = None,
) -> list[T]:
    """Run ``fn(**kwargs)`` for every kwargs dict as Ray tasks; results in input order.

    A task whose worker process dies is retried up to ``max_retries`` times (Ray's default for
    system failures); ``retry_exceptions`` is left off so a bug in ``fn`` fails fast instead of
    running three times. ``max_calls=N`` retires a worker process after N tasks (0: never), which
    hands back its memory (a loaded model, torch's allocator) to the trials that run next.
    ``on_result(index, result)`` is called as each task finishes (progress).
    """
    import ray

    remote = ray.remote(
        num_cpus=num_cpus_per_task, num_gpus=num_gpus_per_task, max_retries=max_retries, max_calls=max_calls
    )(fn)
    refs = [remote.remote(**kw) for kw in kwargs_list]
    index = {ref: i for i, ref in enumerate(refs)}
    results: dict[int, T] = {}
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                i = index[ref]
                value: T = ray.get(ref)
                results[i] = value
                if on_result is not None:
                    on_result(i, value)
    except BaseException:
        for ref in pending:  # do not leave tasks burning CPU after a failure or Ctrl-C
            ray.cancel(ref, force=True)
        raise
    return [results[i] for i in range(len(refs))]


@dataclass(frozen=True)
class TrialResult:
    """One Tune trial, as plain data: its config, every report it made, and how it ended."""

    trial_id: str
    config: Row
    history: list[Row]
    last: Row
    error: str | None
    path: str | None = None
    checkpoint_path: str | None = None
    extra: Row = field(default_factory=dict)


def run_trials(
    trainable: Callable[[Row], None],
    param_space: Sequence[Row] | Row,
    *,
    resources_per_trial: dict[str, float],
    metric: str,
    mode: str = "max",
    scheduler: str | None = "asha",
    time_attr: str = "training_iteration",
    max_t: int = 100,
    grace_period: int = 1,
    max_failures: int = 2,
    storage_path: str | Path,
    name: str,
    resume: bool = False,
    callbacks: Sequence[object] = (),
) -> list[TrialResult]:
    """Run a Ray Tune experiment and return every trial's reports.

    ``param_space`` is either a Tune param space dict or a list of explicit configs (each one
    trial, via ``grid_search`` over an index). ``scheduler="asha"`` stops hopeless trials early
    (ASHA, Li et al. 2020) on ``metric`` once they have reported ``grace_period`` times. A trial
    whose worker dies is restarted from its last reported checkpoint up to ``max_failures``
    times. With ``resume=True`` an interrupted experiment under ``storage_path/name`` is restored
    (finished trials are not rerun); otherwise an old one there is replaced.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    storage = Path(storage_path).resolve()
    if isinstance(param_space, dict):
        space = dict(param_space)
    else:
        configs = [dict(c) for c in param_space]
        if not configs:
            raise ValueError("run_trials needs at least one trial config")
        space = {"_trial": tune.grid_search(configs)}
        trainable = _unwrap_trial(trainable)
    wrapped = tune.with_resources(trainable, resources=dict(resources_per_trial))
    exp_dir = storage / name
    if resume and tune.Tuner.can_restore(str(exp_dir)):
        log.info("restoring Tune experiment %s", exp_dir)
        # resume_errored: a trial that crashed with the driver is continued from its checkpoint.
        tuner = tune.Tuner.restore(str(exp_dir), trainable=wrapped, resume_unfinished=True, resume_errored=True)
    else:
        if scheduler == "asha":
            sched = ASHAScheduler(time_attr=time_attr, max_t=max_t, grace_period=grace_period, reduction_factor=2)
        elif scheduler is None:
            sched = None
        else:
            raise ValueError(f"scheduler must be 'asha' or None, got {scheduler!r}")
        tuner = tune.Tuner(
            wrapped,
            param_space=space,
            tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=sched, reuse_actors=False),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(storage),
                failure_config=tune.FailureConfig(max_failures=max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                verbose=0,
                callbacks=list(callbacks),
            ),
        )
    grid = tuner.fit()
    out: list[TrialResult] = []
    for res in grid:
        hist = res.metrics_dataframe.to_dict("records") if res.metrics_dataframe is not None else []
        cfg = dict(res.config or {})
        cfg = cfg.get("_trial", cfg)
        out.append(
            TrialResult(
                trial_id=str((res.metrics or {}).get("trial_id", "")),
                config=cfg,
                history=[_plain(h) for h in hist],
                last=_plain(res.metrics or {}),
                error=None if res.error is None else f"{type(res.error).__name__}: {res.error}",
                path=res.path,
                checkpoint_path=None if res.checkpoint is None else res.checkpoint.path,
            )
        )
    return out


def _unwrap_trial(trainable: Callable[[Row], None]) -> Callable[[Row], None]:
    """Hand the trainable its own config, not the ``{"_trial": config}`` grid wrapper."""

    def trial(config: Row) -> None:
        return trainable(dict(config["_trial"]))

    trial.__name__ = getattr(trainable, "__name__", "trial")
    trial.__qualname__ = trial.__name__
    return trial


def _plain(d: Row) -> Row:
    """Metrics as JSON-able Python values (pandas hands back numpy scalars and NaNs)."""
    import math

    out: Row = {}
    for k, v in d.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, float) and math.isnan(v):
            v = None
        if isinstance(v, str | int | float | bool) or v is None:
            out[k] = v
    return out
