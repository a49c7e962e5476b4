"""Errors a user can act on. The command line prints them as one line, without a traceback."""


class EvalkitError(Exception):
    """Base class: the message alone tells the user what is wrong and what to do."""


class ConfigError(EvalkitError):
    """A configuration names something that does not exist or has a bad value."""


class PromptError(EvalkitError):
    """A prompt cannot be used as given (a word not in it, too many tokens, missing annotations)."""


class MissingWeightsError(EvalkitError):
    """Model weights are not available locally and cannot be downloaded."""


class DatasetError(EvalkitError):
    """A dataset file has a bad row."""


class StoreError(EvalkitError):
    """The image store holds something unreadable."""


class NonFiniteLatentsError(EvalkitError):
    """A method's optimisation produced NaN or inf latents."""

    def __init__(self, step: int, message: str | None = None):
        self.step = step
        super().__init__(message or f"latents became NaN or inf at loop index {step}")
