"""The comparison's pruning methods by name (``benchmarks/compare.py --methods``).

The methods live in :mod:`benchmarks.compare_baselines` and :mod:`benchmarks.compare_avprune`;
this module imports both and names them, so imports point one way (registry -> method modules
-> :mod:`benchmarks.compare_methods`) and nothing is registered as a side effect of an import order.
"""

from __future__ import annotations

from benchmarks import compare_avprune, compare_baselines
from benchmarks.compare_methods import MethodSpec
from pruning.registry import Registry

METHODS: Registry[MethodSpec] = Registry("method")
for _spec in (*compare_baselines.METHODS, *compare_avprune.METHODS):  # registration order = run order
    METHODS.add(_spec.name, _spec)


def get_method(name: str) -> MethodSpec:
    """The method called ``name``; an unknown name raises ValueError listing the valid ones."""
    return METHODS.get(name)


def list_methods() -> list[str]:
    """Method names in run order: dense first, the channel methods, unstructured last (it needs
    the best channel method's sparsity)."""
    specs = [METHODS.get(n) for n in METHODS.names()]
    return [s.name for s in sorted(specs, key=lambda s: (s.needs_sparsity, s.kind != "dense"))]
