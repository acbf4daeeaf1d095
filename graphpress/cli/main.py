"""The ``compress`` command line: a thin layer over :mod:`graphpress.api`.

Every user error (a :class:`~graphpress.errors.GraphpressError`) is printed as one line on
stderr with exit code 2; an unexpected exception prints one line too (exit 3) unless
``--debug`` asks for the traceback.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from graphpress.cli.report import (
    StageProgress,
    console,
    err_console,
    fmt_bytes,
    latency_table,
    passes_table,
    result_table,
    set_user_stderr,
    summary_table,
)
from graphpress.errors import GraphpressError

app = typer.Typer(
    name="compress",
    help="graphpress: capture a model, run verified compression passes, export an optimized artifact.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_DEBUG = {"on": False}


@contextlib.contextmanager
def _quiet():
    """Without --debug, library chatter never reaches the user's stderr while a command runs.

    torch.export prints partial graphs on ``sys.stderr`` when it fails, torch logs through
    handlers bound to the stderr of import time, and torch / onnx warn about things users
    cannot act on: ``sys.stderr`` is redirected to a buffer, logging is disabled and warnings
    are ignored, all restored afterwards. The one-line error is printed after this block, and
    plain progress lines go to the real stderr (:func:`graphpress.cli.report.set_user_stderr`).
    """
    os.environ.setdefault("TORCH_LOGS", "-all")
    if _DEBUG["on"]:
        yield
        return
    previous = logging.root.manager.disable
    set_user_stderr(sys.stderr)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            logging.disable(logging.CRITICAL)
            yield
    finally:
        logging.disable(previous)
        set_user_stderr(None)


def handle_errors(fn: Callable) -> Callable:
    """One line and a non-zero exit for every failure; never a traceback unless --debug."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        message, code = None, 0
        with _quiet():
            try:
                return fn(*args, **kwargs)
            except typer.Exit:
                raise
            except GraphpressError as err:
                if _DEBUG["on"]:
                    raise
                message, code = f"[red]error:[/red] {err}", 2
            except KeyboardInterrupt as err:
                message, code = f"[red]interrupted[/red]{': ' + str(err) if str(err) else ''}", 130
            except Exception as err:  # noqa: BLE001 -- last line of defence for users
                if _DEBUG["on"]:
                    raise
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                message = f"[red]internal error:[/red] {type(err).__name__}: {first[:300]} (rerun with --debug for the traceback)"
                code = 3
        # outside _quiet: the user's own stderr again
        err_console.print(message, highlight=False, soft_wrap=True)
        raise typer.Exit(code) from None

    return wrapper


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors.")) -> None:
    _DEBUG["on"] = debug


