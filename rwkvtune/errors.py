"""User-facing errors.

Every error a user can cause (bad config, wrong checkpoint, malformed data) is raised as a
subclass of :class:`RwkvtuneError` with a message that names the file/field/key, what was
expected, what was found and what to do. The CLI prints the message on one line and exits 2,
without a traceback.
"""


class RwkvtuneError(Exception):
    """Base class for errors caused by user input (not bugs)."""

    # True when every process of a distributed run raises this same error (they agreed on it, or
    # each read the same input): the CLI prints it on rank 0 only, so a run says it once.
    every_rank = False


def on_every_rank(e: RwkvtuneError) -> RwkvtuneError:
    """``e``, marked as raised alike by every process (see RwkvtuneError.every_rank)."""
    e.every_rank = True
    return e


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
