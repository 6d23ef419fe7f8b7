"""Raw config dicts for the config tests: the smallest valid one, and copies with changes."""

from __future__ import annotations

MINIMAL = {"model": {"path": "ckpt"}, "data": {"data_root": "clips"}}


def with_(base: dict, **sections: dict) -> dict:
    """A copy of `base` with keys of some sections replaced."""
    out = {k: dict(v) for k, v in base.items()}
    for section, values in sections.items():
        out.setdefault(section, {}).update(values)
    return out
