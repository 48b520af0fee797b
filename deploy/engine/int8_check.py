"""INT8 engines are verified like fp32 exports: mAP parity with the fp32 model, and a speed check.

Quantization trades accuracy for speed, so an INT8 engine is kept only when both hold up on the
machine it was built on:

* **accuracy**: COCO mAP of the INT8 engine vs the fp32 ONNX it was quantized from, on the same
  validation images (``perception.evaluate``); a drop above ``max_map_drop`` (default 0.01)
  fails, as an fp32 export that loses mAP fails ``deploy.verify``;
* **speed**: the two graphs timed interleaved on the same pre-processed frames
  (``deploy.timing.time_runtimes``, paired blocks, bootstrap interval of the p50 ratio). INT8 is
  not always faster: on CPUs without VNNI ONNX Runtime's QDQ kernels can run slower than fp32.
  Slower beyond the interval is reported (``slower``) so the caller can warn; it is not a failure,
  the user may still want the smaller file.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deploy.verify import ExportMismatchError

log = logging.getLogger(__name__)

DEFAULT_MAX_MAP_DROP = 0.01


class Int8ParityError(ExportMismatchError):
    """The INT8 engine loses more mAP against the fp32 model than the stated bound."""


@dataclass(frozen=True)
class Int8Verification:
    """mAP of both models on the same images, and their paired graph latency on this machine."""

    images: int
    map_fp32: float
    map_int8: float
    map_drop: float  # fp32 - int8
    max_map_drop: float
    passed: bool
    fp32_p50_ms: float
    int8_p50_ms: float
    speedup: float  # fp32 p50 / int8 p50 (> 1: INT8 faster)
    speedup_low: float
    speedup_high: float
    slower: bool  # INT8 slower than fp32 beyond the interval (speedup_high < 1)
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "notes": list(self.notes)}

    def speed_line(self) -> str:
        return (f"INT8 graph p50 {self.int8_p50_ms:.2f} ms vs fp32 {self.fp32_p50_ms:.2f} ms on this machine "
                f"(speed-up {self.speedup:.2f}x, 95% interval {self.speedup_low:.2f}-{self.speedup_high:.2f})")


def verify_int8(
    fp32_model: str | Path,
    int8_engine: str | Path,
    dataset: Any,
    *,
    max_map_drop: float = DEFAULT_MAX_MAP_DROP,
    max_images: int | None = None,
    threads: int | None = None,
    timing_frames: int = 4,
    blocks: int = 6,
) -> Int8Verification:
    """Compare ``int8_engine`` with ``fp32_model`` (its source ONNX) on ``dataset`` (COCO val).

    Raises :class:`Int8ParityError` when the mAP drop exceeds ``max_map_drop``; returns the
    verification (with the speed comparison) otherwise.
    """
    from deploy.runtimes import open_runtime
    from deploy.timing import time_runtimes
    from perception.evaluate import evaluate

    if not max_map_drop >= 0:
        raise ValueError(f"the INT8 mAP bound must be >= 0; got {max_map_drop}")
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    if n < 1:
        raise ValueError("INT8 verification needs at least one validation image")
    notes: list[str] = []
    with open_runtime(fp32_model, threads=threads) as fp32, open_runtime(int8_engine, threads=threads) as int8:
        m32 = float(evaluate(fp32.infer, dataset, max_images=n).map)
        m8 = float(evaluate(int8.infer, dataset, max_images=n).map)
        frames = [dataset.load_image(i % len(dataset)) for i in range(max(1, timing_frames))]
        paired = time_runtimes({"fp32": fp32, "int8": int8}, frames, end_to_end=False, reference="fp32",
                               blocks=blocks, warmup=1)
    drop = m32 - m8
    passed = drop <= max_map_drop  # NaN (no ground truth) fails too
    if m32 < 0.01:
        notes.append("fp32 mAP is ~0 on these images: mAP parity is vacuous (train the model, or verify on its data)")
    r = paired.ratios["int8"]
    result = Int8Verification(
        images=n, map_fp32=m32, map_int8=m8, map_drop=drop, max_map_drop=max_map_drop, passed=bool(passed),
        fp32_p50_ms=paired.summaries["fp32"].p50_ms, int8_p50_ms=paired.summaries["int8"].p50_ms,
        speedup=r.ratio, speedup_low=r.low, speedup_high=r.high, slower=r.high < 1.0, notes=tuple(notes),
    )
    if result.slower:
        log.warning("INT8 engine %s is slower than fp32 here: %s", Path(int8_engine).name, result.speed_line())
    if not passed:
        raise Int8ParityError(
            f"INT8 engine mAP {m8:.4f} vs fp32 {m32:.4f} on {n} images: drop {drop:.4f} exceeds the bound "
            f"{max_map_drop:g}", None)
    log.info("INT8 verified: mAP %.4f vs fp32 %.4f (drop %.4f <= %g); %s", m8, m32, drop, max_map_drop,
             result.speed_line())
    return result
