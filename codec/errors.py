"""Exceptions whose message is written for the person at the keyboard.

The command line prints ``SpeechLMError`` messages as one line and exits
non-zero; every other exception is a bug and keeps its traceback.  This file
lives in the bottom layer (``speechlm.codec``) so that every layer can raise it
without importing upward.
"""


class SpeechLMError(Exception):
    """Base class for errors caused by bad input or a missing dependency."""


class AudioError(SpeechLMError, ValueError):
    """An audio file or buffer that cannot be used (missing, corrupt, empty, ...)."""


class DependencyError(SpeechLMError, RuntimeError):
    """A program or package that a feature needs is not installed."""