# ---------------------------------------------------------------------------- run
@app.command()
@handle_errors
def run(
    ctx: typer.Context,
    checkpoint: str = typer.Argument(..., help="Model: .th/.pt/.pth checkpoint, .safetensors, .onnx, llama2.c .bin, HF folder, or package.module:factory."),
    recipe: str = typer.Option("default", "--recipe", "-r", help="Recipe YAML file or built-in name."),
    backend: Optional[str] = typer.Option(None, "--backend", "-b", help="Backend to lower to: onnxruntime (default, or the recipe's backend:), torch, tvm, he."),
    backend_option: Optional[list[str]] = typer.Option(
        None, "--backend-option", "-B", help="A backend option KEY=VALUE, the value read as YAML (repeatable), e.g. -B opset=20; see docs/backends/."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact folder to write (must not exist unless --overwrite)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture for weight-only files: package.module:factory."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="Example input shape, e.g. 1x3x32x32."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing artifact folder."),
    bench: Optional[bool] = typer.Option(None, "--bench/--no-bench", help="Measure batch-1 latency before/after (default: on, off for --backend he: use 'compress bench')."),
    baseline: bool = typer.Option(True, "--baseline/--no-baseline", help="Also time the original graph on the backend."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="Inputs for data-driven passes (.pt/.npy/.npz/.safetensors)."),
    finetune_data: Optional[Path] = typer.Option(None, "--finetune-data", help="Unlabelled inputs for recovery fine-tuning by distillation."),
    finetune_epochs: int = typer.Option(10, "--finetune-epochs", help="Maximum fine-tuning epochs (early stopping on a held-out split)."),
    finetune_lr: float = typer.Option(1e-3, "--finetune-lr", help="Fine-tuning learning rate."),
    finetune_schedule: str = typer.Option("constant", "--finetune-schedule", help="Fine-tuning learning-rate schedule: constant, or cosine (decays to 0 over --finetune-epochs)."),
    finetune_trainable: str = typer.Option(
        "auto",
        "--finetune-trainable",
        help="What fine-tuning trains: auto (the tensors passes mark trainable, else every weight), annotated, or all (pruned weights keep their zeros).",
    ),
    he_encoding: Optional[str] = typer.Option(None, "--he-encoding", help="= --backend-option encoding=... (--backend he): coeff-circulant (default) | coeff-dense | slot-dense."),
    he_protocol: Optional[str] = typer.Option(None, "--he-protocol", help="= --backend-option protocol=... (--backend he): secure (default: two parties, HE on secret shares + SPU 2PC; run 'compress secure-setup' once) | interactive (debugging: the client sees activations) | polynomial (CKKS)."),
    he_act_bits: Optional[int] = typer.Option(None, "--he-act-bits", help="= --backend-option act_bits=... (--backend he): fixed-point bits of the encrypted activations (default 8)."),
    he_weight_bits: Optional[int] = typer.Option(None, "--he-weight-bits", help="= --backend-option weight_bits=... (--backend he): fixed-point bits of the weights (default 8)."),
    tvm_tune: Optional[int] = typer.Option(None, "--tvm-tune", help="= --backend-option tune_trials=... (--backend tvm): MetaSchedule trials (batch 1) before writing the artifact."),
    tvm_db: Optional[Path] = typer.Option(None, "--tvm-db", help="= --backend-option tuning_db=... (--backend tvm): reuse the tuning database of an earlier tuned artifact (or its tuning/ folder)."),
    workers: int = typer.Option(
        1, "--workers", help="With --stream: local processes (torch.distributed, gloo) sharing the calibration data and the per-layer solves; rank 0 writes the artifact.",
    ),
    kv_cache: bool = typer.Option(
        False, "--kv-cache",
        help="Hugging Face causal LMs and llama2.c files: capture one generation step with a KV cache (past keys/values in, present out), so the artifact generates a token per step instead of re-running the sequence. See docs/frontends/kv-cache.md.",
    ),
    require_speedup: Optional[float] = typer.Option(
        None, "--require-speedup", help="Fail unless the artifact is at least R times faster than the original on the backend (names the layers that cost time).",
    ),
    stream: str = typer.Option(
        "auto", "--stream",
        help="Decoder LLM folders: compress block by block from the shards, in a fraction of the model's size in memory (on), the whole graph at once (off), or on above 1 GB of float32 weights (auto). See docs/big-models.md.",
    ),
) -> None:
    """Compress CHECKPOINT with a recipe and write a verified artifact with a report."""
    from graphpress.api import check_out_dir, check_recipe, compress, finetune_trainable_modes, stream_choice

    check_out_dir(out, overwrite)  # fail before minutes of work
    why = stream_choice(checkpoint, stream)
    if why is not None and require_speedup is not None:
        raise GraphpressError("--require-speedup: a streamed run times no float baseline; use --stream off, or time the artifact with 'compress bench'")
    if why is not None:
        _run_stream(checkpoint, why, recipe=recipe, out=out, overwrite=overwrite, backend=backend, backend_option=backend_option,
                    bench=bench, calibration=calibration, finetune_data=finetune_data, workers=workers, kv_cache=kv_cache)
        return
    if workers != 1:
        raise GraphpressError(f"--workers {workers}: several processes split a streamed run only; add --stream on (decoder-LLM folders)")
    modes = finetune_trainable_modes()
    if finetune_trainable not in modes:
        raise GraphpressError(f"--finetune-trainable {finetune_trainable!r}: use one of {', '.join(modes)}")
    if finetune_schedule not in ("constant", "cosine"):
        raise GraphpressError(f"--finetune-schedule {finetune_schedule!r}: use constant or cosine")
    name = backend or check_recipe(recipe).backend or "onnxruntime"
    options = backend_options_from_flags(name, backend_option, ctx.params)
    if bench is None:
        bench = name != "he"  # encrypted inference is seconds per call: time it with 'compress bench'
    with StageProgress() as prog:
        result = compress(
            checkpoint,
            out=out,
            recipe=recipe,
            backend=backend,
            backend_options=options,
            arch=arch,
            input_shape=input_shape,
            overwrite=overwrite,
            bench=bench,
            baseline=baseline,
            calibration=calibration,
            finetune_inputs=finetune_data,
            finetune={"epochs": finetune_epochs, "lr": finetune_lr, "trainable": finetune_trainable, "lr_schedule": finetune_schedule},
            kv_cache=kv_cache,
            require_speedup=require_speedup,
            **_progress_hooks(prog),
        )
    if result.manifest["passes"]:
        console.print(passes_table(result.manifest["passes"]))
    if result.manifest.get("finetune"):
        ft = result.manifest["finetune"]
        best = ft["history"][ft["best_epoch"] - 1]["val_loss"] if ft["best_epoch"] > 0 else "no improvement"
        what = {"all": "weights", "annotated": "compact values"}.get(ft.get("trainable", ""), "values")
        console.print(
            f"fine-tuned {ft['params_trained']:,} {what} in {len(ft['history'])} epoch(s)"
            f"{' (stopped early)' if ft['stopped_early'] else ''}; best epoch {ft['best_epoch']}, val loss {best}"
        )
    _print_result(result.manifest)
    if result.manifest["backend"] == "he":
        _print_he_lowering(result.folder)
    console.print(f"artifact: [bold]{result.folder}[/bold] (report.md, manifest.json)")


