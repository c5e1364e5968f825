"""The memory plan against the devices: how many there are and how much each holds (found on this machine,
or given), the table printed at launch and by ``selfbudget-plan``, and the one error a plan that cannot fit
raises, naming its biggest term and the keys that shrink it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from omegaconf import DictConfig

from selfbudget_pl.config.checks import plain
from selfbudget_pl.schema import ConfigError
from selfbudget_pl.memory.architecture import ModelConfigUnavailable, model_architecture
from selfbudget_pl.memory.plan import (DEVICE_MOMENTS, GIB, HOST_MOMENTS, MemoryPlan, PlanSettings, RunShape, Term,
                                       plan_memory)

MEMINFO = Path("/proc/meminfo")


def plan_from_config(cfg: DictConfig, settings: PlanSettings, probe: bool = True) -> tuple[MemoryPlan, Optional[float]]:
    """The plan of the composed train config ``cfg`` and the bytes per device it is checked against (None:
    unknown). ``probe``: look at this machine for device counts and memory (at launch); the planning
    command plans for the devices the config names and the memory the user gives."""
    shape = RunShape(**{key: plain(cfg.get(key)) or {} for key in (
        "trainer", "strategy", "model", "module", "data", "rollout", "callbacks")})
    on_gpu = str(shape.trainer.get("accelerator", "cpu")).lower() in ("gpu", "cuda") or (
        str(shape.trainer.get("accelerator")) == "auto" and torch.cuda.is_available())
    ranks_per_host = _devices(shape.trainer.get("devices", 1), on_gpu, probe)
    world_size = ranks_per_host * int(shape.trainer.get("num_nodes", 1) or 1)
    device_memory = _device_memory(settings, on_gpu, ranks_per_host, probe)
    arch = model_architecture(shape.model, settings.model_config)
    plan = plan_memory(shape, arch, settings, world_size, ranks_per_host, on_gpu, device_memory)
    return plan, device_memory


def host_memory(settings: PlanSettings, probe: bool) -> Optional[float]:
    """Bytes of host memory to check the host terms against: given, this host's at launch, else None."""
    if settings.host_memory_gib is not None:
        return settings.host_memory_gib * GIB
    return _meminfo("MemTotal") if probe else None


def format_plan(plan: MemoryPlan, device_memory: Optional[float], settings: PlanSettings,
                host_bytes: Optional[float] = None) -> str:
    """The plan as a small table: every term, each phase's total, the peak against the memory there is."""
    lines = [f"memory plan: {plan.summary}", f"{'per device':<44} {'phase':<9} {'GiB':>8}  how"]
    lines += [_row(term) for term in plan.device]
    usable = _usable(plan, device_memory, settings)
    against = f" of {usable / GIB:.2f} usable" if usable is not None else " (device memory unknown: not checked)"
    peak = f"  peak: resident + max({', '.join(DEVICE_MOMENTS)})"
    lines.append(f"{peak:<54} {plan.device_peak / GIB:>8.2f}{against}")
    if plan.vllm_share is not None:
        lines.append(f"{'  of which vLLM takes (its share)':<54} {plan.vllm_share / GIB:>8.2f}")
    lines.append(f"{'per host':<44} {'phase':<9} {'GiB':>8}  how")
    lines += [_row(term) for term in plan.host]
    host = f" of {host_bytes / GIB:.2f}" if host_bytes is not None else ""
    peak = f"  peak: resident + max({', '.join(HOST_MOMENTS)})"
    lines.append(f"{peak:<54} {plan.host_peak / GIB:>8.2f}{host}")
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)


