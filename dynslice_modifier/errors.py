"""Errors a user can act on. Each message names the cause and the fix."""


class DynSliceError(ValueError):
    """Base class of every error this package raises on purpose."""


class UnsupportedModelError(DynSliceError):
    """The model's architecture has no adapter, or cannot be rotated soundly."""


class CalibrationError(DynSliceError):
    """The calibration data cannot support the requested slicing."""


class AllocationError(DynSliceError):
    """The requested sparsity, slicing base or dims cannot be realised."""
