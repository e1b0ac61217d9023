"""User-facing errors. Each message says what was wrong and what to do."""


class RaypipeError(Exception):
    """Base class for errors a user can fix (bad config, missing file, bad model)."""


class ConfigError(RaypipeError):
    """A config file, preset or override is invalid."""


class CatalogError(RaypipeError):
    """An ability file is missing a field, has a wrong type or names an unknown ability."""


class ModelError(RaypipeError):
    """A model id or directory does not resolve or does not load."""


class EndpointError(RaypipeError):
    """An LLM endpoint is unreachable or refuses the credentials."""
