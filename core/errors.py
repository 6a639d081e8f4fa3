"""The plugin's one error hierarchy: everything a user can fix is an :class:`ADDError`.

Each message names the file or input, says what was wrong and how to fix it. ComfyUI shows a
failed node's exception as ``<module>.<class>``; under ComfyUI this package's module names are
derived from the server's folder, so the base class declares the short public name
``comfyui_add`` once, for itself and every subclass (wherever the subclass is defined), and users
read ``comfyui_add.ResumeConflict``, never a server path.

Pure Python: imported by every layer (core/, training/, nodes/, the headless trainer).
"""
from __future__ import annotations

PUBLIC_MODULE = "comfyui_add"


class ADDError(ValueError):
    """An error the user can fix; its message names the file or input and says what to do."""

    __module__ = PUBLIC_MODULE

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.__module__ = PUBLIC_MODULE  # one rule for the whole hierarchy (see the module docstring)


class ADDFileExistsError(ADDError, FileExistsError):
    """A save would replace an existing file the user did not ask to replace (also a FileExistsError)."""


class ScheduleError(ADDError):
    """A schedule input that cannot be used; the message names the field and the fix."""


class StreamError(ADDError):
    """A stream setting that cannot be used; the message names the input and the fix."""


class TAESDError(ADDError):
    """A TAESD file or latent that cannot be used, with what to do about it in the message."""


class ResumeConflict(ADDError):
    """A run of this name exists and the new settings cannot continue it."""


class TrainingFailed(ADDError):
    """A run ended without a usable LoRA (non-finite steps at the end, or a file that does not check out)."""


class NonFiniteTrainingError(TrainingFailed):
    """``max_nonfinite_steps`` consecutive iterations had a non-finite loss or gradient (the last good
    checkpoint is left as it was)."""


__all__ = ["PUBLIC_MODULE", "ADDError", "ADDFileExistsError", "ScheduleError", "StreamError", "TAESDError",
           "ResumeConflict", "TrainingFailed", "NonFiniteTrainingError"]
