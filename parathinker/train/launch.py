"""Launches that do not train the way they were asked to: messages for the trainer to print.

`accelerate launch --cpu --num_processes N` (and a `distributed_type: MULTI_CPU` config) runs
accelerate's simple launcher, which starts ONE process unless it runs under mpirun
(`--mpirun_hostfile`); it only sets MASTER_ADDR/MASTER_PORT, which it does when more than one
process was asked for. `--multi_gpu --num_processes N` starts N processes (torchrun, WORLD_SIZE=N)
and trains on CPU too (gloo) when there is no GPU or `--cpu` is given to `train`.
"""

from __future__ import annotations

from collections.abc import Mapping

# what accelerate reads for the world size of a CPU run (accelerate.state.PartialState)
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
CPU_LAUNCH = "accelerate launch --multi_gpu --num_processes N -m parathinker.train.cli train ... --cpu"


def _int(value: str | None) -> int:
    try:
        return int(value or 1)
    except ValueError:
        return 1


def single_process_launch_warning(env: Mapping[str, str], num_processes: int) -> str | None:
    """A warning when `accelerate launch` asked for several processes but this is the only one."""
    launched_by_accelerate = "ACCELERATE_USE_CPU" in env or "ACCELERATE_MIXED_PRECISION" in env
    world = max(_int(env.get(k)) for k in WORLD_SIZE_VARS)
    if num_processes > 1 or world > 1 or not launched_by_accelerate or "MASTER_ADDR" not in env:
        return None
    return ("warning: `accelerate launch` was asked for more than one process (it set MASTER_ADDR) "
            "but this run has 1 process: accelerate's CPU launcher (`--cpu`, or a MULTI_CPU "
            "config) starts a single process unless it runs under mpirun (--mpirun_hostfile). "
            f"To train with N processes on CPU run `{CPU_LAUNCH}` (docs/TRAINING.md). "
            "Continuing with 1 process.")


def short_epoch_warning(num_rows: int, num_processes: int, grad_accum: int,
                        batch_size: int) -> str | None:
    """A warning when one optimizer step takes more rows than an epoch has: the step then
    repeats rows (the plan wraps around), e.g. tiny data with the default --grad-accum 16."""
    per_step = num_processes * grad_accum * batch_size
    if num_rows >= per_step:
        return None
    per_micro = num_processes * batch_size
    fit = num_rows // per_micro
    advice = (f"Pass --grad-accum {fit}{' or less' if fit > 1 else ''}" if fit >= 1
              else "Use fewer processes or a smaller --batch-size")
    return (f"warning: an epoch has {num_rows} row(s) but one optimizer step takes {per_step} "
            f"({num_processes} process(es) x --grad-accum {grad_accum} x --batch-size "
            f"{batch_size}), so every step repeats rows. {advice}, or add data (--no-pack makes "
            "one row per sample).")
