"""`avprune prune`: the Ray-distributed prune job against an mAP floor and a frame-latency budget."""

from avprune.prune_job.errors import InfeasibleBudgetError
from avprune.prune_job.runner import ModelSummary, PruneJobResult, run_prune_job, summary_table

__all__ = ["InfeasibleBudgetError", "ModelSummary", "PruneJobResult", "run_prune_job", "summary_table"]
