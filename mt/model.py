"""Encoder-decoder Transformer (Vaswani et al., 2017) for translation.

Read top to bottom: attention, feed-forward, layers, embeddings, the decoder
cache, and last the model itself. Shape letters used in the comments:

    B  sentences in the batch        S  source length       T  target length
    N  decoder rows (B, or B * beam hypotheses, grouped by sentence)
    L  target tokens already in the decoder cache
    d  model width   H  heads   hd  head width (d // H)   V  vocabulary

Speed notes. Attention goes through `F.scaled_dot_product_attention` (sdpa),
which on CPU and GPU picks a fused kernel as long as there is no attention
dropout; masks are only built when needed: target self-attention uses
`is_causal` (targets are right-padded, so a real token never looks at a pad),
and the key-padding mask is a broadcast (B, 1, 1, S) boolean, or None when the
batch has no padding at all (at inference on CPU, where sdpa is slow at these
sizes, plain matmuls replace it: see `_attend`). Self-attention projects q, k, v
with one matmul and cross-attention projects k, v with one matmul. On CPU, where
drawing random numbers is the expensive part of dropout, masks take 16 random bits
per element instead of 32, and residual dropout is fused into the residual add.

At inference on a CPU in float32, a frozen model's linear layers compute with a copy of
their weights laid out for MKL (Intel CPUs) or oneDNN (others) (`Linear`), and the softmax
of attention is written out (short rows).

Incremental decoding keeps the self-attention keys/values of the tokens decoded
so far (`SelfKV`, filled in place after each reordering) and the cross-attention
keys/values of the source in a `DecoderCache`.
The cross-attention part is stored once per source sentence, not once per beam
hypothesis: the decoder rows of one sentence are contiguous, so their queries
are folded into one (H, beam * T) query block per sentence. That saves the
projection, the memory, and the copy on every beam reselection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mt.config import ModelConfig
from mt.device import cpu_is_intel
from mt.special import PAD

KV = tuple[Tensor, Tensor]  # keys and values, each (rows, H, length, hd)

# The attention kernels inference may use on an accelerator: every fused one but cuDNN's.
INFERENCE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# A frozen layer's float32 matrix product on a CPU (inference), in the library that does best
# on the CPU's maker, as CTranslate2 chooses: Intel's MKL on Intel CPUs, oneDNN elsewhere.
# MKL: torch.addmm with the weight stored transposed, (in, out), once. On a Xeon with AVX-512
# and AMX, at decoding sizes: 2.5-4x faster than oneDNN for up to 8 rows (oneDNN spends 25-45
# us per call there), 1.3-1.8x at 32, even from 128 rows; F.linear's transposed read of the
# weight was 1.3-2.3x slower up to 32 rows. Decoding 1,000 sentences: greedy 10% faster, beam
# 1-6%, outputs identical. oneDNN: the weight packed once into its own layout, bias and ReLU
# in the same pass: on an AVX-512 EPYC 15-25% faster than F.linear at decoding sizes, 2x for
# a few dozen rows. oneDNN's are inductor's ops, in every torch built with oneDNN (the x86
# and aarch64 wheels); without them, and for a layer being trained, inference takes F.linear.
_MKL_LINEAR = torch.backends.mkl.is_available() and cpu_is_intel()
_ONEDNN_LINEAR = (
    not _MKL_LINEAR
    and torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
)
_PACK_FOR_ROWS = 256  # the number of rows oneDNN lays the weight out for; any number works
# The decoder's self-attention cache on a CPU: positions outer on Intel CPUs (see SelfKV), where it
# was measured, with room for this many more positions when it grows.
_POSITIONS_OUTER = cpu_is_intel()
_SPARE = 8


def _keep_mask(x: Tensor, p: float) -> Tensor:
    """A dropout mask for x: 0 with probability p, else 1 / (1 - p); x's shape and dtype.

    On CPU, drawing the random numbers is most of the cost of dropout, and torch
    draws 32 bits per element. One int64 draw gives four 16-bit words here, one
    per element: keep iff word >= p * 2^16 (p is honoured to 2^-16).
    """
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), 2**63 - 1)
    keep = bits.view(torch.int16)[:n].view(x.shape) >= round(p * 65536) - 32768
    return keep.to(x.dtype).mul_(1.0 / (1.0 - p))


def _dropout(x: Tensor, p: float, training: bool) -> Tensor:
    if not training or p == 0.0:
        return x  # F.dropout would still cost a pass at p=0
    if x.device.type != "cpu":
        return F.dropout(x, p, True)  # fused kernels on GPU
    return x * _keep_mask(x, p)


def _residual(x: Tensor, y: Tensor, p: float, training: bool) -> Tensor:
    """x + dropout(y), on CPU in one fused multiply-add."""
    if not training or p == 0.0:
        return x + y
    if x.device.type != "cpu":
        return x + F.dropout(y, p, True)
    return torch.addcmul(x, y, _keep_mask(y, p))


def _split_heads(x: Tensor, parts: int, heads: int) -> tuple[Tensor, ...]:
    """(B, T, parts * d) -> `parts` views of shape (B, H, T, hd), no copy.

    sdpa reads strided inputs directly, so the fused projection output is never
    copied into separate tensors; in backward, the split becomes one concatenation.
    """
    B, T, _ = x.shape
    return tuple(t.view(B, T, heads, -1).transpose(1, 2) for t in x.chunk(parts, dim=-1))


def _merge_heads(y: Tensor) -> Tensor:
    """(B, H, T, hd) -> (B, T, d). sdpa's CPU/GPU kernels already return (B, T, H, hd) memory, so
    the reshape below is usually free."""
    B, H, T, hd = y.shape
    return y.transpose(1, 2).reshape(B, T, H * hd)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) whose inference on a CPU in float32 goes
    through MKL or oneDNN (see _MKL_LINEAR); `relu=True` applies ReLU to the output.

    A frozen layer (weight.requires_grad False, as a Translator's model is) computes with a
    copy of its weight laid out for that library, made on first use and made again when the
    weight changes (load_state_dict, a move to another dtype or device): it is keyed on the
    weight's storage and version counter. Only frozen weights: an optimizer's fused step
    changes a weight in place without counting a version. The copy is not part of the state
    dict, nor of a copy or pickle.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._packed: tuple[tuple[int, int], Tensor] | None = None

    def forward(self, x: Tensor, relu: bool = False) -> Tensor:
        if x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled():
            frozen = not self.weight.requires_grad
            if _MKL_LINEAR and frozen:
                x2 = x.reshape(-1, x.size(-1))
                w = self._packed_weight()  # (in, out)
                y = torch.mm(x2, w) if self.bias is None else torch.addmm(self.bias, x2, w)
                return (y.relu_() if relu else y).view(*x.shape[:-1], w.size(1))
            if _ONEDNN_LINEAR:
                w = self._packed_weight() if frozen else self.weight
                return torch.ops.mkldnn._linear_pointwise(x, w, self.bias, "relu" if relu else "none", [], "")
        y = F.linear(x, self.weight, self.bias)
        return F.relu(y) if relu else y

    def pack(self) -> None:
        """Make the copy of a frozen CPU float32 weight now, not on first use."""
        w = self.weight
        on_cpu = w.device.type == "cpu" and w.dtype == torch.float32
        if (_MKL_LINEAR or _ONEDNN_LINEAR) and on_cpu and not w.requires_grad:
            self._packed_weight()

    def _packed_weight(self) -> Tensor:
        w = self.weight
        key = (w.data_ptr(), w._version)
        if self._packed is None or self._packed[0] != key:
            if _MKL_LINEAR:
                self._packed = (key, w.t().contiguous())
            else:
                self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(w, _PACK_FOR_ROWS))
        return self._packed[1]

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_packed": None}


def pack_linear_weights(model: nn.Module) -> None:
    """Lay out every frozen Linear's weight for inference now (see Linear): before forking
    decoder processes, so that they share one copy instead of making one each."""
    for m in model.modules():
        if isinstance(m, Linear):
            m.pack()


# --------------------------------------------------------------------------- attention


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, p: float) -> Tensor:
    """softmax(q k^T / sqrt(hd)) v for (B, H, Tq, hd) queries and (B, H, Tk, hd) keys/values.

    sdpa, except for inference on CPU with few queries per row (decoding steps: 1, or
    the beam folded into the query axis) or in low precision: there sdpa's CPU kernels
    are slower than two plain matmuls, 1.2-3x in float32 and 2-5x in bfloat16
    (measured on decoding steps), while with many float32 queries (an encoder, a
    teacher-forced validation pass) sdpa is faster. The softmax is taken in float32.
    Inference on an accelerator uses sdpa without cuDNN's kernel (INFERENCE_BACKENDS).
    `causal` is only ever set with Tq == Tk and no mask (see SelfAttention), where it
    means the lower triangle. Unlike sdpa, a row with every key masked gives NaN; the
    model never builds one (see key_padding_mask).
    """
    inference = p == 0.0 and not torch.is_grad_enabled()
    if inference and q.device.type != "cpu":
        # cuDNN's attention builds a plan for every new shape, and at inference every decoding
        # step has a new key length: on an H200 that made bf16 decoding 10x slower than fp32
        # (9.8 ms of planning per call). The other fused kernels take any shape as it comes.
        with sdpa_kernel(INFERENCE_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    if not inference or (q.dtype == torch.float32 and q.size(2) > 8):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
    s = torch.matmul(q, k.transpose(-1, -2)).float()  # (B, H, Tq, Tk), unscaled
    if causal and q.size(2) > 1:
        mask = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        s.masked_fill_(~mask, float("-inf"))
    # softmax(s / sqrt(hd)) written out: torch.softmax's CPU kernel is made for long rows and
    # took 5x as long on these short ones (a decoding step's keys: tens of positions).
    w = s.sub_(s.amax(-1, keepdim=True)).mul_(q.size(-1) ** -0.5).exp_()
    return torch.matmul(w.div_(w.sum(-1, keepdim=True)).to(q.dtype), v)  # (B, H, Tq, hd)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout  # on the attention probabilities
        self.qkv = Linear(d, 3 * d)
        self.out = Linear(d, d)

    def forward(
        self,
        x: Tensor,  # (B, T, d)
        mask: Tensor | None = None,  # bool, broadcastable to (B, H, T, keys); True = may attend
        causal: bool = False,
        past: SelfKV | None = None,  # keys/values of earlier positions, extended here
    ) -> Tensor:
        T = x.size(1)
        q, k, v = _split_heads(self.qkv(x), 3, self.heads)  # each (B, H, T, hd)
        if past is not None:
            L = past.length
            k, v = past.append(k, v)  # (B, H, L + T, hd)
            if causal and L > 0:
                # sdpa's is_causal aligns the mask top-left, which is wrong once keys
                # precede the queries; query i (position L + i) sees keys 0 .. L + i.
                causal = False
                if T > 1:
                    mask = torch.ones(T, L + T, dtype=torch.bool, device=x.device).tril(L)
        y = _attend(q, k, v, mask, causal, self.dropout if self.training else 0.0)
        return self.out(_merge_heads(y))  # (B, T, d)


class CrossAttention(nn.Module):
    """Multi-head attention from the decoder to the encoder output, fused KV projection."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.q = Linear(d, d)
        self.kv = Linear(d, 2 * d)
        self.out = Linear(d, d)

    def project_kv(self, memory: Tensor) -> KV:
        """(B, S, d) encoder output -> keys and values, each (B, H, S, hd).

        Made contiguous for decoding: every step reads them, and batched matmuls would
        otherwise copy the strided views on each read. (Training reads them once.)
        """
        k, v = _split_heads(self.kv(memory), 2, self.heads)
        if self.training:
            return k, v
        return k.contiguous(), v.contiguous()

    def forward(
        self,
        x: Tensor,  # (N, T, d), N = B * g: g consecutive rows per source sentence
        kv: KV,  # each (B, H, S, hd)
        mask: Tensor | None,  # (B, 1, 1, S) bool, True = real source token; None = no padding
    ) -> Tensor:
        N, T, d = x.shape
        B = kv[0].size(0)
        # Fold the g rows of a sentence into its query axis: (N, T, d) -> (B, g * T, d).
        # Cross-attention has no mask between queries, so this is exact.
        (q,) = _split_heads(self.q(x).view(B, -1, d), 1, self.heads)  # (B, H, g * T, hd)
        y = _attend(q, kv[0], kv[1], mask, False, self.dropout if self.training else 0.0)
        return self.out(_merge_heads(y).view(N, T, d))  # (N, T, d)


