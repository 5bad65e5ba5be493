"""The common behaviour of the methods' settings (frozen dataclasses with the papers' defaults)."""

from __future__ import annotations

import dataclasses


class Settings:
    """Mixed into a frozen settings dataclass: ``to_dict`` for the manifest, and ``replace``,
    which refuses a field the settings do not have by name (a typo must not pass silently)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes):
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown} for {type(self).__name__}; known: {sorted(known)}")
        return dataclasses.replace(self, **changes)
