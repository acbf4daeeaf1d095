"""Llama-architecture language model in llama2.c's binary format (e.g. stories260K).

File format (llama2.c "legacy"/version-0 export, little endian):

* header: 7 int32 ``dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len``;
  a negative ``vocab_size`` means the classifier is *not* tied to the embedding and a
  separate ``wcls`` follows the RoPE tables;
* float32 tensors, in this order: token embedding ``(vocab, dim)``, attention RMSNorm
  weights ``(L, dim)``, ``wq``, ``wk``, ``wv``, ``wo``, FFN RMSNorm weights ``(L, dim)``,
  ``w1``, ``w2``, ``w3``, final RMSNorm ``(dim,)``, RoPE cos and sin tables
  ``(seq_len, head_size/2)`` each, and ``wcls (vocab, dim)`` when unshared.

The projection matrices are stored per layer in ``nn.Linear`` (out, in) layout, i.e.
``wk[l]`` is ``(n_kv_heads*head_size, dim)``; run.c's comments write the transposed
shapes, but its matmul reads the rows as output units. On stories260K the (out, in)
reading gives 2.8 nats of next-token cross-entropy on the model's own samples, while
the transposed reading of the square matrices does not (see tests/zoo/test_zoo_llama2c.py).

RoPE rotates *interleaved* pairs ``(x[..., 0::2], x[..., 1::2])`` as llama2.c does
(not the half-split rotation of Hugging Face Llama).

:class:`Llama2c` recomputes the full sequence on every call (no KV cache) so that it
exports cleanly with :func:`torch.export.export`, including a dynamic batch dimension.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from graphpress.errors import FrontendError

__all__ = [
    "ModelArgs",
    "Llama2c",
    "RMSNorm",
    "read_llama2c_header",
    "is_llama2c_file",
    "load_llama2c",
    "save_llama2c",
    "sample",
]

HEADER = struct.Struct("<7i")
# Sanity bounds on header values: anything beyond them is not a llama2.c file (or not
# one this loader is meant for); they keep a garbage header from allocating gigabytes.
_MAX_DIM = 1 << 16
_MAX_LAYERS = 1024
_MAX_VOCAB = 1 << 20
_MAX_SEQ = 1 << 20
# llama2.c's newer export formats start with the magic "ak42" (read as an int32).
_AK42_MAGIC = 0x616B3432


@dataclass(frozen=True)
class ModelArgs:
    """Hyper-parameters of a llama2.c model (the file header, with the sign of vocab split out).

    Attributes
    ----------
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len : int
        As in the llama2.c header; ``vocab_size`` is always positive here.
    shared_classifier : bool
        Whether the output classifier is tied to the token embedding.
    norm_eps : float
        RMSNorm epsilon (llama2.c uses 1e-5).
    rope_theta : float
        RoPE base, used when the tables are computed rather than read from a file.
    """

    dim: int = 64
    hidden_dim: int = 172
    n_layers: int = 5
    n_heads: int = 8
    n_kv_heads: int = 4
    vocab_size: int = 512
    seq_len: int = 512
    shared_classifier: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    def validate(self) -> str | None:
        """Return why these arguments cannot describe a model, or ``None`` when they can."""
        values = {
            "dim": (self.dim, _MAX_DIM),
            "hidden_dim": (self.hidden_dim, _MAX_DIM * 8),
            "n_layers": (self.n_layers, _MAX_LAYERS),
            "n_heads": (self.n_heads, _MAX_DIM),
            "n_kv_heads": (self.n_kv_heads, _MAX_DIM),
            "vocab_size": (self.vocab_size, _MAX_VOCAB),
            "seq_len": (self.seq_len, _MAX_SEQ),
        }
        for name, (value, hi) in values.items():
            if not 0 < value <= hi:
                return f"{name}={value} outside 1..{hi}"
        if self.dim % self.n_heads:
            return f"dim={self.dim} not divisible by n_heads={self.n_heads}"
        if self.head_size % 2:
            return f"head_size={self.head_size} is odd (RoPE rotates pairs)"
        if self.n_heads % self.n_kv_heads:
            return f"n_heads={self.n_heads} not divisible by n_kv_heads={self.n_kv_heads}"
        return None

    def n_floats(self) -> int:
        """Number of float32 values that follow the header in the file."""
        d, hd, L, hs = self.dim, self.hidden_dim, self.n_layers, self.head_size
        kv = self.n_kv_heads * hs
        n = self.vocab_size * d  # token embedding
        n += L * d  # attention norms
        n += L * d * d * 2  # wq, wo
        n += L * d * kv * 2  # wk, wv
        n += L * d  # ffn norms
        n += L * d * hd * 3  # w1, w2, w3
        n += d  # final norm
        n += self.seq_len * (hs // 2) * 2  # RoPE cos, sin
        if not self.shared_classifier:
            n += self.vocab_size * d
        return n

    def file_size(self) -> int:
        """Expected size of the file in bytes."""
        return HEADER.size + 4 * self.n_floats()


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight``."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs ``(x[..., 2i], x[..., 2i+1])`` by the angles in ``cos``/``sin``.

    ``x`` is ``(B, T, H, hs)``; ``cos``/``sin`` are ``(T, hs/2)``.
    """
    xr, xi = x[..., 0::2], x[..., 1::2]
    cos = cos[:, None, :]  # broadcast over heads
    sin = sin[:, None, :]
    out_r = xr * cos - xi * sin
    out_i = xr * sin + xi * cos
    # stack(-1).flatten(-2) re-interleaves (r0, i0, r1, i1, ...).
    return torch.stack((out_r, out_i), dim=-1).flatten(-2)