class FeedForward(nn.Module):
    def __init__(self, d: int, ffn_dim: int, activation: str, activation_dropout: float) -> None:
        super().__init__()
        self.fc1 = Linear(d, ffn_dim)
        self.fc2 = Linear(ffn_dim, d)
        self.gelu = activation == "gelu"
        self.activation_dropout = activation_dropout

    def forward(self, x: Tensor) -> Tensor:  # (B, T, d) -> (B, T, d)
        # Not in place: fc1's output is a view of a 2-D matmul result, and an in-place op on it
        # makes autograd copy it back into the base in backward.
        h = F.gelu(self.fc1(x)) if self.gelu else self.fc1(x, relu=True)  # (B, T, ffn)
        return self.fc2(_dropout(h, self.activation_dropout, self.training))


# --------------------------------------------------------------------------- layers


class EncoderLayer(nn.Module):
    """Self-attention and feed-forward, each in a residual block.

    Pre-norm: x + f(norm(x)) (stable without warm-up tricks; needs a final norm).
    Post-norm: norm(x + f(x)) (the original paper).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.pre_norm = cfg.pre_norm
        self.dropout = cfg.dropout
        self.attn = SelfAttention(d, cfg.heads, cfg.attention_dropout)
        self.attn_norm = nn.LayerNorm(d)
        self.ffn = FeedForward(d, cfg.ffn_dim, cfg.activation, cfg.activation_dropout)
        self.ffn_norm = nn.LayerNorm(d)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:  # (B, S, d) -> (B, S, d)
        p, train = self.dropout, self.training
        if self.pre_norm:
            x = _residual(x, self.attn(self.attn_norm(x), mask), p, train)
            return _residual(x, self.ffn(self.ffn_norm(x)), p, train)
        x = self.attn_norm(_residual(x, self.attn(x, mask), p, train))
        return self.ffn_norm(_residual(x, self.ffn(x), p, train))


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention and feed-forward, each in a residual block."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.pre_norm = cfg.pre_norm
        self.dropout = cfg.dropout
        self.self_attn = SelfAttention(d, cfg.heads, cfg.attention_dropout)
        self.self_norm = nn.LayerNorm(d)
        self.cross_attn = CrossAttention(d, cfg.heads, cfg.attention_dropout)
        self.cross_norm = nn.LayerNorm(d)
        self.ffn = FeedForward(d, cfg.ffn_dim, cfg.activation, cfg.activation_dropout)
        self.ffn_norm = nn.LayerNorm(d)

    def forward(
        self,
        x: Tensor,  # (N, T, d)
        cross_kv: KV,  # each (B, H, S, hd)
        cross_mask: Tensor | None,  # (B, 1, 1, S)
        past: SelfKV | None = None,  # self-attention keys/values of earlier positions, (N, H, L, hd)
    ) -> Tensor:
        p, train = self.dropout, self.training
        if self.pre_norm:
            x = _residual(x, self.self_attn(self.self_norm(x), causal=True, past=past), p, train)
            x = _residual(x, self.cross_attn(self.cross_norm(x), cross_kv, cross_mask), p, train)
            return _residual(x, self.ffn(self.ffn_norm(x)), p, train)
        x = self.self_norm(_residual(x, self.self_attn(x, causal=True, past=past), p, train))
        x = self.cross_norm(_residual(x, self.cross_attn(x, cross_kv, cross_mask), p, train))
        return self.ffn_norm(_residual(x, self.ffn(x), p, train))


# --------------------------------------------------------------------------- positions


def sinusoidal_positions(n: int, d: int) -> Tensor:
    """(n, d) table: even dims sin(pos / 10000^(2i/d)), odd dims cos of the same (Vaswani 2017)."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]  # (n, 1)
    freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))  # (ceil(d/2),)
    table = torch.zeros(n, d)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: d // 2])
    return table


