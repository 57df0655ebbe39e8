"""Compare a converted state_dict with the key names and shapes its target model expects."""
from __future__ import annotations

from collections.abc import Mapping

Shapes = Mapping[str, tuple[int, ...]]

LIST_LIMIT = 20


def shapes_of(state_dict: Mapping) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def _listing(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    lines = [f"  {title} ({len(items)}):"]
    lines += [f"    {item}" for item in items[:LIST_LIMIT]]
    if len(items) > LIST_LIMIT:
        lines.append(f"    ... and {len(items) - LIST_LIMIT} more")
    return lines


def key_problems(found: Shapes, expected: Shapes) -> str | None:
    """None when `found` has exactly the expected keys and shapes, else a listing of the
    missing keys, the unexpected keys and the shape mismatches (first 20 of each, with counts)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [
        f"{k}: expected {tuple(expected[k])}, found {tuple(found[k])}"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k])
    ]
    if not (missing or unexpected or mismatched):
        return None
    lines = [f"expected {len(expected)} tensors, found {len(found)}:"]
    lines += _listing("missing", missing)
    lines += _listing("unexpected", unexpected)
    lines += _listing("wrong shape", mismatched)
    return "\n".join(lines)


def require_state_dict(obj: object, target: str) -> None:
    """Targets take weights in memory; a path gets a TypeError that names the reader."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"{target} takes a state_dict (a dict of tensors), got {type(obj).__name__}; "
                        "read a checkpoint file with sparse_mim.convert.read(path) first")
