"""Measured per-operation HE costs: where they are cached, and how counts become seconds.

The HE backend (:mod:`graphpress.backends.he.costmodel`) times the real BFV operations once per
machine and writes them here; the block-size search's ``he-measured`` cost model and the
backend's cost report read them. This module only reads/writes JSON and does arithmetic (no
HE library), so passes can use it (see :mod:`graphpress.lowering.he`).

Cache: ``~/.cache/graphpress/he_op_costs.json`` (``$GRAPHPRESS_HE_COSTS`` overrides the path),
``{"version": 1, "machines": {machine_key: {"entries": {"N:bits-bits-bits": entry}}}}``; an
entry holds the parameter set (``poly_degree``, ``coeff_modulus_bits``, ``plain_modulus``,
``plain_bits``, ``batching``) and ``seconds`` per operation (medians):

================= ==========================================================================
``upload_coeffs`` client: encode a coefficient polynomial, encrypt (seeded), serialize + load
``upload_slots``  the same for a batched slot vector
``download``      server -> client: serialize + load one result ciphertext, decrypt
``download_slots`` the same, then decode every slot of the batched plaintext
``decode_coeff``  client: read one decrypted coefficient (per value read)
``ntt``/``intt``  server: a ciphertext to / from NTT form
``mul_plain``     server: ciphertext x NTT-form plaintext
``add``           server: ciphertext + ciphertext
``add_plain``     server: ciphertext + plaintext
``rotate``        server: one row rotation (key switch)
================= ==========================================================================

Prediction (:func:`layer_terms`): each count of :mod:`graphpress.lowering.he.counts` is priced by the
operation that realizes it in the kernels --

* coefficient encodings: ``encryptions x (upload_coeffs + ntt)`` (every input ciphertext is
  NTT'd once), ``(ntts - encryptions) x intt`` (one per output), ``plain_mults x mul_plain``,
  ``ct_adds x add``, ``plain_adds x add_plain``, ``decryptions x download`` and
  ``values_read x decode_coeff`` (the outputs, ``m`` per input vector for a linear, the
  stride-1 map ``C_out x H1 x W1`` per image for a conv);
* ``slot-dense``: ``encryptions x upload_slots``, forward ``ntt`` for the baby steps and
  ``intt`` for the ``decryptions x n2`` inner sums, ``rotations x rotate``, products, additions,
  ``decryptions x download_slots``.

The sum is the predicted wall time of the kernel call (client + server + serialization, no
network); Python glue between operations is not modelled (it is a few percent at these sizes).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any, Mapping

from graphpress.lowering.he import counts as he_counts

CACHE_VERSION = 1
CACHE_ENV = "GRAPHPRESS_HE_COSTS"
OPS = (
    "upload_coeffs",
    "upload_slots",
    "download",
    "download_slots",
    "decode_coeff",
    "ntt",
    "intt",
    "mul_plain",
    "add",
    "add_plain",
    "rotate",
)
#: Parameter sets measured by default: every ``N`` x these plaintext-modulus bits, with and
#: without a rotation (key-switching) chain -- the chains ``choose_params`` picks for 8-bit models.
DEFAULT_DEGREES = (4096, 8192, 16384)
DEFAULT_PLAIN_BITS = (16, 20, 24, 28, 32)
#: The entry the ``he-measured`` search model uses at a given ``N`` (no layer's ``t`` is known then).
REFERENCE_PLAIN_BITS = 24


def cache_path() -> Path:
    """The cache file (``$GRAPHPRESS_HE_COSTS`` or ``~/.cache/graphpress/he_op_costs.json``)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "graphpress" / "he_op_costs.json"


def tenseal_version() -> str:
    """Installed tenseal version from its metadata (no import), ``"none"`` when absent."""
    from importlib import metadata

    try:
        return metadata.version("tenseal")
    except metadata.PackageNotFoundError:
        return "none"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def machine_key() -> str:
    """What the costs are valid for: host, CPU model, core count, tenseal version."""
    return f"{platform.node()}|{platform.machine()}|{_cpu_model()}|{os.cpu_count()} cpus|tenseal {tenseal_version()}"


def entry_key(poly_degree: int, coeff_modulus_bits: Any) -> str:
    return f"{int(poly_degree)}:" + "-".join(str(int(b)) for b in coeff_modulus_bits)