def misfits(plan: MemoryPlan, device_memory: Optional[float], settings: PlanSettings,
            host_bytes: Optional[float] = None) -> list[str]:
    """One sentence per budget the plan overruns, each naming its biggest term and the keys that shrink it."""
    problems = []
    usable = _usable(plan, device_memory, settings)
    if usable is not None and plan.device_peak > usable:
        biggest = _biggest(plan.peak_terms(plan.device, DEVICE_MOMENTS))
        problems.append(
            f"{plan.device_peak / GIB:.2f} GiB per device does not fit the {usable / GIB:.2f} GiB usable of "
            f"{device_memory / GIB:.2f} GiB ({_memory_source(settings, plan)}); the biggest term is "
            f"{_describe(biggest)}"
        )
    if plan.vllm_share is not None and plan.vllm_floor is not None and plan.vllm_floor > plan.vllm_share:
        problems.append(
            f"vLLM's share ({plan.vllm_share / GIB:.2f} GiB) cannot hold its weights, profile and one sequence of "
            f"rollout.max_model_len ({plan.vllm_floor / GIB:.2f} GiB), so the engine will not start; lower "
            "rollout.max_model_len, or raise rollout.gpu_memory_utilization"
        )
    if host_bytes is not None and plan.host_peak > host_bytes:
        biggest = _biggest(plan.peak_terms(plan.host, HOST_MOMENTS))
        problems.append(
            f"{plan.host_peak / GIB:.2f} GiB per host does not fit its {host_bytes / GIB:.2f} GiB; the biggest "
            f"term is {_describe(biggest)}"
        )
    return problems


def check_plan(plan: MemoryPlan, device_memory: Optional[float], settings: PlanSettings,
               host_bytes: Optional[float] = None) -> list[str]:
    """Raise :class:`ConfigError` for a plan that cannot fit (``on_overflow=error``); return the problems."""
    problems = misfits(plan, device_memory, settings, host_bytes)
    if problems and settings.on_overflow == "error":
        raise ConfigError(
            "memory plan: " + "; ".join(problems) + " (memory_plan.on_overflow=warn runs anyway)"
        )
    return problems


def _usable(plan: MemoryPlan, device_memory: Optional[float], settings: PlanSettings) -> Optional[float]:
    if device_memory is None:
        return None
    return device_memory - (settings.device_reserve_gib * GIB if plan.on_gpu else 0.0)


def _biggest(terms: list[Term]) -> Term:
    return max(terms, key=lambda term: term.bytes)


def _describe(term: Term) -> str:
    fix = f"; shrink it with {', '.join(term.keys)}" if term.keys else ""
    return f"{term.name} ({term.bytes / GIB:.2f} GiB: {term.detail}){fix}"


def _memory_source(settings: PlanSettings, plan: MemoryPlan) -> str:
    if settings.device_memory_gib is not None:
        return "memory_plan.device_memory_gib"
    return "the CUDA device found" if plan.on_gpu else f"this host's available memory / {plan.ranks_per_host} ranks"


def _row(term: Term) -> str:
    return f"  {term.name:<42} {term.phase:<9} {term.bytes / GIB:>8.3f}  {term.detail}"


def _devices(devices: Any, on_gpu: bool, probe: bool) -> int:
    """Ranks per host from ``trainer.devices`` (a count, a list of ids, -1 or ``auto``)."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        return devices
    if not on_gpu:
        return 1  # Lightning's CPU "auto" is one process
    if probe and torch.cuda.is_available():
        return torch.cuda.device_count()
    raise ConfigError(f"memory plan: trainer.devices={devices} depends on the machine; give a count (trainer.devices=8)")


def _device_memory(settings: PlanSettings, on_gpu: bool, ranks_per_host: int, probe: bool) -> Optional[float]:
    if settings.device_memory_gib is not None:
        return settings.device_memory_gib * GIB
    if not probe:
        return None
    if on_gpu:
        return float(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else None
    available = _meminfo("MemAvailable")
    return None if available is None else available / ranks_per_host


def _meminfo(field: str) -> Optional[float]:
    """A ``/proc/meminfo`` field in bytes (None where there is no such file)."""
    if not MEMINFO.exists():
        return None
    for line in MEMINFO.read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return float(value.split()[0]) * 1024
    return None


def report_memory_plan(cfg: DictConfig, settings: PlanSettings) -> Optional[MemoryPlan]:
    """At launch: compute the plan for this machine, print it on rank 0, warn about or refuse a plan that
    cannot fit (:func:`check_plan`). Without the model's config (an export not written yet) there is no plan:
    loading the model will say what is missing."""
    try:
        plan, device_memory = plan_from_config(cfg, settings, probe=True)
    except ModelConfigUnavailable as error:
        rank_zero_warn(f"{error}; no plan")
        return None
    host_bytes = host_memory(settings, probe=True)
    rank_zero_info(format_plan(plan, device_memory, settings, host_bytes))
    for problem in check_plan(plan, device_memory, settings, host_bytes):
        rank_zero_warn(f"memory plan: {problem}")
    return plan
