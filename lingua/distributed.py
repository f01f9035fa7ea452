"""Who am I (torchrun / SLURM srun / a single process), process groups, the device mesh, and FSDP2.

One process per device. The launch environment is read once into a `LaunchEnv`; torchrun's variables win,
then SLURM's, then a single local process. Backend and device follow the hardware unless forced. A process's
setup also tells glibc's malloc to keep freed host memory for reuse (`keep_host_memory`).
"""

import datetime
import faulthandler
import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lingua.args import Choice, ConfigError


class Backend(Choice):
    auto = "auto"
    nccl = "nccl"
    gloo = "gloo"


class Device(Choice):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


class FsdpType(Choice):
    full_shard = "full_shard"
    no_shard = "no_shard"


class Dtype(Choice):
    fp32 = "fp32"
    bf16 = "bf16"

logger = logging.getLogger(__name__)


@dataclass
class DistributedArgs:
    backend: Backend = Backend.auto  # auto | nccl | gloo  (auto: nccl when CUDA is available, else gloo)
    device: Device = Device.auto  # auto | cuda | cpu  (auto: cuda when available)
    dp_shard: int = -1  # FSDP shard group size; -1 = world_size / (dp_replicate * tp_size)
    dp_replicate: int = 1  # number of replicas (HSDP when both dp_shard and dp_replicate > 1)
    tp_size: int = 1  # tensor-parallel size; the mesh has a dimension for it, only 1 is supported today
    fsdp_type: FsdpType = FsdpType.full_shard  # full_shard (params sharded) | no_shard (pure data parallel replication)
    model_dtype: Dtype = Dtype.fp32  # fp32 | bf16: parameter dtype for compute (mixed precision; master weights fp32)
    reduce_dtype: Dtype = Dtype.fp32  # dtype of gradient reductions
    activation_checkpointing: bool = False  # recompute each block's activations in backward to save memory
    compile: bool = False  # torch.compile each transformer block (slow to start on CPU)
    timeout_s: int = 300  # process-group timeout: a dead rank makes the others fail after this many seconds
    matmul_allow_tf32: bool = True  # TF32 matmuls on Ampere+ GPUs
    # Freed host memory stays in the process for reuse (glibc malloc; nothing elsewhere) rather than being handed back
    # to the OS and page-faulted in again by the next step (~10% of a CPU step at 57M params). RSS stays at its peak.
    keep_host_memory: bool = True  # see keep_host_memory() below

    def validate(self):
        if self.tp_size != 1:
            raise ConfigError("distributed.tp_size > 1 is not supported yet (the mesh has room for it)")
        if self.dp_replicate < 1 or (self.dp_shard < 1 and self.dp_shard != -1):
            raise ConfigError("distributed.dp_replicate must be >= 1 and distributed.dp_shard >= 1 or -1")
        if self.timeout_s < 1:
            raise ConfigError("distributed.timeout_s must be >= 1")


@dataclass
class LaunchEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | slurm | single


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_launch_env() -> LaunchEnv:
    """Rank, local rank, world size and rendezvous address from torchrun, SLURM or nothing."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=int(env["WORLD_SIZE"]),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_JOB_ID" in env:
        from lingua.slurm import first_hostname, port_from_job_id

        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            world_size=int(env["SLURM_NTASKS"]),
            master_addr=env.get("MASTER_ADDR") or first_hostname(env.get("SLURM_JOB_NODELIST", "localhost")),
            master_port=int(env.get("MASTER_PORT") or port_from_job_id(env["SLURM_JOB_ID"])),
            launcher="slurm",
        )
    return LaunchEnv(0, 0, 1, "127.0.0.1", free_port(), "single")


def describe_launch(env: LaunchEnv) -> str:
    """One line for the log of a start: world size, launcher, host, pid, and the SLURM job and restart if any."""
    job = os.environ.get("SLURM_JOB_ID")
    slurm = f", SLURM job {job} restart {os.environ.get('SLURM_RESTART_COUNT', '0')}" if job else ""
    return (f"{env.world_size} processes ({env.launcher}), rank 0 on host {socket.gethostname()} "
            f"pid {os.getpid()}{slurm}")


def check_mesh_shape(args: DistributedArgs, world_size: int) -> tuple:
    """(dp_replicate, dp_shard, tp) for this world size, or a ConfigError naming the options."""
    replicate, shard, tp = args.dp_replicate, args.dp_shard, args.tp_size
    if args.fsdp_type == "no_shard":
        if shard not in (-1, 1):
            raise ConfigError("distributed.fsdp_type=no_shard needs distributed.dp_shard=1 (or -1)")
        shard = 1
        if args.dp_replicate == 1:
            replicate = world_size // tp
    if shard == -1:
        if world_size % (replicate * tp):
            raise ConfigError(
                f"world size {world_size} is not divisible by distributed.dp_replicate*tp_size={replicate * tp}"
            )
        shard = world_size // (replicate * tp)
    if replicate * shard * tp != world_size:
        raise ConfigError(
            f"world size {world_size} != distributed.dp_replicate ({replicate}) x dp_shard ({shard}) x tp_size ({tp})"
        )
    return replicate, shard, tp


@dataclass
class DistState:
    """What the rest of the code needs to know about the process layout."""

    env: LaunchEnv
    device: torch.device
    mesh: Optional[DeviceMesh]
    dp_rank: int
    dp_world_size: int
    cpu_group: Optional[object] = None  # a gloo group for CPU-side collectives (agreement, async save)
    tp_rank: int = 0  # position in the tensor-parallel group (ranks with the same dp_rank share their data)

    @property
    def is_master(self) -> bool:
        return self.env.rank == 0


def keep_host_memory() -> bool:
    """Make glibc's malloc keep what is freed for reuse: no trimming of the heap's top, and blocks below 32 MiB (the
    most it allows) from the heap rather than from mmap. By default both thresholds move with use, and a training
    step's buffers are returned and re-faulted at every step (~1,400 page faults a step for the debug model; tens of
    thousands for a 57M model). False where there is no glibc malloc (nothing changed)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    return bool(mallopt(m_trim_threshold, 2**31 - 1)) and bool(mallopt(m_mmap_threshold, 32 << 20))


