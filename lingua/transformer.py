"""The language model: Llama-style blocks (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU) and
`LMTransformer` (token embeddings -> blocks -> norm -> output head), trained by apps.main.train.

Modules are built on the meta device and materialised after sharding; `init_weights(seed)` then fills
every parameter from a generator seeded by (seed, parameter name), on the full shape, and keeps this
rank's shard: the same seed gives the same weights whatever the world size.
"""

import hashlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lingua.args import Choice, ConfigError


class AttnImpl(Choice):
    sdpa = "sdpa"
    xformers = "xformers"
    auto = "auto"


class InitStdFactor(Choice):
    disabled = "disabled"
    current_depth = "current_depth"


@dataclass
class BaseTransformerArgs:
    dim: int = 512  # model width
    n_layers: int = 8  # transformer blocks
    head_dim: Optional[int] = None  # per-head width; default dim // n_heads
    n_heads: Optional[int] = None  # attention heads; default dim // head_dim
    n_kv_heads: Optional[int] = None  # key/value heads for grouped-query attention; default n_heads
    ffn_dim_multiplier: Optional[float] = None  # scales the SwiGLU hidden size (Llama's convention)
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # rotary embedding base
    max_seqlen: int = 1024  # longest sequence the rotary table covers
    init_base_std: Optional[float] = None  # std of weight init; default dim ** -0.5
    init_std_factor: InitStdFactor = InitStdFactor.disabled  # disabled | current_depth: depth-scaled output projections
    attn_impl: AttnImpl = AttnImpl.sdpa  # sdpa (torch scaled_dot_product_attention) | xformers (CUDA + xformers) | auto

    def validate(self):
        if self.n_heads is None and self.head_dim is None:
            raise ConfigError("set model.n_heads or model.head_dim")
        n_heads = self.n_heads or self.dim // self.head_dim
        head_dim = self.head_dim or self.dim // n_heads
        if n_heads * head_dim != self.dim:
            raise ConfigError(f"model.dim ({self.dim}) must equal n_heads ({n_heads}) x head_dim ({head_dim})")
        if head_dim % 2:
            raise ConfigError(f"model head_dim ({head_dim}) must be even for rotary embeddings")
        if self.n_kv_heads is not None and n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_heads ({n_heads}) must be a multiple of model.n_kv_heads ({self.n_kv_heads})")

    @property
    def heads(self) -> tuple:
        n_heads = self.n_heads or self.dim // self.head_dim
        return n_heads, self.head_dim or self.dim // n_heads, self.n_kv_heads or n_heads


def param_generator(seed: int, name: str, device) -> torch.Generator:
    """A generator that depends only on the seed and the parameter's name."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def init_param_(param: torch.Tensor, name: str, seed: int, std: float, kind: str = "trunc_normal") -> None:
    """Fill `param` (a plain tensor or a DTensor shard) from the full-shape tensor seeded by name."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full_shape = param.shape  # a DTensor reports its global shape
    device = param.to_local().device if isinstance(param, DTensor) else param.device
    with torch.no_grad():
        full = torch.empty(full_shape, dtype=torch.float32, device=device)
        if kind == "ones":
            full.fill_(1.0)
        else:
            g = param_generator(seed, name, device)
            nn.init.trunc_normal_(full, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=g)
        if isinstance(param, DTensor):
            # Every rank built the same full tensor: keep the local shard, no communication.
            full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.copy_(full.to(param.dtype))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).type_as(x)


def rope_tables(head_dim: int, max_seqlen: int, theta: float, device=None) -> torch.Tensor:
    """cos and sin tables, shape [2, max_seqlen, head_dim // 2] (real tensors: no complex dtype under FSDP)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seqlen, device=device, dtype=torch.float32), freqs)
    return torch.stack([angles.cos(), angles.sin()])


def apply_rope(x: torch.Tensor, tables: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x [B, S, H, D] by position-dependent angles."""
    seqlen = x.shape[1]
    cos = tables[0, start : start + seqlen][None, :, None, :]
    sin = tables[1, start : start + seqlen][None, :, None, :]
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
    return out.type_as(x)


def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, head_dim: int, n_kv_heads: int, attn_impl: str = "sdpa"):
        super().__init__()
        self.n_heads, self.head_dim, self.n_kv_heads = n_heads, head_dim, n_kv_heads
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.attn_impl = attn_impl

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache=None, start: int = 0) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, rope, start), apply_rope(k, rope, start)
        if cache is not None:  # generation: append to the key/value cache, attend over everything so far
            k, v = cache.update(k, v, start)
        use_xformers = self.attn_impl == "xformers" or (self.attn_impl == "auto" and xformers_available())
        if use_xformers and cache is None and x.is_cuda:
            import xformers.ops as xops

            rep = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(rep, dim=2)
            v = v.repeat_interleave(rep, dim=2)
            out = xops.memory_efficient_attention(q, k, v, attn_bias=xops.LowerTriangularMask())
        else:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            if self.n_kv_heads != self.n_heads:
                rep = self.n_heads // self.n_kv_heads
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
            if cache is None or seqlen == k.shape[2]:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:  # new tokens attend to every cached position and causally among themselves
                total = k.shape[2]
                mask = torch.ones(seqlen, total, dtype=torch.bool, device=x.device).tril(total - seqlen)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            out = out.transpose(1, 2)
        return self.wo(out.reshape(bsz, seqlen, -1))


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """SwiGLU hidden size (Llama's rule): 2/3 of 4 * dim, times ffn_dim_multiplier, rounded up to multiple_of."""
    hidden_dim = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden_dim = int(ffn_dim_multiplier * hidden_dim)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


