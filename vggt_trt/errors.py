"""Typed errors raised by the library; the command-line front ends map them to exit codes."""


class VggtTrtError(Exception):
    """Base class of every error this package raises on purpose."""


class InputError(VggtTrtError, ValueError):
    """Bad user input: a path, shape, value or flag combination that cannot work."""


class MissingDependencyError(VggtTrtError, ImportError):
    """An optional package is needed for the requested feature and is not installed."""


class WeightsError(VggtTrtError):
    """A checkpoint cannot be loaded into the model (wrong keys or shapes, unreadable file)."""


class GraphError(VggtTrtError):
    """An ONNX graph is invalid or not what a stage expects."""


class BuildError(VggtTrtError):
    """TensorRT could not parse or build a network."""


class AccuracyError(VggtTrtError):
    """A numeric check exceeded its tolerance."""
