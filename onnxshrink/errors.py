"""Domain errors. The library raises these; only the CLI turns them into exit codes."""

from __future__ import annotations


class OnnxShrinkError(Exception):
    """Base of every error the tool reports to a user as one line."""

    exit_code = 70


class UsageError(OnnxShrinkError):
    """Options that contradict each other or name things that do not exist."""

    exit_code = 2


class ModelLoadError(OnnxShrinkError):
    """The model file cannot be used: missing, not ONNX, truncated, corrupted."""

    exit_code = 3


class DataError(OnnxShrinkError):
    """The input data (.npz) cannot be used with this model."""

    exit_code = 3


class InputsUnavailable(DataError):
    """No data was given and no synthesized input runs the model: a command that needs none still writes its
    output, not validated (exit EXIT_NOT_VALIDATED); `validate` itself cannot go on (exit 3)."""


class UnsupportedModelError(OnnxShrinkError):
    """A valid model that this tool cannot process (and says why)."""

    exit_code = 4


class OutputError(OnnxShrinkError):
    """The output cannot be written (exists, bad directory, read-only, disk full)."""

    exit_code = 5


class ValidationFailed(OnnxShrinkError):
    """A requested accuracy or latency threshold failed."""

    exit_code = 1


EXIT_OK = 0
EXIT_THRESHOLD = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_UNSUPPORTED = 4
EXIT_OUTPUT = 5
EXIT_NOT_VALIDATED = 6  # the output is written, but validation could not run (no inputs the model runs on)
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130
