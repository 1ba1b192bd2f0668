"""Every error torchless raises on bad input is a ``TorchlessError``.

Callers can catch the base class; the subclasses say what kind of input was wrong.
"""


class TorchlessError(Exception):
    """Base class of every error torchless raises on purpose."""


class UnknownArchitectureError(TorchlessError, ValueError):
    """No registered plugin recognises the model (or the name given)."""


class PluginError(TorchlessError):
    """A plugin is malformed, or two plugins claim the same name."""


class ConfigError(TorchlessError, ValueError):
    """config.json (or GGUF metadata) is missing a field or holds a bad value."""


class MissingTensorError(TorchlessError, KeyError):
    """A tensor the architecture needs is not in the checkpoint."""

    def __str__(self):  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class TensorShapeError(TorchlessError, ValueError):
    """A tensor exists but has the wrong shape."""


class CorruptFileError(TorchlessError, ValueError):
    """A weight file is truncated, corrupt, or not the format it claims to be."""


class UnsupportedError(TorchlessError, NotImplementedError):
    """A valid input that this version does not support (e.g. a tensor type)."""


class TokenError(TorchlessError, ValueError):
    """A token id outside the vocabulary."""


class SequenceLengthError(TorchlessError, ValueError):
    """A sequence longer than the ``max_seq_len`` the caller set."""
