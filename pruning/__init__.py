"""avprune's dynamic-threshold pruning engine (pure PyTorch; no Ray/ONNX/TensorRT imports here).

Public API::

    from pruning import Pruner, build_controller, LatencyTable, detector_default_filter
    pruner = Pruner(model, importance="taylor", granularity="channel",
                    controller=build_controller("cubic", final_sparsity=0.5, end_step=2000),
                    example_inputs=torch.randn(1, 3, 320, 320), update_every=10)
    ...  # optimizer.step(); pruner.step()
    small = pruner.finalize()
"""

from pruning.controllers import (
    CONTROLLERS,
    BudgetController,
    Controller,
    CubicController,
    FixedController,
    LayerAdaptiveController,
    OperatingPoint,
    build_controller,
)
from pruning.filters import default_filter, detector_core_forward, detector_default_filter
from pruning.granularity import GRANULARITIES
from pruning.importance import CRITERIA, build_criterion
from pruning.latency_model import LatencyTable
from pruning.pruner import Pruner
from pruning.records import LayerRecord, UpdateRecord
from pruning.sensitivity import metric_drops, scan_layer, sensitivity_scan

__all__ = [
    "CONTROLLERS",
    "CRITERIA",
    "GRANULARITIES",
    "BudgetController",
    "Controller",
    "CubicController",
    "FixedController",
    "LatencyTable",
    "LayerAdaptiveController",
    "LayerRecord",
    "OperatingPoint",
    "Pruner",
    "UpdateRecord",
    "build_controller",
    "build_criterion",
    "default_filter",
    "detector_core_forward",
    "detector_default_filter",
    "metric_drops",
    "scan_layer",
    "sensitivity_scan",
]
