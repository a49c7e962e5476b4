"""Errors a user can act on. The command line prints them as one line, without a traceback."""


class EvalkitError(Exception):
    """Base class: the message alone tells the user what is wrong and what to do."""


class ConfigError(EvalkitError):
    """A configuration names something that does not exist or has a bad value."""


class PromptError(EvalkitError):
    """A prompt cannot be used as given (a word not in it, too many tokens, missing annotations)."""


class MissingWeightsError(EvalkitError):
    """Model weights are not available locally and cannot be downloaded."""


class UnsafeWeightsError(EvalkitError):
    """A checkpoint file holds more than weights (pickled code), and is not loaded."""


class DatasetError(EvalkitError):
    """A dataset file has a bad row."""


class StoreError(EvalkitError):
    """The image store holds something unreadable."""

