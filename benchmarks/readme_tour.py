"""The README's tour as a test: every command in README.md, run verbatim as a new user would.

Sets up a fresh-clone layout in a scratch folder (``SCRATCH/main`` = a clone of this repository's
HEAD, or of the working tree with ``--worktree``; ``SCRATCH/shared`` = the real ``../shared``)
and a fresh venv (``SCRATCH/venv``, first on ``PATH``), then runs, in README order and in
``SCRATCH/main``:

* every command of every fenced ``bash`` block (backslash continuations joined, here-documents
  kept with their command), with ``bash -e``;
* every fenced ``python`` block, as a script;
* every fenced ``console`` block: each ``$ command`` is run and must fail with the ``error:``
  line printed under it (``...`` in the README matches anything).

Each command's exit status, wall time and output tail go to ``benchmarks/results/readme_tour.json``
and a table is printed. Exit status 1 when any command fails.

    python benchmarks/readme_tour.py [--worktree] [--skip-tests] [--only PATTERN] [--timeout 1800]

``--skip-tests`` leaves out the test-suite command (``.ci/run`` runs that very line); the JSON
marks it ``skipped``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass
class Step:
    """One README command and what running it did."""

    section: str
    kind: str  # bash | python | console
    command: str
    expect: str | None = None
    rc: int | None = None
    seconds: float | None = None
    status: str = "not run"  # pass | fail | skipped
    why: str = ""
    tail: list[str] = field(default_factory=list)


def blocks(readme: str) -> list[tuple[str, str, list[str]]]:
    """``(section heading, language, lines)`` of every fenced block."""
    out, section, lang, body = [], "", None, []
    for line in readme.splitlines():
        if lang is None:
            if line.startswith("#") and not line.startswith("#!"):
                section = line.lstrip("#").strip()
            m = FENCE.match(line)
            if m:
                lang, body = m.group(1) or "text", []
        elif line.strip() == "```":
            out.append((section, lang, body))
            lang = None
        else:
            body.append(line)
    return out


def bash_commands(lines: list[str]) -> list[str]:
    """Split a bash block into commands: continuations joined, here-documents kept whole."""
    cmds, i = [], 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cmd = line
        while cmd.rstrip().endswith("\\") and i < len(lines):
            cmd = cmd.rstrip()[:-1].rstrip() + " " + lines[i].strip()
            i += 1
        m = re.search(r"<<-?\s*'?\"?(\w+)'?\"?", cmd)
        if m:
            end = m.group(1)
            body = []
            while i < len(lines) and lines[i].strip() != end:
                body.append(lines[i])
                i += 1
            i += 1
            cmd = "\n".join([cmd, *body, end])
        cmds.append(cmd)
    return cmds


def console_commands(lines: list[str]) -> list[tuple[str, str]]:
    """``$ command`` lines with the ``error:`` line printed under each."""
    pairs, cmd = [], None
    for line in lines:
        if line.startswith("$ "):
            cmd = line[2:].strip()
        elif cmd is not None and line.strip():
            pairs.append((cmd, line.strip()))
            cmd = None
    return pairs


def steps_of(readme: str) -> list[Step]:
    steps: list[Step] = []
    for section, lang, body in blocks(readme):
        if lang in ("bash", "sh", "shell"):
            steps += [Step(section, "bash", c) for c in bash_commands(body)]
        elif lang == "python":
            steps.append(Step(section, "python", "\n".join(body)))
        elif lang == "console":
            steps += [Step(section, "console", c, expect=e) for c, e in console_commands(body)]
    return steps


def expected_regex(expect: str) -> re.Pattern[str]:
    parts = [re.escape(p) for p in expect.split("...")]
    return re.compile(".*".join(parts), re.S)


def setup(scratch: Path, worktree: bool) -> tuple[Path, dict[str, str]]:
    """A fresh-clone layout (main/ + shared/) and a fresh venv first on PATH."""
    from graphpress.zoo.paths import shared_dir

    main = scratch / "main"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(main)], check=True)
    if worktree:  # the uncommitted state too, as tracked + untracked-not-ignored files
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                               capture_output=True).stdout.decode().split("\0")
        for rel in filter(None, files):
            src = ROOT / rel
            if src.is_file():
                (main / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, main / rel)
    shared = shared_dir()
    if shared.is_dir():
        (scratch / "shared").symlink_to(shared, target_is_directory=True)
    subprocess.run([sys.executable, "-m", "venv", str(scratch / "venv")], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "GRAPHPRESS_SHARED")}
    env["VIRTUAL_ENV"] = str(scratch / "venv")
    env["PATH"] = f"{scratch / 'venv' / 'bin'}{os.pathsep}{env['PATH']}"
    return main, env


def run_step(step: Step, cwd: Path, env: dict[str, str], timeout: float) -> None:
    if step.kind == "python":
        argv = ["python", "-c", step.command]
    else:
        argv = ["bash", "-e", "-o", "pipefail", "-c", step.command]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rc = 124
        out = f"{(err.stdout or b'').decode(errors='replace') if isinstance(err.stdout, bytes) else err.stdout or ''}\ntimed out after {timeout:.0f} s"
    step.seconds = round(time.perf_counter() - t0, 1)
    step.rc = rc
    step.tail = out.strip().splitlines()[-15:]
    if step.kind == "console":
        ok = rc not in (0, 124) and bool(expected_regex(step.expect or "").search(out))
        step.why = "" if ok else f"expected a failure printing {step.expect!r}"
    else:
        ok = rc == 0
        step.why = "" if ok else f"exit status {rc}"
    step.status = "pass" if ok else "fail"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worktree", action="store_true", help="Run the working tree (uncommitted changes included), not HEAD.")
    ap.add_argument("--skip-tests", action="store_true", help="Leave out the test-suite command (.ci/run runs it).")
    ap.add_argument("--only", default=None, help="Run only the steps whose section or command matches this regex (setup steps always run).")
    ap.add_argument("--timeout", type=float, default=1800.0, help="Seconds per command.")
    ap.add_argument("--keep", action="store_true", help="Keep the scratch folder.")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "readme_tour.json"))
    args = ap.parse_args()

    from common import machine_info

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    steps = steps_of(readme)
    scratch = Path(tempfile.mkdtemp(prefix="graphpress-tour-"))
    t_all = time.perf_counter()
    try:
        cwd, env = setup(scratch, args.worktree)
        for i, step in enumerate(steps):
            is_install = step.command.startswith("pip install") and "pytest" not in step.command
            if args.skip_tests and "pytest" in step.command:
                step.status, step.why = "skipped", "--skip-tests: .ci/run runs this very line"
            elif args.only and not is_install and not re.search(args.only, step.section + "\n" + step.command):
                step.status, step.why = "skipped", f"--only {args.only}"
            else:
                run_step(step, cwd, env, args.timeout)
            first = step.command.splitlines()[0][:90]
            print(f"[{i + 1}/{len(steps)}] {step.status:7s} {step.seconds if step.seconds is not None else '-':>7} s  {first}", flush=True)
            if step.status == "fail":
                print("    " + "\n    ".join(step.tail[-6:]), flush=True)
    finally:
        if args.keep:
            print(f"scratch kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    total = round(time.perf_counter() - t_all, 1)
    result = {
        "benchmark": "readme_tour",
        "machine": machine_info(),
        "readme_sha": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "worktree": args.worktree,
        "total_s": total,
        "passed": sum(s.status == "pass" for s in steps),
        "failed": sum(s.status == "fail" for s in steps),
        "skipped": sum(s.status == "skipped" for s in steps),
        "steps": [asdict(s) for s in steps],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"README tour: {result['passed']} passed, {result['failed']} failed, {result['skipped']} skipped in {total:.0f} s",
                  title_justify="left")
        for col in ("section", "command", "status", "s"):
            t.add_column(col, overflow="fold")
        for s in steps:
            t.add_row(s.section[:30], s.command.splitlines()[0][:70], s.status, "-" if s.seconds is None else f"{s.seconds:.1f}")
        Console(width=160).print(t)
    except ImportError:
        pass
    print(f"{result['passed']} passed, {result['failed']} failed, {result['skipped']} skipped")
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