class FeedForward(nn.Module):
    def __init__(self, dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]):
        super().__init__()
        hidden_dim = ffn_hidden_dim(dim, multiple_of, ffn_dim_multiplier)
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: BaseTransformerArgs):
        super().__init__()
        n_heads, head_dim, n_kv_heads = args.heads
        self.attention = Attention(args.dim, n_heads, head_dim, n_kv_heads, args.attn_impl)
        self.feed_forward = FeedForward(args.dim, args.multiple_of, args.ffn_dim_multiplier)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rope, cache=None, start: int = 0):
        h = x + self.attention(self.attention_norm(x), rope, cache, start)
        return h + self.feed_forward(self.ffn_norm(h))


class BaseTransformer(nn.Module):
    """A stack of blocks with a shared rotary table (a non-persistent buffer, rebuilt by init_weights)."""

    def __init__(self, args: BaseTransformerArgs):
        super().__init__()
        self.args = args
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        _, head_dim, _ = args.heads
        self.register_buffer("rope", rope_tables(head_dim, args.max_seqlen, args.rope_theta), persistent=False)

    def forward(self, h: torch.Tensor, caches=None, start: int = 0) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            h = layer(h, self.rope, None if caches is None else caches[i], start)
        return h

    def init_std(self, name: str) -> float:
        base = self.args.init_base_std or self.args.dim ** -0.5
        if self.args.init_std_factor == "current_depth" and (name.endswith("wo.weight") or name.endswith("w2.weight")):
            depth = int(name.split("layers.")[1].split(".")[0]) + 1
            return base / math.sqrt(2 * depth)
        return base

    def init_buffers(self) -> None:
        """Rebuild the non-persistent buffers (the rotary table) on their device: enough before loading every
        parameter from a checkpoint, where init_weights would be wasted work."""
        _, head_dim, _ = self.args.heads
        self.rope = rope_tables(head_dim, self.args.max_seqlen, self.args.rope_theta, device=self.rope.device)

    def init_weights(self, seed: int) -> None:
        """Deterministic init from (seed, parameter name), independent of the sharding."""
        self.init_buffers()
        for name, param in self.named_parameters():
            clean = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
            kind = "ones" if clean.endswith("norm.weight") else "trunc_normal"
            init_param_(param, clean, seed, self.init_std(clean), kind)


# ------------------------------------------------------------------------------------------ the LM


@dataclass
class LMTransformerArgs(BaseTransformerArgs):
    vocab_size: int = -1  # -1: take it from the tokenizer
    weight_tying: bool = False  # share the embedding and output matrices
    seed: int = 42  # seed of init_weights (same seed -> same weights at any world size)


class LMTransformer(BaseTransformer):
    def __init__(self, args: LMTransformerArgs):
        super().__init__(args)
        assert args.vocab_size > 0, "vocab_size must be resolved before building the model"
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.weight_tying:
            self.output.weight = self.tok_embeddings.weight

    def forward(
        self,
        tokens: torch.Tensor,
        target: Optional[torch.Tensor] = None,
        caches=None,
        start: int = 0,
    ) -> torch.Tensor:
        """Logits [B, S, V], or the mean cross-entropy loss when `target` is given."""
        h = super().forward(self.tok_embeddings(tokens), caches, start)
        logits = self.output(self.norm(h))
        if target is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(0, 1))

    def init_weights(self, seed: Optional[int] = None) -> None:
        super().init_weights(self.args.seed if seed is None else seed)


def num_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    n = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        n -= model.tok_embeddings.weight.numel()
    return n


def flops_per_token(args: LMTransformerArgs, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus attention (Chinchilla-style estimate)."""
    n_heads, head_dim, _ = args.heads
    return 6 * n_params + 6 * args.n_layers * seq_len * n_heads * head_dim


def build_model(margs: LMTransformerArgs, dist_state, dist_args, init: bool = False) -> LMTransformer:
    """The model built on the meta device, sharded (FSDP2, lingua.distributed.parallelize_model), then materialised
    on this rank's device. init=False builds only the buffers: for a model whose every parameter is loaded next."""
    from lingua.distributed import parallelize_model

    with torch.device("meta"):
        model = LMTransformer(margs)
    model = parallelize_model(model, dist_state.mesh, dist_args)
    model.to_empty(device=dist_state.device)
    if init:
        model.init_weights()
    else:
        model.init_buffers()
    return model
