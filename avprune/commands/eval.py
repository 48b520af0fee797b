"""`avprune eval` (being built; see its issue)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("eval", help="(not yet available)")
    p.set_defaults(func=lambda args: (_ for _ in ()).throw(RuntimeError("'eval' is not implemented yet")))
