"""Errors caused by the user's input. The CLI prints these without a traceback."""


class TunesmithError(Exception):
    """A mistake the user can fix: the message says what and where."""


class ConfigError(TunesmithError):
    pass


class DataError(TunesmithError):
    pass


class ModelError(TunesmithError):
    pass
