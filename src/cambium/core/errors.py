"""The one exception hierarchy of cambium.

Every error a user can cause (a config typo, a corrupt file, a malformed network frame, a bad HTTP request) is raised
as a subclass of `CambiumError` whose message says what was wrong, quoting the offending value, and what to do. The CLI
prints such an error as one line and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class CambiumError(Exception):
    """Root of every error cambium raises on purpose. The message is meant for the user."""

    exit_code: int = 2


class ConfigError(CambiumError):
    """A config file or a `--set` override is wrong: unknown key, wrong type, out-of-range or inconsistent value."""


class DataError(CambiumError):
    """An input file or dataset is missing, malformed or violates a rule (names the file, row and rule)."""


class CheckpointError(CambiumError):
    """A checkpoint is missing, incomplete or does not match the run being resumed."""


class RunError(CambiumError):
    """A run directory or the run registry is missing or inconsistent."""


class ProtocolError(CambiumError):
    """A network message (HTTP response, websocket frame, bus message) does not follow its protocol."""


class DeviceError(CambiumError):
    """A kernel or dtype was asked for on a device that cannot run it (there is no silent downshift)."""


class DistributedError(CambiumError):
    """torch.distributed could not be initialised from the environment, or ranks disagree."""