@app.command()
@handle_errors
def auto(
    checkpoint: str = typer.Argument(..., help="Model, as for 'run'."),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact folder to write (must not exist unless --overwrite)."),
    calibration: Path = typer.Option(..., "--calibration", help="Representative inputs (.pt/.npy/.npz/.safetensors); without --eval-data, half is held out to measure candidates."),
    objective: str = typer.Option("latency", "--objective", help="latency (measured on ONNX Runtime) | size (artifact bytes) | he-latency (encrypted inference, with --backend he)."),
    max_drop: float = typer.Option(0.01, "--max-drop", help="Quality budget: a fraction for agreement/accuracy (0.01 = 1%), nats for kl, the lowest dB for sqnr."),
    metric: str = typer.Option("agreement", "--metric", help="agreement (top-1 with the float model) | accuracy (needs --labels) | kl | sqnr."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="Held-out inputs the candidates are measured on."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Class ids of the evaluation inputs (for --metric accuracy)."),
    backend: str = typer.Option("onnxruntime", "--backend", "-b", help="Target the costs are measured on: onnxruntime, or he for --objective he-latency."),
    poly_degree: int = typer.Option(4096, "--poly-degree", "-N", help="--objective he-latency: the HE ring degree costs are predicted and measured at."),
    finetune_data: Optional[Path] = typer.Option(None, "--finetune-data", help="Unlabelled inputs: distill every measured candidate from the float model before measuring it."),
    finetune_epochs: int = typer.Option(3, "--finetune-epochs", help="Distillation epochs per candidate (with --finetune-data)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture for weight-only files: package.module:factory."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="Example input shape, e.g. 1x3x32x32."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads for costs and timing (default: all cores torch uses)."),
    ray: bool = typer.Option(False, "--ray", help="Run the trials as Ray tasks on a local Ray that graphpress starts and stops."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Run the trials on the Ray cluster at ADDR (implies --ray)."),
    workers: int = typer.Option(2, "--workers", help="CPUs of the local Ray (--ray)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing artifact folder."),
    seed: int = typer.Option(0, "--seed", help="Seed of calibration and verification."),
    require_speedup: Optional[float] = typer.Option(None, "--require-speedup", help="Fail unless the artifact is at least R times faster than the float model."),
) -> None:
    """Search quantization and pruning per layer under one quality budget; write the fastest (or smallest) verified artifact and a Pareto report."""
    from graphpress.api import auto as run_auto, check_out_dir

    check_out_dir(out, overwrite)
    with StageProgress() as prog:
        result = run_auto(checkpoint, out=out, calibration=calibration, objective=objective, max_drop=max_drop, metric=metric,
                          eval_data=eval_data, labels=labels, backend=backend, arch=arch, input_shape=input_shape, overwrite=overwrite,
                          threads=threads, ray=ray, ray_address=ray_address, workers=workers, seed=seed,
                          require_speedup=require_speedup, poly_degree=poly_degree, finetune_data=finetune_data,
                          finetune={"epochs": finetune_epochs}, on_stage=prog.stage, on_step=prog.inner)
    _print_frontier(result.folder)
    _print_result(result.manifest)
    au = result.manifest["auto"]
    console.print(f"chosen: {au['chosen']} (measured drop {au['quality'].get('drop'):.4g}, {au['candidates']} candidates measured)", soft_wrap=True)
    console.print(f"artifact: [bold]{result.folder}[/bold] (report.md, pareto.html, manifest.json)")


def _print_frontier(folder: Path) -> None:
    from graphpress.api import AUTO_RECORD as JSON
    from graphpress.cli.report import frontier_table

    path = folder / JSON
    if path.is_file():
        console.print(frontier_table(json.loads(path.read_text(encoding="utf-8"))))


def _run_stream(checkpoint: str, why: str, *, recipe: str, out: Path, overwrite: bool, backend: Optional[str],
                backend_option: Optional[list[str]], bench: Optional[bool], calibration: Optional[Path], finetune_data: Optional[Path],
                workers: int = 1, kv_cache: bool = False) -> None:
    """``compress run --stream``: the streamed path (ONNX Runtime only, no fine-tuning, no latency stage)."""
    from graphpress.api import check_recipe, compress_stream

    name = backend or check_recipe(recipe).backend or "onnxruntime"
    if name != "onnxruntime" or backend_option:
        raise GraphpressError(f"--stream: streamed artifacts are ONNX Runtime models with default options; drop --backend {name}"
                              f"{' and --backend-option' if backend_option else ''} or use --stream off")
    if finetune_data is not None:
        raise GraphpressError("--stream: recovery fine-tuning needs the whole model in memory; drop --finetune-data or use --stream off")
    if os.environ.get("RANK", "0") == "0":
        console.print(why)
    with StageProgress() as prog:
        prog.stage("stream")

        def on_unit(done: int, total: int, record: Any) -> None:
            sq = "" if record.sqnr_db is None else f", SQNR {record.sqnr_db:.1f} dB"
            prog.step(done, total, f"{record.unit} ({record.time_s:.1f} s, RSS {record.rss_mb} MB{sq})")

        result = compress_stream(checkpoint, out=out, recipe=recipe, overwrite=overwrite, calibration=calibration, on_unit=on_unit,
                                 options={"workers": workers, "kv_cache": kv_cache})
    if result is None:  # a rank other than 0 of a torchrun job: rank 0 reports and writes
        return
    s = result.manifest["stream"]
    e2e = s["end_to_end"]
    ort = e2e["onnxruntime"]
    console.print(
        f"{len(s['units'])} units in {s['wall_s']} s; worst block SQNR {s['worst_block_sqnr_db']} dB; held-out KL {e2e['kl']:.4g}, "
        f"top-1 agreement {e2e['top1_agreement']:.3f}; ONNX Runtime check passed (max abs {ort['max_abs']:.3g}"
        + (f", decode step after {ort['decode_step']['past']} cached tokens included" if "decode_step" in ort else "") + ")",
        soft_wrap=True,  # one line whatever the numbers' widths (a hard wrap split it mid-phrase)
    )
    if bench:
        console.print(f"latency is not measured in streaming mode: run 'compress bench {result.folder}'")
    console.print(f"artifact: [bold]{result.folder}[/bold] (report.md, manifest.json)")


# Documented shorthands for --backend-option: flag -> (backend, option). The flags are declared
# on `run` like any option; this table is all that maps them, and a new backend needs no entry
# (its options are reached with --backend-option).
BACKEND_OPTION_ALIASES: dict[str, tuple[str, str]] = {
    "--he-encoding": ("he", "encoding"),
    "--he-protocol": ("he", "protocol"),
    "--he-act-bits": ("he", "act_bits"),
    "--he-weight-bits": ("he", "weight_bits"),
    "--tvm-tune": ("tvm", "tune_trials"),
    "--tvm-db": ("tvm", "tuning_db"),
}


def parse_backend_options(items: Optional[list[str]]) -> dict[str, Any]:
    """``["opset=20", "check_seeds=[0, 3]"]`` -> ``{"opset": 20, "check_seeds": [0, 3]}``.

    Each value is read as YAML (``8`` an int, ``true`` a bool, ``[0, 1]`` a list, ``coeff-dense``
    a string); a dash in a key reads as an underscore. The backend's options class checks keys
    and types afterwards (:func:`graphpress.api.backend_options`).
    """
    import yaml

    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise GraphpressError(f"--backend-option {item!r}: expected KEY=VALUE, e.g. --backend-option opset=20")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise GraphpressError(f"--backend-option {item!r}: the value is not valid YAML ({getattr(err, 'problem', err)})") from None
        if key in options and options[key] != value:
            raise GraphpressError(f"--backend-option {key} given twice ({options[key]!r} and {value!r}); keep one")
        options[key] = value
    return options


def backend_options_from_flags(backend: str, items: Optional[list[str]], params: dict[str, Any]) -> dict[str, Any]:
    """The backend options of a ``run`` command line: ``--backend-option`` items and the alias
    flags of :data:`BACKEND_OPTION_ALIASES` (``params``: the command's parameters by name).

    Raises a one-line error for an alias of another backend than ``backend`` and for an alias
    and a ``--backend-option`` that set one option to different values.
    """
    options = parse_backend_options(items)
    given = {flag: params.get(flag[2:].replace("-", "_")) for flag in BACKEND_OPTION_ALIASES}
    given = {flag: value for flag, value in given.items() if value is not None}
    for owner in sorted({BACKEND_OPTION_ALIASES[flag][0] for flag in given}):
        if owner != backend:
            flags = ", ".join(flag for flag in given if BACKEND_OPTION_ALIASES[flag][0] == owner)
            raise GraphpressError(f"{flags}: only for --backend {owner} (got --backend {backend})")
    for flag, value in given.items():
        key = BACKEND_OPTION_ALIASES[flag][1]
        value = str(value) if isinstance(value, Path) else value
        if key in options and options[key] != value:
            raise GraphpressError(f"{flag} {value} and --backend-option {key}={options[key]} disagree; keep one")
        options[key] = value
    return options


def _progress_hooks(prog: StageProgress) -> dict[str, Callable[..., None]]:
    """The :func:`graphpress.api.compress` hooks that drive ``prog``: stages, passes, a pass's
    layers, fine-tuning epochs, verification sets and latency rounds."""

    def on_event(kind: str, i: int, total: int, record: Any) -> None:
        prog.step(i if kind == "start" else i + 1, total, f"pass {record.name}")

    def on_epoch(epoch: int, total: int, record: dict) -> None:
        prog.step(epoch, total, f"epoch (val loss {record['val_loss']:.4g})")

    return {"on_stage": prog.stage, "on_event": on_event, "on_epoch": on_epoch, "on_step": prog.inner}


def _print_he_lowering(folder: Path) -> None:
    """The HE check run's per-layer table (predicted vs measured) and the protocol's threat line."""
    from graphpress.cli.report import he_layers_table

    program = json.loads((folder / "he_program.json").read_text(encoding="utf-8"))
    cost_path = folder / "he_cost.json"
    if program.get("protocol") == "interactive" and cost_path.is_file():
        cost = json.loads(cost_path.read_text(encoding="utf-8"))
        console.print(he_layers_table(cost, f"encrypted layers, check run on {cost['inputs']} (batch {cost['batch']})"))
        if cost.get("total_predicted_s") is None:
            console.print("no cached per-op costs for some parameters: run 'compress he-calibrate' for predictions")
    run_path = folder / "secure_check.json"
    if program.get("protocol") == "secure" and run_path.is_file():
        r = json.loads(run_path.read_text(encoding="utf-8"))
        console.print(
            f"secure check: {r['samples']} sample(s) between two processes in {r['wall_s']:.1f} s, outputs bit-exact vs the fixed-point "
            f"simulation; client -> server {(r['he_bytes_client_to_server'] + r['spu_bytes_client_to_server']) / 1e6:.1f} MB, "
            f"server -> client {(r['he_bytes_server_to_client'] + r['spu_bytes_server_to_client']) / 1e6:.1f} MB, {r['spu_rounds']} SPU rounds",
            soft_wrap=True,
        )
    sec = program.get("security", {})
    if sec:
        console.print(f"protocol {sec.get('name')} ({sec.get('scheme')}): the client learns {sec.get('client_learns')}", soft_wrap=True)


def _print_result(manifest: dict[str, Any]) -> None:
    from graphpress.api import speedup_verdict

    console.print(result_table(manifest))
    lat = latency_table(manifest)
    if lat is not None:
        console.print(lat)
    verdict = speedup_verdict(manifest.get("metrics", {}))
    if verdict:
        console.print(f"[yellow]speed-up guard:[/yellow] {verdict}", soft_wrap=True)


# ---------------------------------------------------------------------------- passes
@app.command()
@handle_errors
def passes(
    onnx_ops: bool = typer.Option(False, "--onnx-ops", help="List the ONNX ops the ONNX importer supports instead."),
) -> None:
    """List registered passes (or supported ONNX ops)."""
    from rich.table import Table

    from graphpress.api import list_passes, supported_onnx_ops

    if onnx_ops:
        ops = supported_onnx_ops()
        console.print(f"{len(ops)} ONNX ops supported: " + ", ".join(ops), soft_wrap=True)
        return

    t = Table(title="Registered passes", title_justify="left")
    t.add_column("name")
    t.add_column("kind")
    t.add_column("budget (default)")
    t.add_column("options")
    t.add_column("what it does")
    for info in list_passes():
        defaults = info["defaults"]
        opts = ", ".join(f"{k}={v!r}" for k, v in defaults.items() if k != "version")
        if info["exact"]:
            budget = "allclose"
        else:
            parts = [f"SQNR >= {defaults['min_sqnr_db']:g} dB"] if defaults.get("min_sqnr_db") is not None else []
            parts += [f"KL <= {defaults['max_kl']:g}"] if defaults.get("max_kl") is not None else []
            budget = ", ".join(parts) or "none"
            if "on_budget" in defaults:
                budget += f"; on miss: {defaults['on_budget']}"
        t.add_row(info["name"], "exact" if info["exact"] else "lossy", budget, opts or "-", info["summary"])
    console.print(t)


# ---------------------------------------------------------------------------- inspect
@app.command()
@handle_errors
def inspect(
    target: str = typer.Argument(..., help="A model source (as for 'run') or an artifact folder."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture for weight-only files."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="Example input shape, e.g. 1x3x32x32."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Summarize a model (ops, params, FLOPs per layer) or an artifact (manifest, metrics)."""
    path = Path(target)
    from graphpress.api import load_artifact, load_model

    if path.is_dir() and (path / "manifest.json").is_file():
        model = load_artifact(path)
        m = model.manifest
        if as_json:
            console.print_json(json.dumps(m))
            return
        from rich.table import Table

        t = Table(title=f"artifact {path}", title_justify="left")
        t.add_column("field")
        t.add_column("value", overflow="fold")
        t.add_row("backend", f"{m['backend']} ({m['model_file']})")
        if m.get("backend_options"):  # artifacts written before backend options have none
            t.add_row("backend options", ", ".join(f"{k}={v!r}" for k, v in m["backend_options"].items() if k != "version"))
        t.add_row("created", f"{m.get('created')} by graphpress {m.get('graphpress_version')}")
        t.add_row("inputs", ", ".join(f"{s['name']}{s['shape']} {s['dtype']}" for s in m["inputs"]))
        t.add_row("outputs", ", ".join(f"{s['name']}{s['shape']} {s['dtype']}" for s in m["outputs"]))
        t.add_row("recipe", " -> ".join(next(iter(p)) for p in m.get("recipe", {}).get("passes", [])) or "-")
        t.add_row("files", ", ".join(f"{k} ({fmt_bytes(v['bytes'])})" for k, v in m["files"].items()))
        console.print(t)
        if m.get("auto"):
            _print_frontier(path)
        if m.get("metrics"):
            _print_result(m)
        return
    graph = load_model(target, arch=arch, input_shape=input_shape)
    summary = graph.summary()
    if as_json:
        console.print_json(
            json.dumps(
                {
                    "name": summary.name,
                    "params": summary.params,
                    "param_bytes": summary.param_bytes,
                    "flops": summary.flops,
                    "op_counts": summary.op_counts,
                    "layers": [r.__dict__ | {"shape": list(r.shape)} for r in summary.rows],
                }
            )
        )
        return
    console.print(summary_table(summary))
    console.print("ops: " + ", ".join(f"{k} x{v}" for k, v in summary.op_counts.items()), soft_wrap=True)


# ---------------------------------------------------------------------------- bench
@app.command()
@handle_errors
def bench(
    artifact: Path = typer.Argument(..., help="Artifact folder written by 'compress run'."),
    batch: int = typer.Option(1, "--batch", help="Batch size for the dynamic batch dimension."),
    repeat: Optional[int] = typer.Option(None, "--repeat", help="Timed runs (default 50; 3 encrypted inferences for HE artifacts)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads for the runtime."),
    dim: Optional[list[str]] = typer.Option(None, "--dim", help="A dynamic dim's size, e.g. --dim seq=128 (repeatable; default: the size it was exported with)."),
) -> None:
    """Measure an artifact's latency on random inputs of its input specs (HE: per-layer predicted vs measured)."""
    import numpy as np
    from rich.table import Table

    from graphpress.api import benchmark, load_artifact

    if batch < 1:
        raise GraphpressError(f"--batch {batch}: must be at least 1")
    if repeat is not None and repeat < 1:
        raise GraphpressError(f"--repeat {repeat}: must be at least 1")
    dims = parse_dims(dim)
    model = load_artifact(artifact, **({"threads": threads} if threads else {}))
    shapes = bench_shapes(model.manifest, batch, dims)
    rng = np.random.default_rng(0)
    inputs = []
    for spec, shape in zip(model.manifest["inputs"], shapes):
        if spec["dtype"].startswith("float"):
            inputs.append(rng.standard_normal(shape).astype(spec["dtype"]))
        else:
            inputs.append(rng.integers(0, 2, shape).astype(spec["dtype"]))
    if model.manifest["backend"] == "he":
        _bench_he(artifact, model, inputs, batch, repeat or 3)
        return
    res = benchmark(lambda: model(*inputs), repeat=repeat or 50)
    shown = ", ".join(f"{s['name']} {tuple(sh)}" for s, sh in zip(model.manifest["inputs"], shapes))
    t = Table(title=f"{artifact} ({model.manifest['backend']}, batch {batch}; {shown})", title_justify="left")
    for col in ("median ms", "p10 ms", "p90 ms", "runs"):
        t.add_column(col, justify="right")
    t.add_row(f"{res.median_ms:.3f}", f"{res.p10_ms:.3f}", f"{res.p90_ms:.3f}", str(res.n))
    console.print(t)


@app.command()
@handle_errors
def generate(
    artifact: Path = typer.Argument(..., help="Decoder artifact folder (input_ids -> logits, or made with --kv-cache)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Text, encoded with the tokenizer.json of the model's source folder."),
    prompt_ids: Optional[str] = typer.Option(None, "--prompt-ids", help="Token ids, e.g. '1 15 27' (or comma-separated)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", help="0: greedy; else the softmax temperature."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Sample among the k most likely tokens."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Sample within this probability mass (nucleus)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the sampler."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads for the runtime."),
) -> None:
    """Continue a prompt with a decoder artifact, printing tokens as they come."""
    import time

    import numpy as np

    from graphpress.api import artifact_tokenizer, load_artifact

    if (prompt is None) == (prompt_ids is None):
        raise GraphpressError("give exactly one of --prompt TEXT or --prompt-ids 'ID ID ...'")
    if max_new_tokens < 1:
        raise GraphpressError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    ids: list[int] = []
    if prompt_ids is not None:
        try:
            ids = [int(t) for t in prompt_ids.replace(",", " ").split()]
        except ValueError:
            raise GraphpressError(f"--prompt-ids {prompt_ids!r}: not a list of integers") from None
        if not ids:
            raise GraphpressError("--prompt-ids: no token ids given")
    model = load_artifact(artifact, **({"threads": threads} if threads else {}))
    tok = artifact_tokenizer(model)
    if prompt is not None:
        if tok is None:
            raise GraphpressError(f"{artifact}: no tokenizer.json in the model's source folder to encode --prompt; pass --prompt-ids")
        ids = tok.encode(prompt).ids
        if not ids:
            raise GraphpressError("--prompt: the tokenizer gives no tokens for it")

    def show(step: int, new: np.ndarray) -> None:
        if step == 0:  # the prompt, once generation is under way (a refused prompt prints nothing)
            console.print(tok.decode(ids) if tok is not None else " ".join(map(str, ids)), end="", style="dim", highlight=False)
        t = int(new[0])
        console.print((" " + tok.decode([t])) if tok is not None else f" {t}", end="", highlight=False)

    t0 = time.perf_counter()
    out = model.generate(np.array([ids]), max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, on_token=show)
    wall = time.perf_counter() - t0
    made = out.shape[1] - len(ids)
    console.print()
    how = "KV cache: one token per step" if getattr(model, "kv_cache", False) else "no KV cache: each step re-runs the sequence"
    kv_bits = ((model.manifest.get("lowering") or {}).get("info") or {}).get("kv_cache_bits")
    if kv_bits:
        how += f", caches stored in {'/'.join(map(str, sorted(set(kv_bits.values()))))}-bit codes"
    console.print(f"{made} tokens in {wall:.2f} s ({made / wall:.1f} tokens/s; {how})", style="dim")


def parse_dims(items: Optional[list[str]], option: str = "--dim") -> dict[str, int]:
    """``["seq=128"]`` -> ``{"seq": 128}``; one-line error for anything else."""
    dims: dict[str, int] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip().isdigit() or int(value) < 1:
            raise GraphpressError(f"{option} {item!r}: expected NAME=INT with INT >= 1, e.g. {option} seq=128")
        dims[name.strip()] = int(value)
    return dims


def bench_shapes(manifest: dict[str, Any], batch: int, dims: dict[str, int]) -> list[list[int]]:
    """Concrete input shapes of an artifact: ``batch`` for the batch dim, ``dims`` (``--dim``)
    or the example shape the model was exported with for any other symbolic dim.

    Raises a one-line error for a ``--dim`` that names no dim of the inputs, or a symbolic dim
    with neither (artifacts written before the manifest kept example shapes).
    """
    names = {d for spec in manifest["inputs"] for d in spec["shape"] if isinstance(d, str)}
    unknown = sorted(set(dims) - names - {"batch"})
    if unknown:
        have = ", ".join(sorted(names)) or "none"
        raise GraphpressError(f"--dim {unknown[0]}: the artifact's inputs have no such dim (dynamic dims: {have})")
    examples = manifest.get("example_shapes") or {}
    shapes = []
    for spec in manifest["inputs"]:
        example = examples.get(spec["name"])
        shape = []
        for i, d in enumerate(spec["shape"]):
            if not isinstance(d, str):
                shape.append(int(d))
            elif d in dims:
                shape.append(dims[d])
            elif d == "batch":
                shape.append(batch)
            elif example is not None and i < len(example):
                shape.append(int(example[i]))
            else:
                raise GraphpressError(f"{spec['name']}: dynamic dim '{d}' has no recorded size; pass --dim {d}=N")
        shapes.append(shape)
    return shapes


def _bench_secure(artifact: Path, runner: Any, inputs: list[Any], batch: int, repeat: int) -> None:
    """Two-party runs of a secure HE artifact: per encrypted layer median seconds and bytes (and
    the cost model's prediction when this machine's costs are cached), SPU seconds, totals."""
    import statistics

    from rich.table import Table

    from graphpress.api import secure_cost_prediction

    runs = []
    with StageProgress() as prog:
        prog.stage("two-party inference", total=repeat)
        for i in range(repeat):
            runner(*inputs)
            runs.append(runner.last_run)
            prog.step(i + 1, repeat, "two-party inference")
    pred = secure_cost_prediction(artifact)
    by_layer = {r["name"]: r for r in pred["layers"]}
    table = Table(title=f"{artifact} (he, secure two-party protocol, batch {batch}, median of {repeat} runs, sample 0)")
    for col in ("layer", "b", "N", "in cts", "out cts", "products", "measured ms", "predicted ms", "KB up", "KB down"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    he_rows = [[r for r in run.client["rows"] if r["kind"] == "he" and r.get("sample") == 0] for run in runs]
    for k, row in enumerate(he_rows[0]):
        p = by_layer.get(row["name"], {})
        meas = statistics.median(rows[k]["wall_s"] for rows in he_rows)
        pms = f"{1e3 * p['predicted_s']:.1f}" if p.get("predicted_s") is not None else "-"
        table.add_row(row["name"], str(row["b"]), str(p.get("poly_degree", "")), str(p.get("inputs", "")), str(p.get("outputs", "")),
                      str(p.get("products", "")), f"{1e3 * meas:.1f}", pms, f"{row['bytes_up'] / 1e3:.0f}", f"{row['bytes_down'] / 1e3:.0f}")
    console.print(table)
    summ = [run.summary() for run in runs]
    med = lambda k: statistics.median(s[k] for s in summ)  # noqa: E731
    spu = statistics.median(sum(r["wall_s"] for r in run.client["rows"] if r["kind"] == "spu") for run in runs)
    console.print(
        f"per batch: wall {med('wall_s'):.1f} s (setup and offline included), SPU segments {spu:.1f} s"
        + (f" (predicted {pred['spu_s'] * batch:.1f} s)" if pred.get("spu_s") else "")
        + f"; client CPU {med('client_cpu_s'):.1f} s, server CPU {med('server_cpu_s'):.1f} s; "
        f"client -> server {(med('he_bytes_client_to_server') + med('spu_bytes_client_to_server')) / 1e6:.1f} MB, "
        f"server -> client {(med('he_bytes_server_to_client') + med('spu_bytes_server_to_client')) / 1e6:.1f} MB, {int(med('spu_rounds'))} SPU rounds",
        soft_wrap=True,
    )
    if pred.get("he_s") is None:
        console.print("no cached secure per-op costs for some parameters: run 'compress he-calibrate --secure' (or api.secure_cost_prediction(folder, measure=True))")


def _bench_he(artifact: Path, model: Any, inputs: list[Any], batch: int, repeat: int) -> None:
    """Encrypted inferences of an HE artifact: per-layer median measured vs predicted time and counts."""
    import statistics

    from graphpress.cli.report import he_layers_table

    runner = model.runner
    if getattr(runner, "last_run", False) is None:  # secure protocol: two processes per call
        _bench_secure(artifact, runner, inputs, batch, repeat)
        return
    if not hasattr(runner, "run"):  # polynomial protocol: one fully encrypted call per sample
        import time

        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            model(*inputs)
            times.append(time.perf_counter() - t0)
        rep = runner.last_report
        console.print(
            f"{artifact} (he, polynomial/CKKS, batch {batch}): median {1e3 * statistics.median(times):.1f} ms over {repeat} runs; "
            f"per sample {1e3 * rep.get('latency_s', {}).get('median', 0.0):.1f} ms; ops per sample {rep.get('ops_per_sample')}",
            soft_wrap=True,
        )
        return
    from graphpress.api import he_cost_report

    runs = []
    with StageProgress() as prog:
        prog.stage("encrypted inference", total=repeat)
        for i in range(repeat):
            runs.append(runner.run(*inputs))
            prog.step(i + 1, repeat, "encrypted inference")
    cost = he_cost_report(runner.program, runs[0], label=f"random inputs, median of {repeat} runs")
    for i, row in enumerate(cost["layers"]):
        row["measured_s"] = statistics.median(r.layers[i]["measured_s"] for r in runs)
        row["ratio"] = row["predicted_s"] / row["measured_s"] if row["predicted_s"] and row["measured_s"] > 0 else None
    cost["total_measured_s"] = sum(r["measured_s"] for r in cost["layers"])
    wall = statistics.median(r.seconds for r in runs)
    console.print(he_layers_table(cost, f"{artifact} (he, {runner.program.encoding}, batch {batch}, median of {repeat} encrypted runs)"))
    console.print(
        f"end to end {1e3 * wall:.1f} ms per batch (encrypted layers + client plaintext parts); "
        f"key generation + weight encoding at load {runner.setup_seconds:.2f} s",
        soft_wrap=True,
    )
    if cost.get("total_predicted_s") is None:
        console.print("no cached per-op costs for some parameters: run 'compress he-calibrate' for predictions")


# ---------------------------------------------------------------------------- he-calibrate
@app.command()
@handle_errors
def tune(
    artifact: Path = typer.Argument(..., help="A --backend tvm artifact folder written by 'compress run'."),
    trials: int = typer.Option(64, "--trials", "-n", help="Measured candidates in all (MetaSchedule's global budget); 0 rebuilds from the stored database."),
    per_task: Optional[int] = typer.Option(None, "--per-task", help="At most this many trials per kernel."),
    batch: int = typer.Option(1, "--batch", help="The batch to tune for (the library keeps running other batches, untuned)."),
    dim: Optional[list[str]] = typer.Option(None, "--dim", help="Another dynamic dim's tuning value, e.g. --dim seq=128 (repeatable)."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Stop the tuning worker after this many seconds (the artifact stays as it was)."),
) -> None:
    """Tune a TVM artifact with MetaSchedule in a torch-free subprocess; the database is kept in the artifact."""
    from rich.table import Table

    from graphpress.api import tune_artifact

    if batch < 1:
        raise GraphpressError(f"--batch {batch}: must be at least 1")
    if per_task is not None and per_task < 1:
        raise GraphpressError(f"--per-task {per_task}: must be at least 1")
    dims = parse_dims(dim)
    with StageProgress() as prog:
        prog.stage("tuning: extracting kernels")

        def on_event(ev: dict[str, Any]) -> None:
            if ev["event"] == "tasks":
                prog.stage(f"tuning {len(ev['tasks'])} kernels", total=max(trials, 1))
            elif ev["event"] == "progress":
                prog.step(ev["done"], max(trials, 1), f"trials (kernel {ev['task']})")
            elif ev["event"] == "measuring":  # api.tune_artifact times untuned vs tuned
                prog.stage("measuring tuned vs untuned")

        summary = tune_artifact(artifact, trials, per_task=per_task, batch=batch, dims=dims, progress=on_event, timeout_s=timeout)
    t = Table(title=f"{artifact}: TVM tuning", title_justify="left")
    for col in ("shapes", "kernels tuned", "trials", "tuning s", "db records", "untuned ms", "tuned ms", "speed-up"):
        t.add_column(col, justify="right")
    untuned, tuned = summary["latency_ms"]["untuned"], summary["latency_ms"]["tuned"]
    t.add_row(str(summary["shapes"]), f"{summary.get('tuned_kernels')}/{summary.get('tir_kernels')}", f"{summary['trials_measured']}/{summary['trials']}",
              f"{summary['tuning_s']:.0f}", f"{summary['records_before']} -> {summary['records']}",
              f"{untuned:.3f}", f"{tuned:.3f}", f"{untuned / tuned:.2f}x")
    console.print(t)
    console.print(f"artifact updated: [bold]{artifact}[/bold] (tuning/ holds the database; report.md has a tuning section)")


@app.command("he-calibrate")
@handle_errors
def he_calibrate(
    poly_degree: Optional[list[int]] = typer.Option(None, "--poly-degree", "-N", help="Ring degrees to measure (repeatable; default 4096, 8192, 16384)."),
    repeat: int = typer.Option(15, "--repeat", help="Timed repetitions per operation (medians)."),
    show: bool = typer.Option(False, "--show", help="Print the cached costs without measuring."),
    secure: bool = typer.Option(False, "--secure", help="Measure the secure two-party protocol's steps instead (default N: 4096, 8192), for the 'he-secure' cost model."),
) -> None:
    """Measure per-operation BFV costs on this machine and cache them for the HE cost model."""
    from graphpress.api import he_cached_costs, he_calibrate
    from graphpress.cli.report import he_costs_table, secure_costs_table

    if secure and show:
        entries, path = he_cached_costs(secure=True)
        if not entries:
            raise GraphpressError(f"{path}: no secure-protocol costs cached for this machine; run 'compress he-calibrate --secure'")
        console.print(secure_costs_table(entries, f"cached secure protocol op costs (us), {path}"))
        return
    if secure:
        from graphpress.api import he_calibrate_secure

        bad = [n for n in poly_degree or () if n not in (4096, 8192, 16384, 32768)]
        if bad:
            raise GraphpressError(f"--poly-degree {bad[0]}: the secure protocol measures 4096, 8192, 16384 or 32768")
        with StageProgress() as prog:
            prog.stage("measure the secure protocol's steps")
            entries, path = he_calibrate_secure(poly_degree or None, on_entry=lambda i, n, p: prog.step(i, n, f"parameter sets (N={p.poly_degree})"))
        console.print(secure_costs_table(entries, f"secure protocol op costs (us), cached in {path}"))
        return

    if show:
        entries, path = he_cached_costs()
        if not entries:
            raise GraphpressError(f"{path}: no HE costs cached for this machine; run 'compress he-calibrate'")
        console.print(he_costs_table(entries, f"cached HE op costs (us), {path}"))
        return
    bad = [n for n in poly_degree or () if n not in (1024, 2048, 4096, 8192, 16384, 32768)]
    if bad:
        raise GraphpressError(f"--poly-degree {bad[0]}: not one of 1024, 2048, 4096, 8192, 16384, 32768")
    if repeat < 3:
        raise GraphpressError(f"--repeat {repeat}: use at least 3 (medians)")
    with StageProgress() as prog:
        prog.stage("measure BFV operations")
        entries, path = he_calibrate(
            poly_degree or None,
            repeat=repeat,
            on_entry=lambda i, n, e: prog.step(i, n, f"parameter sets (N={e['poly_degree']} {e['coeff_modulus_bits']})"),
        )
    console.print(he_costs_table(entries, f"HE op costs (us, medians of {repeat}), cached in {path}"))


@app.command("secure-setup")
@handle_errors
def secure_setup(
    path: Optional[Path] = typer.Option(None, "--path", help="Where to create the parties' virtual environment (default: $GRAPHPRESS_CACHE/spu-venv, ~/.cache/graphpress/spu-venv)."),
) -> None:
    """Create the environment the secure HE protocol's two parties run in (SPU 0.9.5 needs numpy<2: its own venv)."""
    from graphpress.api import secure_setup as setup

    with StageProgress() as prog:
        prog.stage("pip install spu==0.9.5 tenseal==0.3.16 zstandard into the parties' venv")
        _target, exe = setup(path)
    hint = "" if path is None else f"; set GRAPHPRESS_SPU_PYTHON={exe} to use it"
    console.print(f"secure protocol parties: {exe}{hint}")


# ---------------------------------------------------------------------------- demo
@app.command()
@handle_errors
def demo(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Artifact folder (default: a new temporary folder)."),
    recipe: str = typer.Option("fuse", "--recipe", "-r", help="Recipe to apply."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing artifact folder."),
) -> None:
    """Train a small CNN on scikit-learn's digits, compress it, and report accuracy before/after."""
    from rich.table import Table

    from graphpress.api import digits_demo

    with StageProgress() as prog:
        demo_result = digits_demo(out, recipe=recipe, overwrite=overwrite, **_progress_hooks(prog))
    result = demo_result.result
    console.print(passes_table(result.manifest["passes"]))
    _print_result(result.manifest)
    t = Table(title=f"digits test accuracy ({demo_result.test_images} held-out images)", title_justify="left")
    t.add_column("model")
    t.add_column("accuracy", justify="right")
    t.add_row("torch fp32, before", f"{demo_result.accuracy_before:.2%}")
    t.add_row(f"{result.manifest['backend']} artifact, after", f"{demo_result.accuracy_after:.2%}")
    console.print(t)
    console.print(f"artifact: [bold]{result.folder}[/bold]")


# ---------------------------------------------------------------------------- samples
from graphpress.cli.samples import samples as _samples  # noqa: E402 -- its own module; registered here

app.command("samples")(handle_errors(_samples))


def main() -> None:
    """Console-script entry point."""
    app(prog_name="compress")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
