"""User-facing errors: each carries a one-line message naming the field or file at fault."""


class LlorchError(Exception):
    """Base class. The CLI prints `error: <message>` and exits non-zero; the server maps it to 400/500."""


class ModelLoadError(LlorchError):
    """A model file or folder is missing, corrupt, unsupported or unsafe (names the file/tensor/key)."""


class InvalidRequest(LlorchError):
    """A generation request has an invalid parameter (names the field)."""


class ContextOverflow(InvalidRequest):
    """Prompt plus requested tokens do not fit the model's context window."""
