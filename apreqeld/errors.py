"""Domain errors: problems the user can fix. Only the CLI turns them into one-line messages."""


class ApreqelError(Exception):
    """Base class of every error apreqel reports to the user as a single line."""


class InputError(ApreqelError):
    """A file, argument or option given by the user is missing, malformed or out of range."""


class ModelError(ApreqelError):
    """A GGUF model cannot be read, mapped onto sublayers or profiled."""


class EngineError(ApreqelError):
    """llama.cpp refused or failed an operation (load, quantize, decode)."""


class PlanError(ApreqelError):
    """A plan is inconsistent, or a built file does not match its plan."""


class DaemonError(ApreqelError):
    """The daemon refused or failed a request; `code` names the kind (wire error code)."""

    code = "failed"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class BusyError(DaemonError):
    """The daemon's request queue is full: try again later."""

    code = "busy"
