"""Domain errors, by what a caller can do about them.

Every error the core raises on purpose derives from one of these categories, and the
servers map the categories (not the individual errors) to status codes in one table
(`rpc.errors`), so a new error is mapped the moment it picks its category.
"""


class FreshrecError(Exception):
    """Base of the domain errors; raise a category, never this class itself."""


class InvalidArgument(FreshrecError, ValueError):
    """The request or input is invalid as given; retrying it unchanged cannot help."""


class NotFound(FreshrecError, LookupError):
    """The named user or item does not exist (where no fallback applies)."""


class FailedPrecondition(FreshrecError):
    """The system is not in a state to do it (e.g. a snapshot that cannot be loaded)."""


class Exhausted(FreshrecError):
    """Overloaded or out of space: retry later, with backoff."""


class Unavailable(FreshrecError):
    """A transient failure (shutting down, an I/O error); nothing was acknowledged: retry."""
