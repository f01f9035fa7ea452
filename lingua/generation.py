"""Text generation and scoring for a causal LM: a key/value cache, sampling (temperature, top-k, top-p),
batched generation, and log-likelihoods of token sequences.

The model is any module called as `model(tokens [B, S]) -> logits [B, S, V]` that also accepts
`model(tokens, caches=[one cache per layer], start=<position of tokens[:, 0]>)` (lingua.transformer's
LMTransformer does). It may be an FSDP model: then every rank of its mesh must make the same calls in the
same order. Everything here is deterministic given the inputs, so ranks that are handed the same prompts
make the same calls (sampling uses a private torch.Generator seeded from `GenerationArgs.seed`, never the
global RNG).

Batched generation follows the original Llama recipe: prompts of a batch are right-aligned to nothing (no
padding in front), decoding starts at the shortest prompt, and for a row whose prompt is longer the prompt's
own token replaces the sampled one until its prompt is used up. Every row thus sees exactly its tokens at
their own positions, with no attention mask beyond the causal one.
"""

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from lingua.args import ConfigError

__all__ = ["GenerationArgs", "KVCache", "sample_tokens", "generate_tokens", "generate", "token_logprobs"]


@dataclass
class GenerationArgs:
    max_gen_len: int = 64  # at most this many new tokens per prompt
    temperature: float = 0.0  # 0 = greedy; > 0 samples from softmax(logits / temperature)
    top_p: Optional[float] = None  # nucleus sampling: keep the smallest set of tokens with probability >= top_p
    top_k: Optional[int] = None  # keep the k most likely tokens (applied before top_p)
    max_prompt_len: Optional[int] = None  # keep at most the last this many prompt tokens; default: what fits
    until: List[str] = field(default_factory=list)  # stop a row when its text contains one of these (cut there)
    stop_at_eos: bool = True  # stop a row when it samples the tokenizer's eos
    use_cache: bool = True  # KV cache (False recomputes the whole prefix at every step: for tests / debugging)
    batch_size: int = 8  # prompts decoded together
    seed: int = 0  # seed of the sampling generator (the same seed gives the same samples)

    def validate(self, prefix: str = "generator"):
        if self.max_gen_len < 0:
            raise ConfigError(f"{prefix}.max_gen_len must be >= 0, got {self.max_gen_len}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ConfigError(f"{prefix}.temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"{prefix}.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"{prefix}.top_k must be >= 1, got {self.top_k}")
        if self.batch_size < 1:
            raise ConfigError(f"{prefix}.batch_size must be >= 1, got {self.batch_size}")
        if self.max_prompt_len is not None and self.max_prompt_len < 1:
            raise ConfigError(f"{prefix}.max_prompt_len must be >= 1, got {self.max_prompt_len}")


class KVCache:
    """Keys and values of one attention layer, [B, max_len, n_kv_heads, head_dim], allocated on first use
    with the dtype and device of the keys it receives."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int):
        """Store k, v [B, S, H, D] at positions start..start+S-1; return the keys/values of positions
        0..start+S-1 (what the new queries attend to)."""
        end = start + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions cannot hold position {end - 1}")
        if self.k is None or self.k.shape[0] != k.shape[0]:
            shape = (k.shape[0], self.max_len, k.shape[2], k.shape[3])
            self.k = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(shape, dtype=v.dtype, device=v.device)
        self.k[:, start:end] = k
        self.v[:, start:end] = v
        return self.k[:, :end], self.v[:, :end]


def sample_tokens(logits: torch.Tensor, temperature: float = 0.0, top_p: Optional[float] = None,
                  top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row of logits [B, V]: argmax when temperature == 0, otherwise a sample from the
    temperature-scaled distribution restricted to the top_k tokens and then to the top_p nucleus."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_k is not None and top_k < probs.shape[-1]:
        kth = torch.topk(probs, top_k, dim=-1).values[..., -1:]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if top_p is not None and top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the strictly more likely tokens
        sorted_p = torch.where(before < top_p * sorted_p.sum(-1, keepdim=True), sorted_p, torch.zeros_like(sorted_p))
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def _model_args(model):
    args = getattr(model, "args", None)
    if args is None or not hasattr(args, "heads"):
        raise TypeError("generation needs a model with `.args` (a BaseTransformerArgs) and `.layers`")
    return args


def _lockstep_group(model):
    """The process group whose ranks must make identical calls (an FSDP model sharded over the world), or None.
    Sampled tokens are broadcast from rank 0 over it, so that every rank stops at the same step even if
    logits differed in the last bit between devices."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    p = next(model.parameters())
    return dist.group.WORLD if hasattr(p, "device_mesh") else None


def _device_of(model) -> torch.device:
    p = next(model.parameters())
    return p.to_local().device if hasattr(p, "to_local") else p.device


@torch.no_grad()
def generate_tokens(model, prompts: Sequence[Sequence[int]], args: GenerationArgs, eos_id: Optional[int] = None,
                    decode=None) -> List[List[int]]:
    """New tokens for each prompt (token ids), decoded in batches of args.batch_size. `decode` (ids -> str) is
    needed for `args.until`. Rows stop at eos (kept out of the output), at a stop string, after max_gen_len
    tokens, or at the model's max_seqlen."""
    if args.until and decode is None:
        raise ValueError("GenerationArgs.until needs a decode function")
    margs = _model_args(model)
    max_seqlen = margs.max_seqlen
    device = _device_of(model)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(args.seed))
    outputs: List[List[int]] = []
    for b in range(0, len(prompts), args.batch_size):
        batch = [list(p) for p in prompts[b : b + args.batch_size]]
        outputs.extend(_generate_batch(model, batch, args, eos_id, decode, max_seqlen, device, gen))
    return outputs


