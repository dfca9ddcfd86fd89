"""The one base class of errors a user can fix.

Every layer raises a subclass of `TandemError` for a problem the user can act on (a bad config
value, a missing artifact, a failed parity gate, a refused submission, an engine that cannot run
on this machine); its message names what is wrong and the fix. The CLI prints such an error as
one line without a traceback (exit 2 for a `ConfigError`, 1 for the rest) and lets anything
else surface as the bug it is. Subclasses also derive from the builtin their callers already
catch (`ValueError`, `RuntimeError`), so `except ValueError` around a lower layer keeps working.

This module imports nothing: every package may import it.
"""


class TandemError(Exception):
    """A problem the user can fix; the message says how."""


class EngineError(TandemError, ValueError):
    """An inference engine, precision, device or optimization that cannot be used as asked."""


class TrainingFailedError(TandemError, RuntimeError):
    """The training workers raised (the user's model, data or loss code, or a worker lost for good)."""


class DeploymentFailedError(TandemError, RuntimeError):
    """A Serve application's replicas could not start; the message carries their own reason."""
