"""The error of a bad setting, and the one-line check that raises it.

Its own module so that every layer can name a bad field the same way without importing
the config schema: the quantiser (``secagg.bits``), a site's policy, the deployment CLIs
(``--site``) and the schema's own validators all raise :class:`ConfigError`, and
:mod:`fedtune.config` stays a leaf that imports nothing of fedtune but this.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""

    def __init__(self, field_name: str, problem: str, fix: str) -> None:
        self.field = field_name
        super().__init__(f"config error in '{field_name}': {problem}. {fix}")


def require(cond: bool, field_name: str, problem: str, fix: str) -> None:
    """Raise ConfigError naming ``field_name``, the problem and the fix, unless ``cond``."""
    if not cond:
        raise ConfigError(field_name, problem, fix)
