"""Data loader benchmark: throughput and the cost of resuming.

    python -m apps.bench.data_bench [--root-dir data/default] [--seconds 3] [--out data_bench.json] [--quick]

For the `bytes` and `sp` tokenizers (a sentencepiece model is trained on the corpus unless --sp-model is
given), with the loader process on (data.load_async=true):
  - batches/s and tokens/s seen by a consumer that takes batches as fast as it can (the synchronous
    pipeline, in the same process, is the baseline);
  - time to the first batch after resuming from the state of batch 1 and from the state of a batch deep into
    the data (several passes over every file, by default). Resuming seeks (byte offsets) and re-reads at most
    one shuffle block, so the deep / shallow ratio stays near 1 however deep the run is; the time it would take
    to replay the stream up to the deep batch is shown for comparison.
Bytes tokenizer, loader process on, also:
  - elastic resume: the first batch of one rank resuming from states resharded off a 2-rank run (2 -> 1 ranks,
    the same global batch), against one resuming the 1-rank run's own state at the same data position;
  - data.trace=true: loader tokens/s with the trace on against off.
Batch shape: --batch-size x --seq-len (default 8 x 512, prefetch_size 16). Results go to stdout as a table
and, with --out, to a JSON file. Also runs as a part of the benchmark runner (`run(ctx)`, `rows(res)`).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Optional

from apps.bench import common
from lingua.data import DataArgs, build_dataloader, data_metrics, init_dataloader_state
from lingua.tokenizer import TokenizerArgs

PART = "data"
RESUME_TARGET = "<= 1.5"  # deep / shallow time to first batch after resume
ELASTIC_TARGET = "<= 1.5"  # resharded / same-layout time to first batch after resume
TRACE_TARGET = ">= 0.95"  # loader tokens/s with data.trace=true / with it off


def _args(root: str, sources: dict, tok: TokenizerArgs, bs: int, seq_len: int, load_async: bool,
          trace: bool = False) -> DataArgs:
    return DataArgs(root_dir=root, sources=dict(sources), batch_size=bs, seq_len=seq_len, prefetch_size=16,
                    load_async=load_async, tokenizer=tok, trace=trace)


def throughput(args: DataArgs, seconds: float) -> dict:
    """Batches/s and tokens/s of a consumer that only takes batches (the first batch is not timed)."""
    state = init_dataloader_state(args, 0, 1)
    t0 = time.perf_counter()
    with build_dataloader(args, state) as it:
        next(it)
        first = time.perf_counter() - t0
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            next(it)
            n += 1
        dt = time.perf_counter() - start
    return {"batches_per_s": n / dt, "tokens_per_s": n * args.batch_size * args.seq_len / dt, "first_batch_s": first}


def state_at(args: DataArgs, k: int, rank: int = 0, world: int = 1, acc: int = 1) -> tuple:
    """The state after step k (k >= 1) of a rank, and the seconds it took to replay the stream up to it."""
    sync = DataArgs(**{**args.__dict__, "load_async": False})
    t0 = time.perf_counter()
    with build_dataloader(sync, init_dataloader_state(sync, rank, world, acc), grad_acc_steps=acc) as it:
        state = None
        for _ in range(k * acc):
            state = next(it).state or state  # the state comes with a step's last micro-batch
    return json.loads(json.dumps(state)), time.perf_counter() - t0


def time_to_first_batch(args: DataArgs, state: dict, repeats: int, acc: int = 1) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with build_dataloader(args, state, grad_acc_steps=acc) as it:
            next(it)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def elastic(root: str, sources: dict, bs: int, seq_len: int, deep: int, repeats: int) -> dict:
    """First batch of 1 rank from states resharded off 2 ranks, against the 1-rank run's state at the same step."""
    from lingua.data import reshard_data_state

    a = _args(root, sources, TokenizerArgs("bytes"), bs, seq_len, True)
    two = [state_at(a, deep, r, 2, 1)[0] for r in range(2)]
    resharded = reshard_data_state(two, 0, 1)
    same, _ = state_at(a, deep, 0, 1, 2)
    t_re, t_same = [], []
    for _ in range(repeats):  # interleaved
        t_re.append(time_to_first_batch(a, resharded, 1, 2))
        t_same.append(time_to_first_batch(a, same, 1, 2))
    sync = DataArgs(**{**a.__dict__, "load_async": False})
    with build_dataloader(sync, resharded, grad_acc_steps=2) as x, build_dataloader(sync, same, grad_acc_steps=2) as y:
        same_batch = bool((next(x).tokens == next(y).tokens).all())  # both resume at the same data position
    return {"resharded_s": statistics.median(t_re), "same_layout_s": statistics.median(t_same),
            "ratio": statistics.median(t_re) / statistics.median(t_same), "step": deep, "same_batch": same_batch}


