"""Compress Llama-shaped decoders of 0.1B to 8B parameters with graphpress and its peers, side by side (issue 17).

Per model size and per tool, every stage runs in its own fresh process, started by a tiny launcher
(a Python that imports nothing heavy) which waits for it with ``os.wait4``: that returns the
process's own resource usage (``ru_maxrss``: the peak RSS of the process, or of its largest
waited-for descendant), so one measurement never inherits another's peak the way
``RUSAGE_CHILDREN`` would, nor the harness's own RSS (Linux folds the pre-exec memory's high-water
mark into a child's ``ru_maxrss``: a child forked straight from the harness, which has torch
imported, would start at several hundred MB). Wall time is taken around the process. The
harness also samples the RSS of the stage's whole process group every 0.25 s (reported as
``tree_rss_sampled_mb``; an approximation, for tools that fork) and kills the group when it
passes ``--max-rss-gb`` so that a tool that would exhaust the machine does not take other
processes down with it.

Tools (all write int4 weight-only, block 32, symmetric):

``builder``
    ONNX Runtime GenAI's model builder, ``python -m onnxruntime_genai.models.builder -i FOLDER
    -o OUT -p int4 -e cpu -c CACHE`` (its defaults at int4: block 32, symmetric; it reads the
    safetensors directly and needs a tokenizer in the folder). One stage: ``build``.
``dynamo``
    ``transformers`` loads the folder in fp32 (eager attention), a logits-only wrapper
    (``input_ids -> logits``, ``use_cache=False``) goes through ``torch.onnx.export(...,
    dynamo=True)`` with dynamic batch and sequence (example batch 2 x 16) and external data;
    then ``onnxruntime``'s ``MatMulNBitsQuantizer(bits=4, block_size=32, is_symmetric=True)``
    rewrites it, saved with external data. Stages: ``export``, ``quantize``.
``graphpress``
    ``compress run FOLDER --recipe R --out OUT --no-bench [--stream off]`` (``--stream off`` where
    the tree has the option: its ``auto`` would stream from 0.35b on) with ``R`` = ``quantize-layerwise:
    {bits: [4], target_bits: 4, activations: none, group_size: 32, min_sqnr_db: 0}`` (the budget is
    off: int4 on random weights gives ~10 dB on the logits, below the default 15 dB, and the run
    would stop before writing the artifact). One stage: ``compress``.
``graphpress-stream``
    ``compress run FOLDER --recipe R --out OUT --no-bench --stream on``, when ``compress run
    --help`` lists ``--stream``; otherwise the row says "not available in this tree".

For graphpress rows the issue's memory bound is checked: peak RSS <= 2 x the largest decoder
block's fp32 bytes + 1.5 GB (1.5e9 bytes; the recipe has no calibration activations: weight-only
int4, so that term is taken as 0).

A stage that runs past ``--timeout`` is recorded as ``timeout``, one killed by a signal as
``killed (signal N)`` (or ``killed (rss cap ...)`` when the harness's cap did it), a failure as
its last error line; the table is always completed.

Folders: the sizes up to 1b are written with ``benchmarks/llm_folder.py --tokenizer`` into
``--cache/SIZE`` (default ``/tmp/gp-llm``) and reused when complete; the 8b shape (16 GB) is
never generated here: pass ``--folder 8b=/path``.

    python benchmarks/llm_scale.py --sizes 0.1b,0.35b --tools builder,dynamo,graphpress,graphpress-stream
    python benchmarks/llm_scale.py --sizes 8b --folder 8b=/data/llama-8b --tools builder,graphpress-stream --timeout 3600
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TOOLS = ("builder", "dynamo", "graphpress", "graphpress-stream")
STAGES = {"builder": ("build",), "dynamo": ("export", "quantize"), "graphpress": ("compress",), "graphpress-stream": ("compress",)}
# min_sqnr_db: 0 -- random weights at int4 give ~10 dB on the logits (below the pass's default 15 dB
# budget, which would stop the run before export); the benchmark measures cost, not quality
RECIPE = "passes:\n  - quantize-layerwise: {bits: [4], target_bits: 4, activations: none, group_size: 32, min_sqnr_db: 0}\n"
#: the issue's memory bound's constant term (bytes); calibration activations are 0 for this weight-only recipe
BOUND_SLACK = 1.5e9
NOT_AVAILABLE = "not available in this tree"


# --------------------------------------------------------------------------------------------
# measuring one process
# --------------------------------------------------------------------------------------------

def _group_rss_kb(pgid: int) -> int:
    """Sum of VmRSS over the live processes of process group ``pgid`` (0 when none can be read)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                stat = fh.read()
            # the command name may hold spaces: fields after the closing parenthesis
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) != pgid:
                continue
            with open(f"/proc/{entry.name}/status") as fh:
                total += next((int(ln.split()[1]) for ln in fh if ln.startswith("VmRSS:")), 0)
        except (OSError, ValueError, IndexError):
            continue
    return total


