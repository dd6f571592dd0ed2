"""User-facing errors.

Every error a user can cause (bad config, wrong checkpoint, malformed data) is raised as a
subclass of :class:`RwkvtuneError` with a message that names the file/field/key, what was
expected, what was found and what to do. The CLI prints the message on one line and exits 2,
without a traceback.
"""


class RwkvtuneError(Exception):
    """Base class for errors caused by user input (not bugs)."""


class ConfigError(RwkvtuneError, ValueError):
    """A model config or training recipe is invalid or cannot be found."""


class CheckpointError(RwkvtuneError, ValueError):
    """A checkpoint file is missing, unreadable, not RWKV-7, or does not fit the model."""


class DataError(RwkvtuneError, ValueError):
    """Training/eval data is missing or malformed."""


class OutputError(RwkvtuneError, OSError):
    """An output file or directory cannot be written (a file where a directory is needed,
    no permission, disk full)."""


class DownloadError(RwkvtuneError, OSError):
    """A model file cannot be downloaded (no network, not found on the hub, checksum mismatch,
    huggingface_hub missing)."""
