"""Where the shared, read-only pretrained checkpoints live.

The project keeps real weights outside the repository, in ``../shared/models``
relative to the repository root (``/work/main`` -> ``/work/shared/models``), so
that nothing large or separately licensed is ever committed. The environment
variable ``GRAPHPRESS_SHARED`` points at a different ``shared`` folder (the one
that *contains* ``models/``), e.g. on CI machines with another layout.

Every helper returns ``None`` (never raises) when the file is absent, so tests
can turn that into a ``pytest.skip`` with a clear reason.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable that overrides the location of the ``shared`` folder.
SHARED_ENV = "GRAPHPRESS_SHARED"

RESNET20_RELPATH = Path("resnet20_cifar10") / "resnet20-12fca82f.th"
STORIES260K_RELPATH = Path("stories260k") / "stories260K.bin"


def shared_dir() -> Path:
    """Return the ``shared`` folder (it may not exist).

    Returns
    -------
    Path
        ``$GRAPHPRESS_SHARED`` when set, else ``<repo root>/../shared``.
    """
    env = os.environ.get(SHARED_ENV)
    if env:
        return Path(env).expanduser().resolve()
    # graphpress/zoo/paths.py -> parents[2] is the repository root; shared/ is its sibling.
    return Path(__file__).resolve().parents[2].parent / "shared"


def shared_models_dir() -> Path:
    """Return ``<shared>/models`` (it may not exist)."""
    return shared_dir() / "models"


def _existing(relpath: Path) -> Path | None:
    path = shared_models_dir() / relpath
    return path if path.is_file() else None


def resnet20_checkpoint_path() -> Path | None:
    """Path of the pretrained CIFAR-10 ResNet-20 checkpoint, or ``None`` when absent.

    Returns
    -------
    Path or None
        ``<shared>/models/resnet20_cifar10/resnet20-12fca82f.th`` if it is a file.
    """
    return _existing(RESNET20_RELPATH)


def stories260k_path() -> Path | None:
    """Path of the stories260K llama2.c model, or ``None`` when absent.

    Returns
    -------
    Path or None
        ``<shared>/models/stories260k/stories260K.bin`` if it is a file.
    """
    return _existing(STORIES260K_RELPATH)


def expected_path(relpath: Path) -> Path:
    """Where a shared file would be, for error and skip messages."""
    return shared_models_dir() / relpath