def read_cache(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The whole cache (an empty one when the file is missing or from another cache version)."""
    p = Path(path) if path is not None else cache_path()
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"version": CACHE_VERSION, "machines": {}}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {"version": CACHE_VERSION, "machines": {}}
    data.setdefault("machines", {})
    return data


def machine_entries(path: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """This machine's entries, by :func:`entry_key`."""
    return read_cache(path).get("machines", {}).get(machine_key(), {}).get("entries", {})


def _write(data: dict[str, Any], p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, p)
    return p


def write_entries(entries: Mapping[str, Mapping[str, Any]], path: str | os.PathLike | None = None) -> Path:
    """Merge ``entries`` into this machine's part of the cache (atomic replace of the file)."""
    p = Path(path) if path is not None else cache_path()
    data = read_cache(p)
    machine = data["machines"].setdefault(machine_key(), {"entries": {}})
    machine.setdefault("entries", {}).update({k: dict(v) for k, v in entries.items()})
    return _write(data, p)


# ---------------------------------------------------------------------------- secure protocol
#: Version of the ``secure`` section (per-op costs of :mod:`graphpress.backends.he.secure`).
SECURE_VERSION = 3


def secure_section(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """This machine's secure-protocol costs: ``{"he": {params_key: seconds per op}, "transfer_s_per_byte", "spu"}``
    (written by :mod:`graphpress.backends.he.secure.costmodel`; empty when missing or stale)."""
    sec = read_cache(path).get("machines", {}).get(machine_key(), {}).get("secure", {})
    return sec if sec.get("version") == SECURE_VERSION else {}


def write_secure_section(section: Mapping[str, Any], path: str | os.PathLike | None = None) -> Path:
    """Replace this machine's secure-protocol costs (atomic replace of the file)."""
    p = Path(path) if path is not None else cache_path()
    data = read_cache(p)
    machine = data["machines"].setdefault(machine_key(), {"entries": {}})
    machine["secure"] = {**section, "version": SECURE_VERSION}
    return _write(data, p)


def secure_params_key(poly_degree: int, coeff_modulus_bits: Any) -> str:
    return f"N{int(poly_degree)}-" + "-".join(str(int(b)) for b in coeff_modulus_bits)


def secure_entry(poly_degree: int, *, path: str | os.PathLike | None = None) -> dict[str, float] | None:
    """Per-op seconds of the secure protocol at ``N`` for a search that knows no layer's primes
    yet: the measured two-data-prime chain (what 8-bit layers get; the per-op costs depend on the
    prime count, not the prime sizes), else any chain at ``N``; None when nothing is cached."""
    sec = secure_section(path)
    at_n = {k: v for k, v in sec.get("he", {}).items() if k.startswith(f"N{int(poly_degree)}-")}
    if not at_n:
        return None
    key = min(at_n, key=lambda k: (abs(len(k.split("-")) - 4), k))  # N, two data primes, special prime
    return {**at_n[key], "transfer_s_per_byte": float(sec.get("transfer_s_per_byte", 0.0))}


def read_seconds(reads: list[int], poly_degree: int, cost: Mapping[str, float]) -> float:
    """The client's reading of its coefficients: one call each up to ``N/8`` per response, else
    one serialization of the whole plaintext (:meth:`graphpress.backends.he.bfv.BFVContext.decrypt_coeffs`)."""
    return sum(r * cost["read"] if r <= poly_degree // 8 else cost["read_bulk"] for r in reads)


def secure_layer_seconds(counts: Mapping[str, Any], poly_degree: int, cost: Mapping[str, float]) -> tuple[float, float, float]:
    """``(seconds, bytes up, bytes down)`` of one layer of the secure protocol from
    :func:`graphpress.lowering.he.counts.secure_counts` and a :func:`secure_entry`: per input
    ciphertext, product and response, the reads, and every byte through the channel (seeded
    inputs; responses: ``c1`` plus the read coefficients of ``c0`` at the last prime)."""
    up = counts["inputs"] * cost["input_bytes"]
    down = (counts["outputs"] * int(poly_degree) + sum(counts["reads"])) * cost["output_nbytes"]
    secs = (counts["inputs"] * cost["input"] + counts["products"] * cost["product"] + counts["outputs"] * cost["output"]
            + read_seconds(counts["reads"], poly_degree, cost) + (up + down) * cost.get("transfer_s_per_byte", 0.0))
    return secs, up, down


def find_entry(poly_degree: int, coeff_modulus_bits: Any = None, *, path: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The cached entry for exactly this parameter chain; with ``coeff_modulus_bits=None`` the
    reference entry at ``N``: the chain measured for a ``REFERENCE_PLAIN_BITS`` plaintext modulus
    without rotations, else the rotation-free entry whose plaintext bits are closest to it
    (entries measured for a program's layers). None when nothing at ``N`` is cached."""
    entries = machine_entries(path)
    if coeff_modulus_bits is not None:
        return entries.get(entry_key(poly_degree, coeff_modulus_bits))
    at_n = [e for e in entries.values() if e.get("poly_degree") == int(poly_degree) and not e.get("batching")]
    if not at_n:
        return None
    return min(at_n, key=lambda e: (abs(int(e.get("plain_bits") or 0) - REFERENCE_PLAIN_BITS), entry_key(e["poly_degree"], e["coeff_modulus_bits"])))


def values_read(kind: str, out_features: int, vectors: int = 1, conv: Mapping[str, Any] | None = None) -> int:
    """Coefficients the client reads after a coefficient-encoded layer: ``vectors x m`` for a
    linear; for a conv the stride-1 map of the padded input, ``batch x C_out x H1 x W1``
    (``conv``: ``h, w, kh, kw, padding``)."""
    if kind == "linear":
        return int(vectors) * int(out_features)
    c = conv or {}
    h1 = int(c["h"]) + 2 * int(c["padding"][0]) - int(c["kh"]) + 1
    w1 = int(c["w"]) + 2 * int(c["padding"][1]) - int(c["kw"]) + 1
    return int(vectors) * int(out_features) * h1 * w1


def layer_terms(
    encoding: str,
    counts: Mapping[str, int],
    seconds: Mapping[str, float],
    *,
    values: int = 0,
    inverse_ntts: int | None = None,
) -> dict[str, dict[str, float]]:
    """Predicted time of one layer call, per operation: ``{op: {"count", "seconds"}}``.

    Parameters
    ----------
    encoding : str
        ``"coeff-circulant"``, ``"coeff-dense"`` or ``"slot-dense"``.
    counts : mapping
        :func:`graphpress.lowering.he.counts.counts_linear` / ``counts_conv`` of the call.
    seconds : mapping
        Per-operation seconds of a cache entry.
    values : int
        Coefficients read by the client (coefficient encodings; :func:`values_read`).
    inverse_ntts : int, optional
        Inverse NTTs (``slot-dense``: ``decryptions x n2``); default ``counts["decryptions"]``.
    """
    enc, dec = int(counts.get("encryptions", 0)), int(counts.get("decryptions", 0))
    inv = dec if inverse_ntts is None else int(inverse_ntts)
    fwd = max(0, int(counts.get("ntts", 0)) - inv)
    if encoding == "slot-dense":
        use = {"upload_slots": enc, "download_slots": dec}
    else:
        use = {"upload_coeffs": enc, "download": dec, "decode_coeff": int(values)}
    use.update(
        {
            "ntt": fwd,
            "intt": inv,
            "mul_plain": int(counts.get("plain_mults", 0)),
            "add": int(counts.get("ct_adds", 0)),
            "add_plain": int(counts.get("plain_adds", 0)),
            "rotate": int(counts.get("rotations", 0)),
        }
    )
    missing = [op for op, n in use.items() if n and op not in seconds]
    if missing:
        raise KeyError(f"the cached HE costs lack {', '.join(missing)}; re-run `compress he-calibrate`")
    return {op: {"count": n, "seconds": n * float(seconds.get(op, 0.0))} for op, n in use.items() if n}


def slot_inverse_ntts(m: int, n: int, poly_degree: int, decryptions: int) -> int:
    """Inverse NTTs of a ``slot-dense`` call: ``n2`` per output ciphertext."""
    return int(decryptions) * he_counts.plan_slot_linear(m, n, poly_degree).n2


def total_seconds(terms: Mapping[str, Mapping[str, float]]) -> float:
    return float(sum(t["seconds"] for t in terms.values()))


__all__ = [
    "CACHE_ENV",
    "CACHE_VERSION",
    "DEFAULT_DEGREES",
    "DEFAULT_PLAIN_BITS",
    "OPS",
    "REFERENCE_PLAIN_BITS",
    "SECURE_VERSION",
    "cache_path",
    "entry_key",
    "find_entry",
    "layer_terms",
    "machine_entries",
    "machine_key",
    "read_cache",
    "read_seconds",
    "secure_entry",
    "secure_layer_seconds",
    "secure_params_key",
    "secure_section",
    "slot_inverse_ntts",
    "tenseal_version",
    "total_seconds",
    "values_read",
    "write_entries",
    "write_secure_section",
]
