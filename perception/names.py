"""Names that input checks compare against without importing torch (milliseconds, not seconds).

:mod:`perception.models` imports torch at the top (its registry holds builders); a job file or a
checkpoint is checked long before anything is built, so the names live here as plain data.
``tests/test_reliability.py`` holds the registry to :data:`DETECTOR_NAMES`, so the two cannot drift.
"""

from __future__ import annotations

#: Every detector :mod:`perception.models` registers, sorted (as ``list_detectors()`` returns them).
DETECTOR_NAMES: tuple[str, ...] = (
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fcos_resnet50_fpn",
    "retinanet_resnet50_fpn_v2",
    "ssdlite320_mobilenet_v3_large",
)

#: The ``format`` tag of an avprune checkpoint (``perception.models.save_checkpoint``).
CHECKPOINT_FORMAT = "avprune-checkpoint"
