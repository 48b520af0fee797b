"""`avprune prune`: the Ray-distributed prune job against an mAP floor and a latency budget.

Modules: ``runner`` (stages in order, resume), ``records`` (typed stage records), ``context``
(``StageContext``, ``TrialSpec``), ``env`` (``JobEnv``: data, models, mAP, size, latency, once per process),
``ray_exec`` (Ray session, tasks, Tune trials), one module per stage (``baseline``,
``latency_table``, ``sensitivity``, ``search``, ``select``, ``finalize``), ``state`` (stage files),
``report``, ``progress``, ``memory``, ``errors``, ``preflight`` (model-dependent refusals before Ray,
the feasibility bound), ``block_step`` (depth pruning inside a trial).
"""

from avprune.prune_job.errors import (
    BudgetUnreachableError,
    InfeasibleBudgetError,
    JobConfigMismatchError,
    JobFolderInUseError,
)
from avprune.prune_job.records import ModelSummary
from avprune.prune_job.runner import PruneJobResult, run_prune_job, summary_table

__all__ = [
    "BudgetUnreachableError",
    "InfeasibleBudgetError",
    "JobConfigMismatchError",
    "JobFolderInUseError",
    "ModelSummary",
    "PruneJobResult",
    "run_prune_job",
    "summary_table",
]
