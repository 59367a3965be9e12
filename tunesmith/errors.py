"""Errors caused by the user's input. The CLI prints these without a traceback."""


class TunesmithError(Exception):
    """A mistake the user can fix: the message says what and where."""


class ConfigError(TunesmithError):
    pass


class DataError(TunesmithError):
    pass


class ModelError(TunesmithError):
    pass


class TrainingStopped(TunesmithError):
    """The run stopped on purpose (a signal, or a requested step) after writing a checkpoint."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
