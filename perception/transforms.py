"""Image + box transforms (torchvision transforms v2, which move boxes with the pixels).

Training augmentation is deliberately light: a from-scratch detector trained for minutes on
CPU gains from colour jitter and mirror images but loses from heavy crops that slow
convergence. The detectors resize and normalise inside their own ``transform``, so nothing here
changes the image size.
"""

from __future__ import annotations

import torch


def train_transform(*, photometric_p: float = 0.5, flip_p: float = 0.5):
    """uint8 image + ``BoundingBoxes`` -> float image in [0, 1], colour-jittered and mirrored.

    Horizontal flips are label-preserving for every drive class (traffic signs in the synthetic
    set carry no text). ``RandomPhotometricDistort`` is SSD's brightness/contrast/saturation/hue
    jitter.
    """
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomPhotometricDistort(p=photometric_p),
            v2.RandomHorizontalFlip(p=flip_p),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def eval_transform():
    """uint8 image -> float image in [0, 1]; boxes untouched."""
    from torchvision.transforms import v2

    return v2.ToDtype(torch.float32, scale=True)
