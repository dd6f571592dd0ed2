"""Fine-tuning modes: full, LoRA adapters, initial-state tuning. Each has one home here
(prepare, save, load, merge, reference); :func:`get_mode` is how everything else reaches them."""

from __future__ import annotations

from rwkvtune.constants import MODES
from rwkvtune.errors import ConfigError


def get_mode(name: str):
    """The :class:`~rwkvtune.peft.base.Mode` called ``name`` (full, lora or state)."""
    if name == "full":
        from rwkvtune.peft.full import FullMode

        return FullMode()
    if name == "lora":
        from rwkvtune.peft.lora import LoraMode

        return LoraMode()
    if name == "state":
        from rwkvtune.peft.state import StateMode

        return StateMode()
    raise ConfigError(f"mode: found {name!r}, expected one of {', '.join(MODES)}")