class Attention(nn.Module):
    """Causal multi-head attention with grouped K/V heads (GQA) and RoPE."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_size = args.n_heads, args.n_kv_heads, args.head_size
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_size, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_size, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_size, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_size, args.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_size)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_size)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_size)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv_heads != self.n_heads:
            # llama2.c maps query head h to kv head h // (n_heads / n_kv_heads): repeat_interleave.
            rep = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(rep, dim=2)
            v = v.repeat_interleave(rep, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, hs)
        # Explicit matmul/softmax rather than SDPA: every backend and pass sees plain ops.
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_size))
        scores = scores.masked_fill(mask, float("-inf"))
        out = F.softmax(scores, dim=-1) @ v
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_size))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm attention and feed-forward with residual connections."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask)
        return x + self.feed_forward(self.ffn_norm(x))


def rope_tables(head_size: int, seq_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """llama2.c's RoPE tables: ``cos/sin(p * theta^(-2i/head_size))``, each ``(seq_len, head_size/2)``."""
    freqs = 1.0 / theta ** (torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), freqs)
    return angles.cos().float(), angles.sin().float()


class Llama2c(nn.Module):
    """Llama transformer as in llama2.c, full-sequence forward.

    Parameters
    ----------
    args : ModelArgs
        Model hyper-parameters.

    Notes
    -----
    ``forward(tokens)`` maps a ``LongTensor[B, T]`` (``T <= seq_len``) to logits
    ``[B, T, vocab]``. The RoPE tables are non-persistent buffers (derived data, not
    weights) sliced to ``T``; both the batch and the sequence dimension can be dynamic
    in :func:`torch.export.export` (``T`` up to ``seq_len``).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        if (why := args.validate()) is not None:
            raise ValueError(f"invalid ModelArgs: {why}")
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.shared_classifier:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(args.head_size, args.seq_len, args.rope_theta)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)
        self._example_cache: dict[int, torch.Tensor] = {}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        torch._check(T <= self.args.seq_len, lambda: f"sequence length {T} exceeds seq_len={self.args.seq_len}")
        h = self.tok_embeddings(tokens)
        cos, sin = self.freqs_cos[:T], self.freqs_sin[:T]
        # The causal mask is built from T rather than sliced from a (seq_len, seq_len)
        # buffer: a [:T, :T] slice is contiguous only when T == seq_len, and that
        # contiguity check made torch.export specialise a dynamic T to T != seq_len.
        pos = torch.arange(T, device=tokens.device)
        mask = pos[None, :] > pos[:, None]  # True above the diagonal: future positions
        for layer in self.layers:
            h = layer(h, cos, sin, mask)
        return self.output(self.norm(h))

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor, ...]:
        """Token sequences sampled from the model itself (seed 0, 32 tokens), cached per batch size.

        Sampling from the model's own distribution gives in-distribution inputs without a
        tokenizer or a dataset. The cache keeps the inputs fixed even after a pass edits
        the weights, so before/after comparisons use the same tokens.

        Parameters
        ----------
        batch : int
            Number of sequences.

        Returns
        -------
        tuple of torch.Tensor
            ``(tokens,)`` with ``tokens`` a ``LongTensor[batch, min(32, seq_len)]``.
        """
        if batch not in self._example_cache:
            self._example_cache[batch] = sample(self, batch, min(32, self.args.seq_len), seed=0)
        return (self._example_cache[batch].clone(),)


# ----------------------------------------------------------------------------- file I/O


def _header_args(values: tuple[int, ...]) -> ModelArgs:
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = values
    return ModelArgs(
        dim=dim,
        hidden_dim=hidden_dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=abs(vocab_size),
        seq_len=seq_len,
        shared_classifier=vocab_size > 0,
    )


def read_llama2c_header(path: str | Path) -> ModelArgs:
    """Read and check the header of a llama2.c file against the file size.

    Parameters
    ----------
    path : str or Path
        The ``.bin`` file.

    Returns
    -------
    ModelArgs

    Raises
    ------
    FrontendError
        One line naming the file and what is wrong: missing, shorter than a header,
        a newer (``ak42``) export version, implausible header values, or a size that
        does not match the header (truncated or trailing data).
    """
    path = Path(path)
    if not path.is_file():
        raise FrontendError(f"{path}: no such llama2.c model file")
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw = fh.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise FrontendError(f"{path}: {size} bytes is too short for a llama2.c header (28 bytes)")
    values = HEADER.unpack(raw)
    if values[0] == _AK42_MAGIC:
        raise FrontendError(
            f"{path}: llama2.c export version {values[1]} ('ak42' magic) is not supported; "
            "export with llama2.c's legacy (version 0) format"
        )
    args = _header_args(values)
    if (why := args.validate()) is not None:
        raise FrontendError(f"{path}: bad llama2.c header {values}: {why}")
    expected = args.file_size()
    if size != expected:
        kind = "truncated" if size < expected else "has trailing data"
        raise FrontendError(
            f"{path}: llama2.c file {kind}: header {values} needs {expected} bytes, file has {size}"
        )
    return args


def is_llama2c_file(path: str | Path) -> bool:
    """Cheap check whether ``path`` is a llama2.c model: a plausible header whose size matches.

    Reads only 28 bytes, so the frontend dispatcher can call it on any ``.bin`` file.
    """
    try:
        read_llama2c_header(path)
    except (FrontendError, OSError):
        return False
    return True


def load_llama2c(path: str | Path) -> Llama2c:
    """Load a llama2.c (version 0) model file into :class:`Llama2c`, in eval mode.

    Parameters
    ----------
    path : str or Path
        The ``.bin`` file (:func:`graphpress.zoo.llama2c.load_llama2c` defaults it to the
        shared ``stories260K.bin``).

    Returns
    -------
    Llama2c
        With the file's RoPE tables in ``freqs_cos``/``freqs_sin``.

    Raises
    ------
    FrontendError
        When the file is missing, truncated or has a bad header.
    """
    path = Path(path)
    args = read_llama2c_header(path)
    data = torch.from_numpy(np.fromfile(path, dtype="<f4", offset=HEADER.size).astype(np.float32))
    d, hd, L, hs = args.dim, args.hidden_dim, args.n_layers, args.head_size
    kv = args.n_kv_heads * hs
    pos = 0

    def take(*shape: int) -> torch.Tensor:
        nonlocal pos
        n = math.prod(shape)
        out = data[pos : pos + n].view(*shape)
        pos += n
        return out

    # Read in file order; matrices are (L, out, in), i.e. nn.Linear weights per layer.
    tok = take(args.vocab_size, d)
    rms_att = take(L, d)
    wq, wk, wv, wo = take(L, d, d), take(L, kv, d), take(L, kv, d), take(L, d, d)
    rms_ffn = take(L, d)
    w1, w2, w3 = take(L, hd, d), take(L, d, hd), take(L, hd, d)
    rms_final = take(d)
    cos, sin = take(args.seq_len, hs // 2), take(args.seq_len, hs // 2)
    wcls = None if args.shared_classifier else take(args.vocab_size, d)
    assert pos == data.numel(), "file size was checked against the header"

    model = Llama2c(args)
    with torch.no_grad():
        model.tok_embeddings.weight.copy_(tok)
        for i, layer in enumerate(model.layers):
            layer.attention_norm.weight.copy_(rms_att[i])
            layer.attention.wq.weight.copy_(wq[i])
            layer.attention.wk.weight.copy_(wk[i])
            layer.attention.wv.weight.copy_(wv[i])
            layer.attention.wo.weight.copy_(wo[i])
            layer.ffn_norm.weight.copy_(rms_ffn[i])
            layer.feed_forward.w1.weight.copy_(w1[i])
            layer.feed_forward.w2.weight.copy_(w2[i])
            layer.feed_forward.w3.weight.copy_(w3[i])
        model.norm.weight.copy_(rms_final)
        if wcls is not None:
            model.output.weight.copy_(wcls)
        # Use the file's tables: they are what the model was run with.
        model.freqs_cos.copy_(cos)
        model.freqs_sin.copy_(sin)
    return model.eval()


def save_llama2c(model: Llama2c, path: str | Path) -> Path:
    """Write ``model`` in llama2.c's version-0 format (the inverse of :func:`load_llama2c`).

    Used to make small ``.bin`` files for frontend tests; an untied classifier is
    written with a negative ``vocab_size`` as llama2.c does.

    Parameters
    ----------
    model : Llama2c
        The model to write.
    path : str or Path
        Destination file.

    Returns
    -------
    Path
    """
    a = model.args
    shared = model.output.weight is model.tok_embeddings.weight
    header = HEADER.pack(
        a.dim, a.hidden_dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size if shared else -a.vocab_size, a.seq_len
    )
    layers = list(model.layers)

    def stacked(get) -> torch.Tensor:
        return torch.stack([get(layer) for layer in layers])

    tensors = [
        model.tok_embeddings.weight,
        stacked(lambda l: l.attention_norm.weight),
        stacked(lambda l: l.attention.wq.weight),
        stacked(lambda l: l.attention.wk.weight),
        stacked(lambda l: l.attention.wv.weight),
        stacked(lambda l: l.attention.wo.weight),
        stacked(lambda l: l.ffn_norm.weight),
        stacked(lambda l: l.feed_forward.w1.weight),
        stacked(lambda l: l.feed_forward.w2.weight),
        stacked(lambda l: l.feed_forward.w3.weight),
        model.norm.weight,
        model.freqs_cos,
        model.freqs_sin,
    ]
    if not shared:
        tensors.append(model.output.weight)
    path = Path(path)
    with path.open("wb") as fh:
        fh.write(header)
        for t in tensors:
            fh.write(t.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes())
    return path


# ----------------------------------------------------------------------------- sampling


@torch.no_grad()
def sample(
    model: nn.Module,
    n_seqs: int,
    seq_len: int,
    temperature: float = 1.0,
    seed: int = 0,
    bos: int = 1,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Sample token sequences autoregressively by re-running the full prefix.

    Parameters
    ----------
    model : nn.Module
        Maps ``LongTensor[B, T]`` to logits ``[B, T, vocab]``.
    n_seqs : int
        Number of sequences (the batch).
    seq_len : int
        Length of each returned sequence, BOS included.
    temperature : float
        Softmax temperature; ``0`` means greedy decoding.
    seed : int
        Seed of the private generator, so results do not depend on global RNG state.
    bos : int
        Token placed at position 0 (llama2.c's BOS is 1).
    on_step : callable, optional
        ``on_step(done, total)`` after each generated token (progress for long samples).

    Returns
    -------
    torch.LongTensor
        ``(n_seqs, seq_len)`` tokens starting with ``bos``.
    """
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.full((n_seqs, 1), bos, dtype=torch.long)
    for _ in range(seq_len - 1):
        logits = model(tokens)[:, -1, :].float()
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            probs = F.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen)
        tokens = torch.cat([tokens, nxt], dim=1)
        if on_step is not None:
            on_step(tokens.shape[1] - 1, seq_len - 1)
    return tokens
