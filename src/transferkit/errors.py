"""Errors that mean "bad input": the CLI prints them as one line and exits with code 2."""


class TransferkitError(Exception):
    """Base class for every error transferkit raises on bad input or a missing resource."""


class DataError(TransferkitError):
    """A dataset is missing, empty, malformed or otherwise unusable."""


class ModelError(TransferkitError):
    """A model name is unknown, or its weights are missing, corrupt or do not fit."""


class AssetError(TransferkitError):
    """Fetching an asset failed: registry tool missing, download failed, checksum mismatch."""


class ConfigError(TransferkitError):
    """A configuration file or option is invalid."""
