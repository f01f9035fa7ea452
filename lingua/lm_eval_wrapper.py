"""An lm-evaluation-harness model (`lm_eval.api.model.LM`) around a lingua LM and tokenizer.

    lm = build_lm(model, tokenizer, GenerationArgs(), batch_size=8, max_length=2048)
    lm_eval.simple_evaluate(model=lm, tasks=[...])

- loglikelihood((context, continuation)): log p(continuation | bos + context) and whether greedy decoding
  reproduces it; context and continuation are tokenized separately (the continuation keeps its leading
  space), the row is left-truncated to max_length + 1 tokens.
- loglikelihood_rolling((text,)): log p(text | bos) over windows of max_length targets, each token scored
  once, each window with as much context as fits (the harness's definition).
- generate_until((context, gen_kwargs)): lingua.generation with the request's `until`, `max_gen_toks`,
  `temperature` / `do_sample`, `top_p`, `top_k` over the defaults of the given GenerationArgs.

Requests are processed in the order given, in fixed-size batches: every rank handed the same requests makes
the same model calls (what an FSDP model needs). lm_eval is imported only when `build_lm` is called.
"""

import dataclasses
import json
from typing import List, Optional

from lingua.generation import GenerationArgs, generate, token_logprobs

__all__ = ["build_lm", "rolling_windows"]

_CLASS = None


def rolling_windows(tokens: List[int], prefix: int, max_length: int):
    """[(row, n_scored)]: rows of at most max_length + 1 tokens over [prefix] + tokens whose last n_scored
    targets together cover every token exactly once, each with the longest context that fits."""
    stream = [prefix] + list(tokens)
    n = len(tokens)
    out = []
    first = 1
    while first <= n:
        last = min(first + max_length - 1, n)  # targets first..last (positions in stream)
        start = max(0, last - max_length)
        out.append((stream[start : last + 1], last - first + 1))
        first = last + 1
    return out


def _lm_class():
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    from lm_eval.api.model import LM

    class LinguaLM(LM):
        def __init__(self, model, tokenizer, gen_args: GenerationArgs, batch_size: int, max_length: int,
                     add_bos: bool = True):
            super().__init__()
            self.model = model
            self.tok = tokenizer
            self.gen_args = gen_args
            self.batch_size = batch_size
            self.max_length = max_length
            self.add_bos = add_bos

        # -- helpers ---------------------------------------------------------------------------------
        def _encode(self, text: str) -> List[int]:
            return self.tok.encode(text, add_bos=False, add_eos=False)

        def _score(self, rows_and_counts):
            """[(sum logprob of the last n targets, all greedy)] for [(row, n)]."""
            rows = [r for r, _ in rows_and_counts]
            scored = token_logprobs(self.model, rows, batch_size=self.batch_size)
            out = []
            for (row, n), (logp, greedy) in zip(rows_and_counts, scored):
                n = min(n, len(row) - 1)
                out.append((float(logp[len(logp) - n :].sum()) if n else 0.0, bool(greedy[len(greedy) - n :].all())))
            return out

        # -- the harness API -------------------------------------------------------------------------
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            batch = []
            for req in requests:
                context, continuation = req.args
                ctx = ([self.tok.bos_id] if self.add_bos or not context else []) + self._encode(context)
                cont = self._encode(continuation)
                row = (ctx + cont)[-(self.max_length + 1) :]
                batch.append((row, len(cont)))
            out = self._score(batch)
            for req, res in zip(requests, out):
                self.cache_hook.add_partial("loglikelihood", req.args, res)
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            out = []
            for req in requests:
                (text,) = req.args
                windows = rolling_windows(self._encode(text), self.tok.bos_id, self.max_length)
                total = sum(s for s, _ in self._score(windows)) if windows else 0.0
                out.append(total)
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            return out

        def generate_until(self, requests, disable_tqdm: bool = False):
            out: List[Optional[str]] = [None] * len(requests)
            groups = {}
            for i, req in enumerate(requests):
                context, kwargs = req.args
                key = json.dumps(kwargs or {}, sort_keys=True, default=str)
                groups.setdefault(key, []).append(i)
            for key, idx in groups.items():
                args = self._gen_args(json.loads(key))
                texts = generate(self.model, self.tok, [requests[i].args[0] for i in idx], args, add_bos=self.add_bos)
                for i, t in zip(idx, texts):
                    out[i] = t
                    self.cache_hook.add_partial("generate_until", requests[i].args, t)
            return out

        def _gen_args(self, kwargs: dict) -> GenerationArgs:
            args = dataclasses.replace(self.gen_args)
            until = kwargs.get("until")
            if isinstance(until, str):
                until = [until]
            args.until = list(until) if until else list(self.gen_args.until)
            if "max_gen_toks" in kwargs:
                args.max_gen_len = int(kwargs["max_gen_toks"])
            if kwargs.get("do_sample") is False:
                args.temperature = 0.0
            elif "temperature" in kwargs:
                args.temperature = float(kwargs["temperature"])
            if kwargs.get("top_p") is not None:
                args.top_p = float(kwargs["top_p"])
            if kwargs.get("top_k") is not None:
                args.top_k = int(kwargs["top_k"])
            return args

        @property
        def tokenizer_name(self) -> str:
            return type(self.tok).__name__

    _CLASS = LinguaLM
    return _CLASS


def build_lm(model, tokenizer, gen_args: Optional[GenerationArgs] = None, batch_size: int = 8,
             max_length: Optional[int] = None, add_bos: bool = True):
    """An `lm_eval.api.model.LM` for a lingua model (needs `pip install lm-eval`)."""
    cls = _lm_class()
    max_length = min(max_length or model.args.max_seqlen, model.args.max_seqlen)
    return cls(model, tokenizer, gen_args or GenerationArgs(), batch_size, max_length, add_bos)
