"""avprune: fit a camera detector into a frame budget.

The application layer: CLI and job configs, wiring ``pruning``, ``perception`` and ``deploy``.
"""

__version__ = "0.1.0"