def _generate_batch(model, prompts, args, eos_id, decode, max_seqlen, device, gen) -> List[List[int]]:
    # Room for at least one new token: keep the last tokens of a prompt that is too long.
    limit = max(1, max_seqlen - max(args.max_gen_len, 1))
    if args.max_prompt_len is not None:
        limit = min(limit, args.max_prompt_len)
    prompts = [p[-limit:] if len(p) > limit else p for p in prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: encode prompts with a bos token (or give at least one token)")
    bsz = len(prompts)
    lens = [len(p) for p in prompts]
    total = min(max_seqlen, max(lens) + args.max_gen_len)
    if args.max_gen_len == 0:
        return [[] for _ in prompts]
    tokens = torch.full((bsz, total), -1, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
    is_prompt = tokens >= 0
    caches = [KVCache(total) for _ in range(len(model.layers))] if args.use_cache else None
    group = _lockstep_group(model)
    stopped = [False] * bsz
    prev = 0
    for cur in range(min(lens), total):
        if caches is not None:
            logits = model(tokens[:, prev:cur], caches=caches, start=prev)[:, -1]
        else:
            logits = model(tokens[:, :cur])[:, -1]
        nxt = sample_tokens(logits, args.temperature, args.top_p, args.top_k, gen)
        if group is not None:
            torch.distributed.broadcast(nxt, src=0, group=group)
        nxt = torch.where(is_prompt[:, cur], tokens[:, cur], nxt)
        tokens[:, cur] = nxt
        prev = cur
        for i in range(bsz):
            if stopped[i] or cur < lens[i]:
                continue
            new = tokens[i, lens[i] : cur + 1].tolist()
            if (args.stop_at_eos and eos_id is not None and new[-1] == eos_id) or len(new) >= args.max_gen_len:
                stopped[i] = True
            elif args.until and any(s in decode(new) for s in args.until):
                stopped[i] = True
        if all(stopped):
            break
    out = []
    for i in range(bsz):
        new = [t for t in tokens[i, lens[i] :].tolist() if t >= 0][: args.max_gen_len]
        if args.stop_at_eos and eos_id is not None and eos_id in new:
            new = new[: new.index(eos_id)]
        out.append(new)
    return out


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """`text` up to (not including) the first occurrence of any stop string."""
    cut = len(text)
    for s in until:
        if s:
            i = text.find(s)
            if i >= 0:
                cut = min(cut, i)
    return text[:cut]


def generate(model, tokenizer, prompts: Sequence[str], args: GenerationArgs, add_bos: bool = True) -> List[str]:
    """Generated text for each prompt (the continuation only), cut at args.until."""
    ids = [tokenizer.encode(p, add_bos=add_bos, add_eos=False) for p in prompts]
    new = generate_tokens(model, ids, args, eos_id=tokenizer.eos_id, decode=tokenizer.decode)
    return [cut_at_stop(tokenizer.decode(t), args.until) for t in new]


@torch.no_grad()
def token_logprobs(model, rows: Sequence[Sequence[int]], batch_size: int = 8):
    """For each row of token ids t_0..t_n: (log p(t_i | t_<i) for i = 1..n, is_greedy_i for i = 1..n), as
    float64 / bool CPU tensors. Rows longer than the model's max_seqlen + 1 are an error (chunk them first).
    Rows are batched in the order given (padding on the right does not change causal logits)."""
    margs = _model_args(model)
    device = _device_of(model)
    results = []
    for b in range(0, len(rows), batch_size):
        batch = [list(r) for r in rows[b : b + batch_size]]
        longest = max(len(r) for r in batch)
        if longest - 1 > margs.max_seqlen:
            raise ValueError(f"a row of {longest} tokens exceeds the model's max_seqlen + 1 = {margs.max_seqlen + 1}")
        if longest < 2:
            results.extend((torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool)) for _ in batch)
            continue
        x = torch.zeros((len(batch), longest - 1), dtype=torch.long)
        y = torch.zeros((len(batch), longest - 1), dtype=torch.long)
        for i, r in enumerate(batch):
            t = torch.tensor(r, dtype=torch.long)
            x[i, : len(r) - 1] = t[:-1]
            y[i, : len(r) - 1] = t[1:]
        logits = model(x.to(device)).float()
        logp = F.log_softmax(logits, dim=-1)
        picked = logp.gather(-1, y.to(device).unsqueeze(-1)).squeeze(-1).double().cpu()
        greedy = (logits.argmax(-1).cpu() == y)
        for i, r in enumerate(batch):
            n = len(r) - 1
            results.append((picked[i, :n], greedy[i, :n]))
    return results
