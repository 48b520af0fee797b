"""`avprune validate` (being built; see its issue)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("validate", help="(not yet available)")
    p.set_defaults(func=lambda args: (_ for _ in ()).throw(RuntimeError("'validate' is not implemented yet")))