def key_padding_mask(pad: Tensor) -> Tensor | None:
    """(B, S) bool, True at PAD -> (B, 1, 1, S) bool for sdpa, True = may attend.

    None when nothing is padded, so sdpa runs without a mask (checked on CPU only: on a
    GPU the check would wait for the device). A row that is all padding would be
    fully masked, which makes sdpa return NaN; it attends to its pads instead (its
    output is meaningless either way, but finite).
    """
    if pad.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(pad.any()):
        return None  # (compiled, a mask is always built: reading pad.any() would break the graph)
    keep = ~pad
    keep |= ~keep.any(dim=1, keepdim=True)
    return keep[:, None, None, :]


# --------------------------------------------------------------------------- encoder output and cache


@dataclass
class Memory:
    """What the decoder needs from the encoder."""

    out: Tensor  # (B, S, d) encoder output (after the final norm when pre-norm)
    src_pad: Tensor  # (B, S) bool, True at PAD

    def index_select(self, index: Tensor) -> Memory:
        """Keep/repeat/reorder sentences: row i of the result is row index[i]."""
        return Memory(self.out.index_select(0, index), self.src_pad.index_select(0, index))


def _move_rows(t: Tensor, dst: Tensor, src: Tensor, n: int) -> Tensor:
    """t[:n] with row dst[i] set to row src[i], in place (a view of t's memory)."""
    return t[:n].index_copy_(0, dst, t.index_select(0, src))


