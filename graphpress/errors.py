"""User-facing errors: each carries one line that names the file, node or option and what to do."""


class GraphpressError(Exception):
    """Base class; the CLI prints ``str(err)`` as one line and exits non-zero."""


class FrontendError(GraphpressError):
    """A checkpoint, architecture or model file could not be captured."""


class PassError(GraphpressError):
    """A pass could not run or its configuration is invalid."""


class VerificationError(GraphpressError):
    """A graph failed structural or numeric verification."""


class BackendError(GraphpressError):
    """Lowering to a backend failed or its outputs disagree with the graph."""


class ArtifactError(GraphpressError):
    """An artifact folder is missing, corrupt, or would overwrite user data."""