def last_error_line(text: str) -> str:
    """The line that best says why a tool failed: the last ``error:``/exception line, else the last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return "failed (no output)"
    for ln in reversed(lines):
        if ln.startswith("error:") or re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln):
            return ln[:400]
    return lines[-1][:400]


# Runs argv[2:] as its child and writes the child's own wait4 rusage to argv[1]. Why a launcher: Linux
# folds the high-water RSS of the memory a process had before exec() into its ru_maxrss -- for a
# child of the harness that is the harness's own RSS (torch imported: hundreds of MB), vfork or
# not. The launcher imports nothing heavy, so its children's ru_maxrss start from ~10 MB.
_LAUNCHER = """
import json, os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    except OSError as exc:
        os.write(2, f"could not start: {exc}\\n".encode())
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as fh:
    json.dump({"maxrss_kb": ru.ru_maxrss, "cpu_s": ru.ru_utime + ru.ru_stime, "status": status}, fh)
sys.exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
"""


def run_measured(cmd: list[str], *, timeout: float, max_rss_kb: int | None = None, env: dict[str, str] | None = None,
                 log: Path | None = None, poll: float = 0.25) -> dict[str, Any]:
    """Run ``cmd`` under the launcher in a fresh process group; return its wall time, its own peak RSS and its status.

    Parameters
    ----------
    cmd : list of str
        The command; stdout and stderr go to ``log`` (or are discarded).
    timeout : float
        Seconds; past it the process group is killed and the status is ``"timeout"``.
    max_rss_kb : int, optional
        The group's sampled RSS above which it is killed (status ``"killed (rss cap ...)"``).
    env : dict, optional
        The environment (default: the harness's).
    log : Path, optional
        File receiving the command's output; its tail gives a failure's message.

    Returns
    -------
    dict
        ``status`` (``"ok"``, ``"timeout"``, ``"killed (signal N)"``, ``"killed (rss cap X GB)"`` or
        the last error line), ``returncode``, ``wall_s``, ``peak_rss_mb`` (the command's ``ru_maxrss``
        from the launcher's ``wait4``; ``None`` when the harness killed it), ``tree_rss_sampled_mb``
        and ``cpu_s`` (user + system, ``None`` when killed).
    """
    import tempfile

    out = open(log, "wb") if log else subprocess.DEVNULL
    fd, usage_file = tempfile.mkstemp(prefix="llm_scale_usage_", suffix=".json")
    os.close(fd)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, usage_file, *cmd], stdout=out, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    pgid, reason, tree_peak, wstatus = proc.pid, None, 0, None
    try:
        while True:
            pid, wstatus, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            rss = _group_rss_kb(pgid)
            tree_peak = max(tree_peak, rss)
            if reason is None and time.perf_counter() - start > timeout:
                reason = "timeout"
            elif reason is None and max_rss_kb and rss > max_rss_kb:
                reason = f"killed (rss cap {max_rss_kb / 2**20:.1f} GB)"
            if reason:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                _, wstatus, _ = os.wait4(proc.pid, 0)
                break
            time.sleep(poll)
    finally:
        proc.returncode = 0  # reaped by wait4 above; keep Popen from trying again
        if log:
            out.close()
    wall = time.perf_counter() - start
    # the group may have orphans left (a tool's own workers): they belong to this measurement
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        with open(usage_file) as fh:
            usage = json.load(fh)
    except (OSError, ValueError):
        usage = None  # killed before the command ended: only the sampled peak is known
    os.unlink(usage_file)
    if usage is not None:
        st = usage["status"]
        code = -os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)
    elif os.WIFSIGNALED(wstatus):
        code = -os.WTERMSIG(wstatus)
    else:
        code = os.WEXITSTATUS(wstatus)
    if reason:
        status = reason
    elif code == 0:
        status = "ok"
    elif code < 0:
        status = f"killed (signal {-code})"
    elif code == 127 and usage is not None and log and "could not start:" in log.read_text(errors="replace"):
        status = last_error_line(log.read_text(errors="replace"))
    else:
        status = last_error_line(log.read_text(errors="replace")[-20000:]) if log and log.exists() else f"exit {code}"
    return {
        "status": status,
        "returncode": code,
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(usage["maxrss_kb"] / 1024, 1) if usage else None,
        "tree_rss_sampled_mb": round(tree_peak / 1024, 1),
        "cpu_s": round(usage["cpu_s"], 2) if usage else None,
    }


# --------------------------------------------------------------------------------------------
# folders and what they hold
# --------------------------------------------------------------------------------------------

def _llm_folder():
    spec = importlib.util.spec_from_file_location("llm_folder", HERE / "llm_folder.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def folder_complete(folder: Path) -> bool:
    """Whether ``folder`` holds a config, an index, every shard it names at its full length, and a tokenizer."""
    try:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    shards = set(index.get("weight_map", {}).values())
    if not shards or not (folder / "tokenizer.json").is_file():
        return False
    data = sum((folder / s).stat().st_size for s in shards if (folder / s).is_file())
    return all((folder / s).is_file() for s in shards) and data >= index.get("metadata", {}).get("total_size", 0)


def ensure_folder(size: str, cache: Path, log_dir: Path) -> tuple[Path, dict[str, Any] | None]:
    """``cache/size``, written with ``llm_folder.py --tokenizer`` unless already complete; returns it and the write's stats."""
    folder = cache / size
    if folder_complete(folder):
        return folder, None
    if size == "8b":
        raise SystemExit("error: --sizes 8b needs --folder 8b=/path (the harness does not write the 16 GB folder; "
                         "make one with: python benchmarks/llm_folder.py --size 8b --out /path --tokenizer)")
    shutil.rmtree(folder, ignore_errors=True)
    cmd = [sys.executable, str(HERE / "llm_folder.py"), "--size", size, "--out", str(folder), "--tokenizer"]
    res = run_measured(cmd, timeout=3600, log=log_dir / f"folder-{size}.log")
    if res["status"] != "ok":
        raise SystemExit(f"error: writing the {size} folder failed: {res['status']} (log {log_dir / f'folder-{size}.log'})")
    return folder, res


def model_facts(folder: Path) -> dict[str, Any]:
    """Parameters, stored bytes and dtype, and the largest decoder block in fp32 (graphpress's shards reader)."""
    sys.path.insert(0, str(ROOT))
    from graphpress.frontends.shards import ShardedCheckpoint, decoder_layout

    ck = ShardedCheckpoint(folder)
    lay = decoder_layout(ck)
    config = json.loads((folder / "config.json").read_text())
    params = sum(ck.numel(n) for n in ck.names())
    largest = lay.largest_block_bytes()
    return {
        "folder": str(folder),
        "params": params,
        "checkpoint_bytes": ck.total_bytes(),
        "checkpoint_dtype": config.get("torch_dtype") or config.get("dtype"),
        "hidden_size": config.get("hidden_size"),
        "layers": config.get("num_hidden_layers"),
        "intermediate_size": config.get("intermediate_size"),
        "vocab_size": config.get("vocab_size"),
        "largest_block_fp32_bytes": largest,
        "memory_bound_bytes": int(2 * largest + BOUND_SLACK),
    }


def dir_bytes(path: Path) -> int:
    """Sum of the sizes of the regular files under ``path`` (0 when absent)."""
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def compress_options() -> str:
    """``compress run --help`` as plain text (wide, no colour), to see which options this tree has."""
    env = dict(os.environ, COLUMNS="250", NO_COLOR="1", TERM="dumb")
    try:
        run = subprocess.run([_compress_exe(), "run", "--help"], capture_output=True, text=True, env=env, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return run.stdout + run.stderr


def stream_available(help_text: str) -> bool:
    """Whether ``compress run --help`` lists a ``--stream`` option (not ``--stream-...``)."""
    return re.search(r"--stream(?![\w-])", help_text) is not None


def _compress_exe() -> str:
    local = Path(sys.executable).parent / "compress"
    return str(local) if local.exists() else "compress"


# --------------------------------------------------------------------------------------------
# the dynamo peer's stages (run by the harness as `llm_scale.py --stage ...` in a fresh process)
# --------------------------------------------------------------------------------------------

def stage_dynamo_export(folder: str, out: str) -> dict[str, Any]:
    """Load ``folder`` in fp32 with transformers and export input_ids -> logits with the dynamo exporter."""
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    model.config.use_cache = False
    loaded = time.perf_counter() - t0

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids, use_cache=False).logits

    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    Path(out).mkdir(parents=True, exist_ok=True)
    t1 = time.perf_counter()
    with torch.no_grad():
        torch.onnx.export(Logits(model), (ids,), str(Path(out) / "model.onnx"), dynamo=True, external_data=True,
                          input_names=["input_ids"], output_names=["logits"],
                          dynamic_shapes=({0: "batch", 1: "sequence"},))
    return {"load_s": round(loaded, 2), "export_and_save_s": round(time.perf_counter() - t1, 2)}


def stage_dynamo_quantize(src: str, out: str) -> dict[str, Any]:
    """``MatMulNBitsQuantizer`` (4 bits, block 32, symmetric) over the exported model; saved with external data."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    t0 = time.perf_counter()
    model = onnx.load(str(Path(src) / "model.onnx"))
    loaded = time.perf_counter() - t0
    t1 = time.perf_counter()
    quant = MatMulNBitsQuantizer(model, bits=4, block_size=32, is_symmetric=True)
    quant.process()
    quantized = time.perf_counter() - t1
    Path(out).mkdir(parents=True, exist_ok=True)
    t2 = time.perf_counter()
    quant.model.save_model_to_file(str(Path(out) / "model.onnx"), use_external_data_format=True)
    nbits = sum(1 for n in quant.model.model.graph.node if n.op_type == "MatMulNBits")
    return {"load_s": round(loaded, 2), "quantize_s": round(quantized, 2), "save_s": round(time.perf_counter() - t2, 2),
            "matmulnbits_nodes": nbits}


# --------------------------------------------------------------------------------------------
# one (size, tool) measurement
# --------------------------------------------------------------------------------------------

def tool_commands(tool: str, folder: Path, work: Path, recipe: Path, *, stream_ok: bool = False) -> list[tuple[str, list[str], Path]]:
    """``(stage, command, output folder)`` for each stage of ``tool`` on ``folder``.

    ``stream_ok``: this tree's ``compress run`` has ``--stream``; the whole-graph row then passes
    ``--stream off`` (its default ``auto`` streams above 1 GB of fp32 weights, i.e. from 0.35b).
    """
    py = sys.executable
    if tool == "builder":
        out = work / "builder"
        return [("build", [py, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out),
                           "-p", "int4", "-e", "cpu", "-c", str(work / "builder-cache")], out)]
    if tool == "dynamo":
        exported, quantized = work / "dynamo-export", work / "dynamo-int4"
        me = str(Path(__file__).resolve())
        return [("export", [py, me, "--stage", "dynamo-export", "--stage-in", str(folder), "--stage-out", str(exported)], exported),
                ("quantize", [py, me, "--stage", "dynamo-quantize", "--stage-in", str(exported), "--stage-out", str(quantized)], quantized)]
    if tool in ("graphpress", "graphpress-stream"):
        out = work / tool
        cmd = [_compress_exe(), "run", str(folder), "--recipe", str(recipe), "--out", str(out), "--no-bench"]
        if tool == "graphpress-stream":
            cmd += ["--stream", "on"]
        elif stream_ok:
            cmd += ["--stream", "off"]
        return [("compress", cmd, out)]
    raise ValueError(f"unknown tool {tool!r}; choose from {', '.join(TOOLS)}")


def _stage_info(log: Path) -> dict[str, Any] | None:
    """The ``STAGE_INFO {...}`` line a ``--stage`` process prints (its sub-timings)."""
    try:
        for line in reversed(log.read_text(errors="replace").splitlines()):
            if line.startswith("STAGE_INFO "):
                return json.loads(line[len("STAGE_INFO "):])
    except (OSError, ValueError):
        pass
    return None


def measure_tool(tool: str, folder: Path, work: Path, recipe: Path, *, timeout: float, max_rss_kb: int | None,
                 keep: bool, stream_ok: bool) -> dict[str, Any]:
    """Run every stage of ``tool`` on ``folder`` (a failed stage skips the later ones) and collect the numbers."""
    if tool == "graphpress-stream" and not stream_ok:
        return {"status": NOT_AVAILABLE, "stages": {}}
    work.mkdir(parents=True, exist_ok=True)
    row: dict[str, Any] = {"stages": {}}
    status = "ok"
    last_out = None
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for stage, cmd, out in tool_commands(tool, folder, work, recipe, stream_ok=stream_ok):
        shutil.rmtree(out, ignore_errors=True)
        log = work / f"{tool}-{stage}.log"
        res = run_measured(cmd, timeout=timeout, max_rss_kb=max_rss_kb, env=env, log=log)
        res["command"] = " ".join(cmd)
        res["output_bytes"] = dir_bytes(out)
        info = _stage_info(log)
        if info:
            res["detail"] = info
        row["stages"][stage] = res
        last_out = out
        print(f"    {tool}/{stage}: {res['status']}, {res['wall_s']} s, peak RSS {res['peak_rss_mb']} MB", flush=True)
        if res["status"] != "ok":
            status = f"{stage}: {res['status']}"
            break
    row["status"] = status
    stages = list(row["stages"].values())
    row["wall_s"] = round(sum(s["wall_s"] for s in stages), 2)
    # a stage the harness killed has no ru_maxrss: its sampled tree peak stands in
    row["peak_rss_mb"] = max((s["peak_rss_mb"] or s["tree_rss_sampled_mb"] or 0 for s in stages), default=None)
    row["artifact_bytes"] = dir_bytes(last_out) if status == "ok" and last_out else None
    if status == "ok" and last_out and tool.startswith("graphpress"):
        facts = _manifest_facts(Path(last_out) / "manifest.json")
        if facts:
            row["manifest"] = facts
    if not keep:
        for _, _, out in tool_commands(tool, folder, work, recipe):
            shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(work / "builder-cache", ignore_errors=True)
    return row


def _manifest_facts(path: Path) -> dict[str, Any] | None:
    """What a graphpress artifact's manifest says about the run: for a streamed one the
    end-to-end figures (KL, top-1, the ONNX Runtime check), the per-unit peaks and times."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    stream = manifest.get("stream")
    if not stream:
        return {"check": (manifest.get("lowering") or {}).get("check")}
    units = stream.get("units", [])
    blocks = [u for u in units if str(u.get("unit", "")).startswith("block.")]
    heads = [u for u in units if str(u.get("unit", "")).startswith("head.")]

    def peak(us: list) -> float | None:
        return max((u.get("peak_rss_mb") or 0 for u in us), default=None)

    end = stream.get("end_to_end", {})
    return {
        "stream_wall_s": stream.get("wall_s"),
        "block_time_median_s": round(statistics.median(u["time_s"] for u in blocks), 3) if blocks else None,
        "unit_peaks_mb": {"embed": peak([u for u in units if u.get("unit") == "embed"]), "blocks_max": peak(blocks), "head_max": peak(heads)},
        "worst_block_sqnr_db": stream.get("worst_block_sqnr_db"),
        "end_to_end": {k: end.get(k) for k in ("heldout_tokens", "kl", "top1_agreement", "sqnr_db", "onnxruntime", "onnx_exports",
                                                "compress_peak_rss_mb", "check_peak_rss_mb")},
    }


def add_bound(row: dict[str, Any], facts: dict[str, Any]) -> None:
    """For a graphpress row: the issue's memory bound and whether the measured peak stays under it."""
    bound = facts["memory_bound_bytes"]
    row["memory_bound_mb"] = round(bound / 2**20, 1)
    peak = row.get("peak_rss_mb")
    row["within_memory_bound"] = None if row.get("status") != "ok" or peak is None else bool(peak * 2**20 <= bound)
    # a streamed run's peak while compressing, apart from the ONNX Runtime check of the finished
    # artifact at the end (which holds the whole compressed model, as running it does)
    compress_peak = ((row.get("manifest") or {}).get("end_to_end") or {}).get("compress_peak_rss_mb")
    if compress_peak is not None:
        row["compress_within_memory_bound"] = bool(compress_peak * 2**20 <= bound)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Fold repeated runs of one (size, tool): the first run's row plus per-stage medians and spreads.

    Every repeat's numbers stay in ``repeats``; ``wall_s`` / ``peak_rss_mb`` become the medians over the
    repeats that finished, with ``wall_s_range`` / ``peak_rss_mb_range`` = [min, max].
    """
    row = dict(runs[0])
    if len(runs) == 1:
        row["repeats"] = 1
        return row
    row["repeats"] = len(runs)
    row["runs"] = [{k: r.get(k) for k in ("status", "wall_s", "peak_rss_mb", "stages")} for r in runs]
    ok = [r for r in runs if r.get("status") == "ok"]
    row["status"] = "ok" if len(ok) == len(runs) else next(r["status"] for r in runs if r.get("status") != "ok")
    if ok:
        for key in ("wall_s", "peak_rss_mb"):
            vals = [r[key] for r in ok]
            row[key] = round(statistics.median(vals), 2)
            row[key + "_range"] = [min(vals), max(vals)]
        for stage in ok[0]["stages"]:
            vals = [r["stages"][stage]["wall_s"] for r in ok]
            row["stages"][stage] = dict(row["stages"][stage], wall_s=round(statistics.median(vals), 2),
                                        wall_s_range=[min(vals), max(vals)])
    return row


# --------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------

def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(results: dict[str, Any]) -> str:
    """Size x tool: total wall, per-stage walls, peak RSS, artifact MB, the bound check and the status."""
    head = ["size", "tool", "wall s", "stages (s)", "peak RSS MB", "artifact MB", "bound MB", "status"]
    rows = [head]
    # merged runs append sizes in the order they were measured: show them by model size
    ordered = sorted(results["sizes"].items(), key=lambda kv: kv[1].get("model", {}).get("params") or 0)
    for size, entry in ordered:
        for tool, row in entry["tools"].items():
            stages = ", ".join(f"{k} {v['wall_s']}" for k, v in row.get("stages", {}).items())
            bound = row.get("memory_bound_mb")
            if bound is not None and row.get("within_memory_bound") is not None:
                bound_txt = f"{bound:.0f} {'pass' if row['within_memory_bound'] else 'FAIL'}"
                if not row["within_memory_bound"] and row.get("compress_within_memory_bound"):
                    bound_txt += " (compress pass, ORT check over)"
            else:
                bound_txt = _fmt(bound, ".0f")
            art = row.get("artifact_bytes")
            rows.append([size, tool, _fmt(row.get("wall_s") if row.get("stages") else None, ".1f"), stages or "-",
                         _fmt(row.get("peak_rss_mb") if row.get("stages") else None, ".0f"),
                         _fmt(None if art is None else art / 2**20, ".1f"), bound_txt, str(row.get("status"))[:70]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _versions() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mod in ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime_genai", "onnx_ir", "onnxscript"):
        try:
            from importlib.metadata import version
            out[mod] = version(mod.replace("_", "-"))
        except Exception:  # noqa: BLE001 -- an absent peer is recorded as absent
            out[mod] = None
    try:
        out["graphpress_commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                                  text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        out["graphpress_commit"] = None
    return out


def _tree_state() -> str | None:
    """``git describe``-like: the short HEAD commit, plus ``-dirty`` when graphpress/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "graphpress"], capture_output=True,
                               text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (head + ("-dirty" if dirty else "")) or None


def _meminfo_kb(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            return next(int(ln.split()[1]) for ln in fh if ln.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def parse_folders(items: list[str]) -> dict[str, Path]:
    """``["8b=/path", ...]`` -> ``{"8b": Path("/path")}``; a malformed item or a missing folder is one error line."""
    out: dict[str, Path] = {}
    for item in items:
        size, sep, path = item.partition("=")
        if not sep or not size or not path:
            raise SystemExit(f"error: --folder {item!r}: expected SIZE=PATH, e.g. --folder 8b=/data/llama-8b")
        if not Path(path).is_dir():
            raise SystemExit(f"error: --folder {size}={path}: no such folder")
        out[size] = Path(path)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.1b,0.35b", help="comma-separated: tiny, 0.1b, 0.35b, 1b, 8b (default 0.1b,0.35b)")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated subset of {','.join(TOOLS)}")
    parser.add_argument("--folder", action="append", default=[], metavar="SIZE=PATH",
                        help="use this existing HF folder for SIZE (required for 8b; repeatable)")
    parser.add_argument("--cache", default="/tmp/gp-llm", help="where generated folders live and are reused (default /tmp/gp-llm)")
    parser.add_argument("--work", default=None, help="scratch folder for outputs and logs (default CACHE/runs)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per stage (default 1800)")
    parser.add_argument("--max-rss-gb", type=float, default=None,
                        help="kill a stage whose process group passes this RSS (default 90%% of MemAvailable at start)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per (size, tool); tools interleave, alternate order (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the artifacts under --work")
    parser.add_argument("--out", default=str(HERE / "results" / "llm_scale.json"), help="JSON to write")
    parser.add_argument("--merge", action="store_true",
                        help="keep the sizes already in --out that this run does not measure (e.g. an 8b run added later)")
    parser.add_argument("--table", metavar="JSON", help="only print the table of an earlier run's JSON")
    parser.add_argument("--stage", choices=["dynamo-export", "dynamo-quantize"], help=argparse.SUPPRESS)
    parser.add_argument("--stage-in", help=argparse.SUPPRESS)
    parser.add_argument("--stage-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.stage:
        fn = stage_dynamo_export if args.stage == "dynamo-export" else stage_dynamo_quantize
        print("STAGE_INFO " + json.dumps(fn(args.stage_in, args.stage_out)), flush=True)
        return 0

    if args.table:
        print(format_table(json.loads(Path(args.table).read_text())))
        return 0

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    known = _llm_folder().SIZES
    folders = parse_folders(args.folder)
    for s in sizes:
        if s not in known and s not in folders:
            parser.error(f"--sizes: unknown size {s!r}; choose from {', '.join(known)} or pass --folder {s}=PATH")
    for t in tools:
        if t not in TOOLS:
            parser.error(f"--tools: unknown tool {t!r}; choose from {', '.join(TOOLS)}")
    if args.timeout <= 0 or args.repeat < 1:
        parser.error("--timeout must be positive and --repeat at least 1")
    cache = Path(args.cache)
    work_root = Path(args.work) if args.work else cache / "runs"
    work_root.mkdir(parents=True, exist_ok=True)
    avail = _meminfo_kb("MemAvailable")
    max_rss_kb = int(args.max_rss_gb * 2**20) if args.max_rss_gb else (int(avail * 0.9) if avail else None)
    recipe = work_root / "llm_scale_recipe.yaml"
    recipe.write_text(RECIPE)
    help_text = compress_options()
    stream_ok = stream_available(help_text)

    sys.path.insert(0, str(HERE))
    from common import machine_info

    results: dict[str, Any] = {
        "benchmark": "llm_scale",
        "issue": 17,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(mem_total_mb=round((_meminfo_kb("MemTotal") or 0) / 1024),
                                mem_available_at_start_mb=round((avail or 0) / 1024)),
        "versions": _versions(),
        "method": {
            "measurement": "each stage in a fresh process, waited for with os.wait4: wall time around the process, "
                           "peak_rss_mb = that process's ru_maxrss (its own peak, or its largest waited-for child's); "
                           "tree_rss_sampled_mb = max of the process group's summed VmRSS sampled every 0.25 s",
            "repeats": args.repeat,
            "order": "per size, tools in the given order (reversed on every other repeat); sizes one after the other",
            "timeout_s_per_stage": args.timeout,
            "rss_cap_mb": round(max_rss_kb / 1024) if max_rss_kb else None,
            "units": "MB = MiB (2**20 bytes) everywhere; *_bytes fields are bytes",
            "recipe": RECIPE,
            "memory_bound": "graphpress rows: peak RSS <= 2 x largest decoder block in fp32 + 1.5e9 bytes; the recipe is "
                            "weight-only (activations: none), so the calibration-activation term is 0",
            "stream_option_in_cli": stream_ok,
            "peers": {
                "builder": "python -m onnxruntime_genai.models.builder -i FOLDER -o OUT -p int4 -e cpu -c CACHE (defaults: "
                           "block 32, symmetric); its --help crashes with a ValueError in argparse's help formatting",
                "dynamo": "transformers fp32 eager attention, logits-only wrapper, torch.onnx.export(dynamo=True, external_data=True, "
                          "dynamic batch and sequence, example 2x16); MatMulNBitsQuantizer(bits=4, block_size=32, is_symmetric=True), "
                          "saved with external data",
            },
        },
        "sizes": {},
    }
    out_path = Path(args.out)
    if args.merge and out_path.is_file():
        try:
            earlier = json.loads(out_path.read_text())
        except ValueError:
            raise SystemExit(f"error: --merge: {out_path} is not JSON; remove it or drop --merge")
        results["sizes"] = {k: v for k, v in earlier.get("sizes", {}).items() if k not in sizes}
        results["earlier_runs"] = earlier.get("earlier_runs", []) + [{k: earlier.get(k) for k in ("date", "machine", "versions", "method")}]
        if earlier.get("manual_runs"):
            results["manual_runs"] = earlier["manual_runs"]
    log_dir = work_root / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=2) + "\n")

    for size in sizes:
        print(f"== {size}: load average {os.getloadavg()}", flush=True)
        folder, written = (folders[size], None) if size in folders else ensure_folder(size, cache, log_dir)
        facts = model_facts(folder)
        entry: dict[str, Any] = {"model": facts, "tools_requested": tools, "tools": {},
                                 "run": {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                                         "load_average_before": [round(v, 2) for v in os.getloadavg()],
                                         "mem_available_before_mb": round((_meminfo_kb("MemAvailable") or 0) / 1024),
                                         # the tree may move between sizes (other people commit while a long run goes on)
                                         "graphpress_tree": _tree_state()}}
        if written:
            entry["model"]["folder_written"] = {k: written[k] for k in ("wall_s", "peak_rss_mb")}
        results["sizes"][size] = entry
        runs: dict[str, list[dict[str, Any]]] = {t: [] for t in tools}
        for rep in range(args.repeat):
            order = tools if rep % 2 == 0 else list(reversed(tools))
            for tool in order:
                row = measure_tool(tool, folder, work_root / size, recipe, timeout=args.timeout, max_rss_kb=max_rss_kb,
                                   keep=args.keep, stream_ok=stream_ok)
                row["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
                runs[tool].append(row)
                entry["tools"][tool] = summarize(runs[tool])
                if tool.startswith("graphpress"):
                    add_bound(entry["tools"][tool], facts)
                save()
    print(format_table(results))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