def setup_torch_distributed(args: DistributedArgs) -> DistState:
    """Create the process group (nccl or gloo) and the (dp_replicate, dp_shard, tp) mesh."""
    if args.keep_host_memory:
        keep_host_memory()
    env = get_launch_env()
    mesh_shape = check_mesh_shape(args, env.world_size)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("distributed.device=cuda but no CUDA device is available")
    backend = args.backend if args.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
        torch.backends.cuda.matmul.allow_tf32 = args.matmul_allow_tf32
        torch.backends.cudnn.allow_tf32 = args.matmul_allow_tf32
    else:
        device = torch.device("cpu")
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    timeout = datetime.timedelta(seconds=args.timeout_s)
    if backend == "nccl":
        # A second backend for CPU tensors, so agreement collectives and async checkpointing run on gloo.
        dist.init_process_group("cuda:nccl,cpu:gloo", timeout=timeout, device_id=device)
    else:
        dist.init_process_group(backend, timeout=timeout)
    mesh = init_device_mesh(device.type, mesh_shape, mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
    dp_rank = mesh.get_local_rank("dp_replicate") * mesh_shape[1] + mesh.get_local_rank("dp_shard")
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else dist.group.WORLD
    logger.info(
        f"rank {env.rank}/{env.world_size} (local {env.local_rank}, launcher {env.launcher}) on {device}, "
        f"backend {backend}, mesh dp_replicate x dp_shard x tp = {mesh_shape}"
    )
    return DistState(env, device, mesh, dp_rank, mesh_shape[0] * mesh_shape[1], cpu_group, mesh.get_local_rank("tp"))


def _reduce_flag(flag: bool, op, group) -> bool:
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=op, group=group)
    return bool(t.item())


def all_agree(flag: bool, group=None) -> bool:
    """True only if `flag` is True on every rank (a CPU collective: use a gloo group)."""
    return _reduce_flag(flag, dist.ReduceOp.MIN, group)


def any_rank(flag: bool, group=None) -> bool:
    """True if `flag` is True on at least one rank."""
    return _reduce_flag(flag, dist.ReduceOp.MAX, group)


def broadcast_object(obj, group=None, src: int = 0):
    """Rank `src`'s `obj` on every rank (a picklable object of our own making, never user data)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def gather_objects(obj, group=None) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def mixed_precision_policy(args: DistributedArgs):
    """FSDP2's mixed precision as configured: compute in model_dtype, reduce gradients in reduce_dtype (the
    sharded master weights stay fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    return MixedPrecisionPolicy(param_dtype=dtypes[args.model_dtype], reduce_dtype=dtypes[args.reduce_dtype])


def parallelize_model(model: torch.nn.Module, mesh: DeviceMesh, args: DistributedArgs) -> torch.nn.Module:
    """FSDP2 on each transformer block and the root, with optional activation checkpointing and compile."""
    from torch.distributed.fsdp import fully_shard

    mp = mixed_precision_policy(args)
    dp_mesh = mesh["dp_replicate", "dp_shard"]
    if dp_mesh.size(0) == 1:
        # One replica: the 1-D shard mesh is the same sharding. A 2-D mesh would make FSDP2 run HSDP, with an
        # all-reduce over a group of one after every reduce-scatter (~1% of a small model's step on CPU).
        dp_mesh = mesh["dp_shard"]
    if args.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, layer in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(layer, preserve_rng_state=False)
    if args.compile:
        for layer in model.layers:
            layer.compile()
    # no_shard keeps full parameters after forward (no re-gather in backward): DDP-like behaviour.
    reshard = args.fsdp_type == "full_shard"
    for layer in model.layers:
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard)
    return model


def destroy():
    # torch 2.13 keeps a process group that functional collectives used (DTensor and FSDP2 do) alive after this:
    # gloo's threads of those groups run until the process exits (seen: 9 of them after a training run).
    if dist.is_initialized():
        dist.destroy_process_group()


def _report_native_crashes() -> None:
    try:
        faulthandler.enable(file=sys.stderr, all_threads=True)
    except (AttributeError, OSError, RuntimeError, ValueError):  # a stderr without a file descriptor (in-process)
        pass


def run_main(parse, body, user_errors: tuple = ()) -> int:
    """The shape of every entry point: `parse()` the config (a ConfigError is one line on stderr, exit 2, before any
    process group exists), then `body(args)`. A problem with the user's input (an unusable checkpoint, bad data:
    `user_errors`) ends it with one line on stderr and exit 1 instead of a traceback; the process group is always
    destroyed. A fatal signal (a segfault or abort in native code: torch, gloo, NCCL) prints every thread's Python
    stack on stderr (the job's output) before the process dies of it."""
    _report_native_crashes()
    try:
        args = parse()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        return body(args)
    except (ConfigError, *user_errors) as e:
        logger.error(f"{type(e).__name__}: {e}")
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception:
        logger.exception("crashed")  # the traceback in the run's log too, where `lingua.status` finds it
        raise
    finally:
        destroy()