class SelfKV:
    """One decoder layer's self-attention keys and values for the target tokens decoded so far:
    `view()` gives them as (N, H, length, hd), what attention reads.

    Two layouts of the same buffers, chosen at the first step (`_POSITIONS_OUTER`):

    * rows outer, (N, H, capacity, hd), on GPUs and non-Intel CPUs. Attention reads whole
      buffers: never longer than the positions held, as batched matmuls over a strided view of a
      longer buffer were 4x slower on a CPU (beam 5, 150 sentences). A step that does not fit
      moves everything into a buffer of the new length (what torch.cat did at every step).
    * positions outer, (capacity, N, H, hd), on Intel CPUs: a step writes one contiguous slab
      in place and the buffers keep `_SPARE` free positions, so greedy search copies the past
      every few steps instead of at every step; attention reads strided views, about as fast
      as whole buffers there (MKL). On a Xeon (AMX), one thread, median of 5 interleaved runs:
      greedy 5% faster than rows outer (600 sentences), beam 5 3% (250 sentences), outputs
      identical. Not measured on other CPUs, hence not used there.

    Reordering rows (beam reselection) gathers them into new buffers with room for one more
    position, which the next step fills in place: beam search, which reorders at every step,
    copies the past once per step. Dropping rows (greedy search's finished sentences) moves the
    last rows into their places (`move`), copying those few rows only.
    """

    def __init__(self) -> None:
        self.length = 0  # positions held
        self._kv: KV | None = None  # keys and values in the layout below
        self._outer = False  # positions outer: (capacity, N, H, hd); else (N, H, capacity, hd)

    @property
    def _dims(self) -> tuple[int, int]:
        """The buffers' dimensions of positions and of rows."""
        return (0, 1) if self._outer else (2, 0)

    def _stored(self, x: Tensor) -> Tensor:
        """(N, H, T, hd) -> the buffers' layout (a view)."""
        return x.permute(2, 0, 1, 3) if self._outer else x

    def view(self) -> KV:
        """The keys and values held, each (N, H, length, hd) (views of the buffers)."""
        assert self._kv is not None, "nothing decoded yet"
        k, v = (buf.narrow(self._dims[0], 0, self.length) for buf in self._kv)
        return (k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)) if self._outer else (k, v)

    def _new_buffers(self, rows: int, capacity: int, like: Tensor) -> KV:
        """Empty keys and values of `rows` rows and `capacity` positions in this layout; `like`,
        (N, H, T, hd), gives the heads, head width, dtype and device."""
        _, H, _, hd = like.shape
        shape = (capacity, rows, H, hd) if self._outer else (rows, H, capacity, hd)
        return like.new_empty(shape), like.new_empty(shape)

    def append(self, k: Tensor, v: Tensor) -> KV:
        """Write (N, H, T, hd) new keys and values after the held ones -> all of them, each
        (N, H, length, hd)."""
        L, T = self.length, k.size(2)
        if self._kv is None:
            self._outer = _POSITIONS_OUTER and k.device.type == "cpu"
        p, spare = self._dims[0], (_SPARE if self._outer else 0)
        if self._kv is None:
            self._kv = self._new_buffers(k.size(0), T + spare, k)
        elif L + T > self._kv[0].size(p):
            held = self.view()
            self._kv = self._new_buffers(k.size(0), L + T + spare, k)
            for buf, old in zip(self._kv, held, strict=True):
                buf.narrow(p, 0, L).copy_(self._stored(old))
        for buf, new in zip(self._kv, (k, v), strict=True):
            buf.narrow(p, L, T).copy_(self._stored(new))
        self.length = L + T
        return self.view()

    def reorder(self, index: Tensor) -> None:
        """Row i continues what row index[i] was."""
        if self._kv is None:
            return
        L, (p, r) = self.length, self._dims
        gathered = self._new_buffers(index.numel(), L + 1, self.view()[0])
        for buf, out in zip(self._kv, gathered, strict=True):
            torch.index_select(buf.narrow(p, 0, L), r, index, out=out.narrow(p, 0, L))
        self._kv = gathered

    def move(self, dst: Tensor, src: Tensor, n: int) -> None:
        """Keep rows 0 .. n-1, row dst[i] becoming what row src[i] (>= n) was: dropping rows
        by moving the last ones into their places copies those, not every row kept."""
        if self._kv is None:
            return
        k, v = self._kv
        if self._outer:  # rows are the second dimension: index there (index_select would copy all)
            L = self.length
            k[:L, dst], v[:L, dst] = k[:L, src], v[:L, src]
            self._kv = (k[:, :n], v[:, :n])
        else:
            self._kv = (_move_rows(k, dst, src, n), _move_rows(v, dst, src, n))