def trace_cost(root: str, sources: dict, bs: int, seq_len: int, seconds: float, repeats: int) -> dict:
    """Loader tokens/s with data.trace=true against off (bytes tokenizer, loader process), interleaved."""
    on, off = [], []
    for _ in range(repeats):
        off.append(throughput(_args(root, sources, TokenizerArgs("bytes"), bs, seq_len, True), seconds))
        on.append(throughput(_args(root, sources, TokenizerArgs("bytes"), bs, seq_len, True, True), seconds))
    ratio = statistics.median([x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(on, off)])
    return {"on_tokens_per_s": statistics.median(x["tokens_per_s"] for x in on),
            "off_tokens_per_s": statistics.median(x["tokens_per_s"] for x in off), "ratio": ratio}


def bench(root: str, sources: dict, sp_model: str, seconds: float, deep: int, repeats: int, bs: int, seq_len: int,
          say=print) -> dict:
    res = {"root_dir": root, "sources": sources, "batch_size": bs, "seq_len": seq_len, "deep_batches": deep}
    for name, tok in (("bytes", TokenizerArgs("bytes")), ("sp", TokenizerArgs("sp", sp_model))):
        out = {}
        say(f"{name}: throughput, async then sync, {seconds:g} s each")
        out["async"] = throughput(_args(root, sources, tok, bs, seq_len, True), seconds)
        out["sync"] = throughput(_args(root, sources, tok, bs, seq_len, False), seconds)
        say(f"{name}: resume at batch 1 and at batch {deep}")
        shallow, _ = state_at(_args(root, sources, tok, bs, seq_len, False), 1)
        deep_state, replay_s = state_at(_args(root, sources, tok, bs, seq_len, False), deep)
        out["deep_passes"] = {k.rsplit("/", 1)[1]: v for k, v in data_metrics(deep_state).items() if "/pass/" in k}
        out["replay_to_deep_s"] = replay_s
        for mode, load_async in (("sync", False), ("async", True)):
            a = _args(root, sources, tok, bs, seq_len, load_async)
            t_shallow, t_deep = [], []
            for _ in range(repeats):  # interleaved
                t_shallow.append(time_to_first_batch(a, shallow, 1))
                t_deep.append(time_to_first_batch(a, deep_state, 1))
            out[f"resume_{mode}"] = {
                "shallow_s": statistics.median(t_shallow),
                "deep_s": statistics.median(t_deep),
                "ratio": statistics.median(t_deep) / statistics.median(t_shallow),
            }
        res[name] = out
    say(f"elastic: first batch from states resharded 2 -> 1 ranks at step {deep // 2}, {repeats} x")
    res["elastic"] = elastic(root, sources, bs, seq_len, deep // 2, repeats)
    say(f"trace: loader throughput with data.trace on and off, {seconds:g} s each, {repeats} x")
    res["trace"] = trace_cost(root, sources, bs, seq_len, seconds, repeats)
    return res


def rows(res: dict) -> list:
    out = []
    for name in ("bytes", "sp"):
        r = res[name]
        a, s = r["async"], r["sync"]
        out.append(common.Row(PART, f"{name}: tokens/s, loader process", a["tokens_per_s"], "tok/s", s["tokens_per_s"],
                              "in-process pipeline", a["tokens_per_s"] / s["tokens_per_s"]))
        out.append(common.Row(PART, f"{name}: batches/s, loader process", a["batches_per_s"], "batch/s"))
        for mode in ("sync", "async"):
            q = r[f"resume_{mode}"]
            what = f"{name}: first batch after resume deep ({res['deep_batches']} batches), {mode}"
            out.append(common.Row(PART, what,
                                  q["deep_s"], "s", q["shallow_s"], "resume at batch 1", q["ratio"], RESUME_TARGET,
                                  common.check(q["ratio"], RESUME_TARGET)))
        out.append(common.Row(PART, f"{name}: replaying the stream to the deep batch instead",
                              r["replay_to_deep_s"], "s"))
    e, t = res["elastic"], res["trace"]
    out.append(common.Row(PART, f"first batch after an elastic resume (2 -> 1 ranks, step {e['step']})",
                          e["resharded_s"], "s", e["same_layout_s"], "same-layout resume, same step", e["ratio"],
                          ELASTIC_TARGET, common.check(e["ratio"], ELASTIC_TARGET)))
    out.append(common.Row(PART, "loader tokens/s with data.trace=true", t["on_tokens_per_s"], "tok/s",
                          t["off_tokens_per_s"], "trace off", t["ratio"], TRACE_TARGET,
                          common.check(t["ratio"], TRACE_TARGET)))
    return out


def _prepare(work_dir: str, root: Optional[str], sp_model: Optional[str], say) -> tuple:
    if root:
        sources = {d: 1.0 for d in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, d))}
    else:
        root, sources = common.ensure_corpus(work_dir)
    if not sp_model:
        import importlib.util

        script = os.path.join(common.REPO_ROOT, "setup", "train_tokenizer.py")
        spec = importlib.util.spec_from_file_location("_train_tokenizer", script)
        tt = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tt)
        sp_model = os.path.join(work_dir, "bench_sp1000.model")
        say("training a sentencepiece model (vocab 1000) on the corpus")
        tt.train_sentencepiece(tt.iter_chunk_texts(root, list(sources), 3_000_000), sp_model, vocab_size=1000)
    return root, sources, sp_model


