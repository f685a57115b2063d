"""Growth: function-preserving deeper and wider supernets (Net2Net). Not implemented yet: the growth phase
runs search only, and says so."""
from __future__ import annotations

_said = False


def maybe_grow(trainer, record):
    global _said
    if not _said:
        trainer.log("   growth events are not implemented yet: the growth phase continues the search")
        _said = True
    return None
