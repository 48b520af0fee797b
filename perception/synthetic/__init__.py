"""Procedural driving scenes: the embedded default data set (no downloads).

``generate_dataset`` writes COCO train/val splits and recorded drives (MP4, MCAP, KITTI raw);
``render_frame`` renders one frame of a sampled :class:`World` with its exact visible boxes.
"""

from __future__ import annotations

from perception.synthetic.render import BoxRules, ObjectBox, render_frame
from perception.synthetic.world import World, sample_world

__all__ = ["BoxRules", "ObjectBox", "World", "render_frame", "sample_world"]
