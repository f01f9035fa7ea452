"""Fault injection at named points: the one mechanism the tests and the recovery drill (lingua.drill) use.

Production code marks the places where a failure is worth rehearsing with `faults.point(name, step)`. Nothing
happens unless the environment variable LINGUA_FAULTS holds rules (read once, at import), so a point costs one
truth test of an empty tuple when fault injection is off.

    LINGUA_FAULTS="<point>[@<step>][:<rank>]=<action>[;...]"

    step@10:1=kill                  rank 1 kills itself (SIGKILL) after optimizer step 10
    step=sleep(0.3)                 every rank sleeps 0.3 s after every step (a test can signal mid-run)
    save.before_commit@8=kill       every rank dies in the save of step 8, before the commit record
    save.async_write@8=sleep(30)    the background write of step 8 is held back 30 s
    resolve.candidate@12:1=hide     rank 1 cannot see checkpoint 12 (the point returns True)
    save.space_check=pass           the free-space check before a save passes (to provoke a real ENOSPC)
    data.batch@3=raise              the data loader raises after 3 batches

Actions: kill (SIGKILL this process), sleep(<seconds>), raise (a RuntimeError), signal(<NAME>) (send a signal
to this process, e.g. signal(SIGTERM)), and hide / pass, which only make `point` return True for the caller to
act on. The rank is torchrun's RANK, else SLURM_PROCID, else 0; a rule without a rank applies to every rank, a
rule without a step to every step. The points are listed in POINTS (tests check that every point used exists).
"""

import logging
import os
import signal
import time
from typing import NamedTuple, Optional

logger = logging.getLogger(__name__)

ENV = "LINGUA_FAULTS"

# Every named point, where it is, and the step it reports (None: no step).
POINTS = {
    "startup.after_resolve": "train: every rank agreed on the checkpoint to resume (or none)",
    "startup.after_load": "train: model, optimizer and train state loaded; before the first step",
    "step": "train: after optimizer step <step> (its metrics logged), before the checkpoint decision",
    "train.before_optimizer_step": "train: gradients of step <step> computed, the optimizer has not stepped",
    "save.after_train_state": "save of <step>: train state files written into the staging folder",
    "save.after_shards": "save of <step>: model/optimizer shards written (sync), or the async write finished",
    "save.async_write": "save of <step>: the background thread, before it waits for the async write",
    "save.before_commit": "save of <step>: every rank reported its files; no commit record yet",
    "save.after_commit": "save of <step>: committed and published (renamed), before retention",
    "save.space_check": "before a save: `pass` skips the free-space check",
    "resolve.candidate": "resolve: `hide` makes checkpoint <step> invisible to this rank",
    "data.batch": "data loader: before batch <step> (0-based) is handed out",
    "eval.after_part": "eval: a part (validation source, harness task) was recorded",
}

ACTIONS = ("kill", "sleep", "raise", "signal", "hide", "pass")


class FaultInjected(RuntimeError):
    """Raised by the `raise` action."""


class Rule(NamedTuple):
    point: str
    step: Optional[int]
    rank: Optional[int]
    action: str
    arg: Optional[str]


def parse(spec: str) -> tuple:
    """Rules of a LINGUA_FAULTS value; ValueError naming the bad part."""
    rules = []
    for part in (p.strip() for p in (spec or "").split(";")):
        if not part:
            continue
        where, sep, action = part.partition("=")
        if not sep:
            raise ValueError(f"{ENV}: '{part}' has no '=<action>'")
        where, _, rank = where.partition(":")
        point, _, step = where.partition("@")
        name, _, arg = action.partition("(")
        if point not in POINTS:
            raise ValueError(f"{ENV}: unknown fault point '{point}' (known: {', '.join(POINTS)})")
        if name not in ACTIONS:
            raise ValueError(f"{ENV}: unknown action '{name}' in '{part}' (known: {', '.join(ACTIONS)})")
        try:
            rules.append(Rule(point, int(step) if step else None, int(rank) if rank else None, name,
                              arg.rstrip(")") or None))
        except ValueError:
            raise ValueError(f"{ENV}: bad step or rank in '{part}'") from None
    return tuple(rules)


def rule(point: str, action: str = "kill", step: Optional[int] = None, rank: Optional[int] = None) -> str:
    """The text of one rule (join several with ';'), for tests and the drill."""
    text = point + (f"@{step}" if step is not None else "") + (f":{rank}" if rank is not None else "")
    return f"{text}={action}"


_RULES = parse(os.environ.get(ENV, ""))


def _my_rank() -> int:
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


def point(name: str, step: Optional[int] = None) -> bool:
    """Act on the rules for this point (and step, and rank). True when a hide/pass rule matched."""
    if not _RULES:
        return False
    flagged = False
    for r in _RULES:
        if r.point != name or (r.step is not None and r.step != step):
            continue
        if r.rank is not None and r.rank != _my_rank():
            continue
        flagged |= _act(r, name, step)
    return flagged


def _act(r: Rule, name: str, step: Optional[int]) -> bool:
    where = f"'{name}'" + (f" (step {step})" if step is not None else "") + f" on rank {_my_rank()}"
    if r.action == "kill":
        logger.error(f"{ENV}: killing this process at {where}")
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
    elif r.action == "sleep":
        time.sleep(float(r.arg or 1.0))
    elif r.action == "raise":
        raise FaultInjected(f"{ENV}: injected failure at {where}")
    elif r.action == "signal":
        os.kill(os.getpid(), getattr(signal, r.arg or "SIGTERM"))
    else:  # hide / pass: the caller acts
        logger.warning(f"{ENV}: '{r.action}' at {where}")
        return True
    return False