def run(ctx) -> dict:
    """Entry point of the benchmark runner (apps.bench.common.BenchContext)."""
    root, sources, sp_model = _prepare(ctx.work_dir, None, None, ctx.say)
    if ctx.quick:
        return bench(root, sources, sp_model, 0.5, 50, 1, 2, 64, ctx.say)
    return bench(root, sources, sp_model, 3.0, 5000, max(3, ctx.repeats), 8, 512, ctx.say)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root-dir", default=None,
                   help="data root (default: data/default, else a corpus made in a temp dir)")
    p.add_argument("--sp-model", default=None, help="sentencepiece model (default: train one, vocab 1000)")
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per throughput measurement")
    p.add_argument("--deep-batches", type=int, default=5000, help="how deep the 'deep' resume state is, in batches")
    p.add_argument("--repeats", type=int, default=3, help="repeats of each resume timing (median)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)

    def say(msg):
        print(f"[data_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    if a.quick:
        a.seconds, a.deep_batches, a.repeats, a.batch_size, a.seq_len = 0.5, 50, 1, 2, 64
    with tempfile.TemporaryDirectory(prefix="data_bench_") as work:
        root, sources, sp_model = _prepare(work, a.root_dir, a.sp_model, say)
        res = bench(root, sources, sp_model, a.seconds, a.deep_batches, a.repeats, a.batch_size, a.seq_len, say)
    res["machine"] = common.machine_info()
    table = common.format_table([r.as_dict() for r in rows(res)])
    print(table)
    if a.out:
        common.write_json(a.out, {"results": res, "rows": [r.as_dict() for r in rows(res)]})
        say(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
