r"""Generate text from a checkpoint (sampling with temperature / top-p / top-k, KV cache).

    python -m apps.main.generate ckpt=<run>/checkpoints/0000001000 prompt="To be, or not"
    python -m apps.main.generate ckpt=... prompts_file=prompts.txt output=out.jsonl \
        generator.temperature=0.8 generator.top_p=0.9
    torchrun --nproc-per-node 2 -m apps.main.generate ckpt=... prompt=...     (FSDP: the weights are sharded)

`ckpt` is a committed DCP checkpoint folder (any number of processes) or a consolidated folder / file.
`prompts_file`: one prompt per line (a `\n` inside a line is a newline), or a .jsonl file of {"prompt": ...}.
Rank 0 prints each prompt followed by its generation; `output` also writes them as jsonl.
"""

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from lingua.args import ConfigError, parse_args
from lingua.checkpoint import CheckpointError
from lingua.distributed import DistributedArgs, get_launch_env, run_main, setup_torch_distributed
from lingua.files import write_jsonl
from lingua.generation import GenerationArgs, generate
from lingua.logger import init_logger
from lingua.pretrained import find_model, load_model
from lingua.tokenizer import build_tokenizer


@dataclass
class GenerateArgs:
    ckpt: str = ""  # a committed checkpoint, a consolidated folder / .pth, or a Hugging Face Llama folder (required)
    prompt: Optional[str] = None  # one prompt
    prompts_file: Optional[str] = None  # prompts, one per line (or .jsonl with a "prompt" field)
    output: Optional[str] = None  # also write {"prompt", "generation"} lines here
    add_bos: bool = True  # start each prompt with the tokenizer's bos (as in training)
    generator: GenerationArgs = field(default_factory=lambda: GenerationArgs(max_gen_len=128))  # sampling
    distributed: DistributedArgs = field(default_factory=DistributedArgs)  # FSDP of the model

    def validate(self):
        self.generator.validate("generator")
        self.distributed.validate()


CONFIG_CLASS = GenerateArgs


def read_prompts(args: GenerateArgs) -> List[str]:
    prompts = []
    if args.prompt is not None:
        prompts.append(str(args.prompt))
    if args.prompts_file:
        if not os.path.isfile(args.prompts_file):
            raise ConfigError(f"prompts_file '{args.prompts_file}' does not exist")
        with open(args.prompts_file) as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if args.prompts_file.endswith(".jsonl"):
                    try:
                        prompts.append(str(json.loads(line)["prompt"]))
                    except (ValueError, KeyError, TypeError):
                        raise ConfigError(
                            f"{args.prompts_file}:{lineno}: expected a JSON object with a 'prompt' field") from None
                else:
                    prompts.append(line.replace("\\n", "\n"))
    if not prompts:
        raise ConfigError('no prompt: set prompt="..." or prompts_file=<file>')
    return prompts


def parse_generate_config(argv=None) -> GenerateArgs:
    argv = list(sys.argv[1:] if argv is None else argv)
    # A prompt is taken verbatim (not parsed as YAML: "ROMEO:" or "[1, 2]" stay text).
    raw_prompts = [a.split("=", 1)[1] for a in argv if a.startswith("prompt=")]
    args = parse_args(GenerateArgs, [a for a in argv if not a.startswith("prompt=")])
    if raw_prompts:
        args.prompt = raw_prompts[-1]
    if not args.ckpt:
        raise ConfigError("ckpt is not set (a checkpoint folder such as <run>/checkpoints/0000001000)")
    read_prompts(args)  # fail early on a bad prompts file
    return args


def run_generate(args: GenerateArgs) -> int:
    prompts = read_prompts(args)
    init_logger(get_launch_env().rank, None, os.environ.get("LINGUA_LOG_LEVEL", "WARNING"))
    source = find_model(args.ckpt)  # before any process group: a bad path is one line
    dist_state = setup_torch_distributed(args.distributed)
    tokenizer = build_tokenizer(source.tokenizer_args)
    model = load_model(source, dist_state, args.distributed)
    t0 = time.time()
    with torch.no_grad():
        texts = generate(model, tokenizer, prompts, args.generator, add_bos=args.add_bos)
    if dist_state.is_master:
        for i, (p, t) in enumerate(zip(prompts, texts)):
            if len(prompts) > 1:
                print(f"=== {i} ===")
            print(p + t, flush=True)
        if args.output:
            write_jsonl(args.output, [{"prompt": p, "generation": t} for p, t in zip(prompts, texts)])
        print(f"[{len(prompts)} prompt(s), {time.time() - t0:.1f}s]", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return run_main(lambda: parse_generate_config(argv), run_generate, (CheckpointError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
