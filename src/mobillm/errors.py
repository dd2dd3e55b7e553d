"""The one exception family users see: every message is meant to be read by a person."""


class MobiLLMError(Exception):
    """Base class for errors that end a command with one clear message, not a traceback."""


class ConfigError(MobiLLMError, ValueError):
    """A config value is missing, out of range, or inconsistent with another."""