class DecoderCache:
    """State of incremental decoding: everything the decoder computed for earlier steps.

    `self_kv[i]`: layer i's self-attention keys and values for the `length` target
    tokens decoded so far, (N, ...) one row per decoder row (see SelfKV).
    `cross_kv[i]`: layer i's cross-attention keys and values of the source, each
    (N / group, H, S, hd): one row per `group` consecutive decoder rows (the
    hypotheses of one sentence); computed from the Memory on the first decode call,
    after which the Memory is not read again. `cross_mask`: (N / group, 1, 1, S).
    """

    def __init__(self) -> None:
        self.self_kv: list[SelfKV] = []
        self.cross_kv: list[KV] = []
        self.cross_mask: Tensor | None = None
        self.group = 1

    @property
    def started(self) -> bool:
        return bool(self.cross_kv)

    @property
    def length(self) -> int:
        """Target tokens decoded so far."""
        return self.self_kv[0].length if self.self_kv else 0

    @torch.no_grad()
    def reorder(self, index: Tensor, within: int | None = None) -> None:
        """Make decoder row i continue what row index[i] was (beam reselection; dropping rows).

        A caller that knows how the new rows map onto the cross-attention entries says so, and
        nothing is read back from the device (a wait on a GPU): `within=g`, each block of g new
        rows continues rows of the entry in its place, the entries unchanged. Beam search knows:
        a sentence's hypotheses extend its own (it drops sentences with `move_entries`).

        Every stored tensor is index-selected along the batch dimension. The
        per-sentence cross-attention entries follow along and stay shared when each
        block of new rows comes from a single entry: blocks of the old group size
        (beam search reselecting within a sentence, dropping whole sentences), or,
        when every entry's rows are repeated in place, blocks that many times larger
        (one row per sentence becoming `beam` rows). They are not copied at all when
        the entries stay the same. Otherwise each row gets its own entry (group 1).
        """
        for kv in self.self_kv:
            kv.reorder(index)
        if not self.cross_kv:
            return
        if within is not None:
            self.group = within
            return
        n_old, g_old = self.cross_kv[0][0].size(0), self.group
        src = index // g_old  # old cross entry of each new row
        self.group = 1
        for g in (g_old, index.numel() // n_old):
            if g > 1 and index.numel() % g == 0:
                by_block = src.view(-1, g)
                if bool((by_block == by_block[:, :1]).all()):
                    src, self.group = by_block[:, 0], g
                    break
        if src.numel() == n_old and bool((src == torch.arange(n_old, device=src.device)).all()):
            return  # the same entries in the same order: nothing to copy
        self._select_entries(src)

    @torch.no_grad()
    def move_rows(self, dst: Tensor, src: Tensor, n: int) -> None:
        """Keep decoder rows 0 .. n-1, row dst[i] continuing what row src[i] (>= n) was: rows
        dropped by moving the last ones into their places (see SelfKV.move). The same as
        `reorder` with the index those moves make, at the cost of the moved rows alone."""
        for kv in self.self_kv:
            kv.move(dst, src, n)

    @torch.no_grad()
    def move_entries(self, dst: Tensor, src: Tensor, n: int) -> None:
        """`move_rows` for the cross-attention entries (one per sentence): entry dst[i]
        becomes what entry src[i] was, entries from n on are dropped."""
        self.cross_kv = [(_move_rows(k, dst, src, n), _move_rows(v, dst, src, n)) for k, v in self.cross_kv]
        if self.cross_mask is not None:
            self.cross_mask = _move_rows(self.cross_mask, dst, src, n)

    def _select_entries(self, src: Tensor) -> None:
        """Keep/repeat/reorder the cross-attention entries: entry i becomes entry src[i]."""
        self.cross_kv = [(k.index_select(0, src), v.index_select(0, src)) for k, v in self.cross_kv]
        if self.cross_mask is not None:
            self.cross_mask = self.cross_mask.index_select(0, src)


# --------------------------------------------------------------------------- model


class Transformer(nn.Module):
    """Encoder-decoder Transformer. `forward(src, tgt_in)` is the training path."""

    pos_table: Tensor  # the buffer of sinusoidal positions, registered when positions are not learned

    def __init__(self, cfg: ModelConfig, src_vocab: int, tgt_vocab: int) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.d_model = d
        self.embed_scale = math.sqrt(d)
        self.dropout = cfg.dropout

        # Embeddings. Tying: one matrix for source, target and output projection when
        # the vocabularies are one (joint SentencePiece); else target and output only.
        self.tgt_embed = nn.Embedding(tgt_vocab, d, padding_idx=PAD)
        self.src_embed = nn.Embedding(src_vocab, d, padding_idx=PAD)
        self.out_proj = Linear(d, tgt_vocab, bias=False)
        if cfg.tie_embeddings:
            self.out_proj.weight = self.tgt_embed.weight
            if src_vocab == tgt_vocab:
                self.src_embed.weight = self.tgt_embed.weight
        if cfg.learned_positions:
            self.pos_embed: nn.Embedding | None = nn.Embedding(cfg.max_positions, d)
        else:
            self.pos_embed = None
            # Not a parameter and not saved: it is a function of the config.
            self.register_buffer("pos_table", sinusoidal_positions(cfg.max_positions, d), persistent=False)

        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers or cfg.layers))
        # Pre-norm leaves the residual stream un-normalised; post-norm ends in a norm already.
        self.enc_norm = nn.LayerNorm(d) if cfg.pre_norm else nn.Identity()
        self.dec_norm = nn.LayerNorm(d) if cfg.pre_norm else nn.Identity()
        self._init_weights(cfg.tie_embeddings)

    def _init_weights(self, tied: bool) -> None:
        # fairseq-style: xavier-uniform for projections, N(0, d^-0.5) for embeddings so that
        # embedding * sqrt(d) has unit variance, PAD row zero. An untied output projection is an
        # embedding matrix in all but name and gets the same init, so logits start at the same
        # scale whether tied or not.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        std = self.d_model**-0.5
        with torch.no_grad():
            for emb in (self.src_embed, self.tgt_embed):
                nn.init.normal_(emb.weight, 0.0, std)
                emb.weight[PAD].zero_()
            if not tied:
                nn.init.normal_(self.out_proj.weight, 0.0, std)
            if self.pos_embed is not None:
                nn.init.normal_(self.pos_embed.weight, 0.0, std)

    def _embed(self, embed: nn.Embedding, tokens: Tensor, start: int) -> Tensor:
        """(B, T) ids at positions start .. start+T-1 -> (B, T, d)."""
        T = tokens.size(1)
        if start + T > self.cfg.max_positions:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_positions={self.cfg.max_positions}")
        if self.pos_embed is not None:
            pos = self.pos_embed.weight[start : start + T]  # (T, d)
        else:
            pos = self.pos_table[start : start + T]
        x = torch.add(pos, embed(tokens), alpha=self.embed_scale)  # pos + sqrt(d) * emb, one kernel
        return _dropout(x, self.dropout, self.training)

    def encode(self, src: Tensor) -> Memory:
        """(B, S) source ids (right-padded with PAD) -> Memory with out (B, S, d)."""
        src_pad = src.eq(PAD)  # (B, S)
        mask = key_padding_mask(src_pad)  # (B, 1, 1, S) or None
        x = self._embed(self.src_embed, src, 0)
        for layer in self.encoder:
            x = layer(x, mask)
        return Memory(self.enc_norm(x), src_pad)

    def new_cache(self) -> DecoderCache:
        return DecoderCache()

    def decode(self, tgt: Tensor, memory: Memory, cache: DecoderCache | None = None) -> Tensor:
        """Target ids -> next-token logits (N, T, V).

        Without a cache, `tgt` (N, T) is the whole (teacher-forced) decoder input and
        attention is causal. With a cache, `tgt` holds only the new tokens, at
        positions cache.length .. cache.length + T - 1, and the cache is updated.
        N may be a multiple g of the batch B of `memory`: rows b*g .. b*g+g-1 then
        belong to source sentence b (e.g. its beam hypotheses).
        """
        N, T = tgt.shape
        start = cache.length if cache is not None else 0
        x = self._embed(self.tgt_embed, tgt, start)  # (N, T, d)

        if cache is not None and cache.started:
            cross_kv, cross_mask = cache.cross_kv, cache.cross_mask
        else:
            B = memory.out.size(0)
            if N % B:
                raise ValueError(f"{N} target rows cannot be grouped over {B} source sentences")
            cross_kv = [cast(DecoderLayer, layer).cross_attn.project_kv(memory.out) for layer in self.decoder]
            cross_mask = key_padding_mask(memory.src_pad)
            if cache is not None:
                cache.cross_kv, cache.cross_mask, cache.group = cross_kv, cross_mask, N // B

        if cache is not None and not cache.self_kv:
            cache.self_kv = [SelfKV() for _ in self.decoder]
        for i, layer in enumerate(self.decoder):
            x = layer(x, cross_kv[i], cross_mask, cache.self_kv[i] if cache is not None else None)
        return self.out_proj(self.dec_norm(x))  # (N, T, V)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """(B, S) source, (B, T) decoder input (BOS + target) -> logits (B, T, V)."""
        return self.decode(tgt_in, self.encode(src))
