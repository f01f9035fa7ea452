"""The language model trained by apps.main.train: token embeddings -> blocks -> norm -> output head."""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lingua.transformer import BaseTransformer, BaseTransformerArgs, RMSNorm


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
