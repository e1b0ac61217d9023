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


class IdentityChanged(RaypipeError):
    """A resume would change what OUT's rows mean (seed, models, templates, ...)."""


class ResumableStop(RaypipeError):
    """A run stopped cleanly and continues when the same command runs again.

    Its exit status is ``EXIT_RESUMABLE`` (75, EX_TEMPFAIL): a scheduler may simply retry.
    """


class LeaseHeld(ResumableStop):
    """Another live run holds OUT's lease: running again once it ended continues."""


class LeaseExpired(RaypipeError):
    """A run that stopped renewing (killed) left its lease: take it over with
    ``--take-over-lease`` once you know that run is gone."""


class LeaseLost(ResumableStop):
    """Another run took over OUT's lease: this run published nothing more and stopped."""


class ActorLost(ResumableStop):
    """An actor that holds the run's state (the planner, the writer) died: the run
    stopped; the same command makes what was lost again."""


#: Exit status of a run that stopped cleanly and continues when run again (EX_TEMPFAIL).
EXIT_RESUMABLE = 75
