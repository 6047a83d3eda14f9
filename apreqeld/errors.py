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
