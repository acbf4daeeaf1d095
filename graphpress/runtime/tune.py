"""Tune an artifact in place: the backend tunes a scratch copy, the runtime rewrites the artifact.

The split keeps the layering (``pyproject.toml``): the TVM backend's
:func:`~graphpress.backends.tvm.tune.tune_folder` tunes a folder of the files it lowered and
returns a summary; this module owns the artifact (its manifest, report and atomic rewrite).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from graphpress.backends.tvm.tune import TUNING_FILES, Progress, tune_folder, tuning_report
from graphpress.errors import BackendError
from graphpress.runtime.artifact import MANIFEST, REPORT, read_artifact, write_artifact


def tune_artifact(
    artifact: str | os.PathLike,
    trials: int,
    *,
    per_task: int | None = None,
    batch: int = 1,
    dims: dict[str, int] | None = None,
    progress: Progress | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Tune a ``tvm`` artifact folder in place: :func:`~graphpress.backends.tvm.tune.tune_folder`
    on a scratch copy beside it, then the artifact is rewritten atomically (files re-hashed,
    ``manifest["lowering"]["info"]["tuning"]``, a tuning section in ``report.md``). On any error
    the artifact is as it was.

    Parameters
    ----------
    artifact : path
        A ``--backend tvm`` artifact folder.
    trials, per_task, batch, dims, progress, timeout_s
        As for :func:`~graphpress.backends.tvm.tune.tune_folder`.

    Returns
    -------
    dict
        The tuning summary (see :func:`~graphpress.backends.tvm.tune.tune_folder`).

    Raises
    ------
    BackendError
        When the artifact is not a ``tvm`` one, or tuning fails.
    """
    art = read_artifact(artifact)
    if art.backend != "tvm":
        raise BackendError(f"{art.folder}: a {art.backend!r} artifact; only --backend tvm artifacts can be tuned")
    with tempfile.TemporaryDirectory(prefix=f".{art.folder.name}.tune-", dir=art.folder.parent) as tmp_name:
        tmp = Path(tmp_name)
        names = [n for n in art.manifest.get("files", {}) if n not in (MANIFEST, REPORT)]
        for name in names:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(art.folder / name, tmp / name)
        summary = tune_folder(tmp, trials, per_task=per_task, batch=batch, dims=dims, progress=progress, timeout_s=timeout_s)
        names = sorted({*names, *TUNING_FILES})
        manifest = json.loads(json.dumps(art.manifest))
        info = manifest.setdefault("lowering", {}).setdefault("info", {})
        info["tuned"] = True
        info["tuning"] = summary
        manifest.pop("files", None)
        report = art.report_md.rstrip() + "\n\n" + tuning_report(summary) + "\n"
        write_artifact(art.folder, {n: tmp / n for n in names}, manifest, report, overwrite=True)
    return summary


__all__ = ["tune_artifact"]
