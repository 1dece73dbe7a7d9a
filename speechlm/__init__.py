"""speechlm: a streaming interleaved speech-text language-model toolkit."""

__version__ = "0.1.0"
