"""Peak GPU memory of the processes of a process tree, read through NVML.

``fedlora bench-scale`` samples it next to the tree's RSS: NVML lists, per GPU,
the processes holding memory there and how much (CUDA context, weights, the
caching allocator's pool: what ``nvidia-smi`` shows), so a Ray worker's share
is read from outside, with no hook in the worker.

NVML comes from ``pynvml`` (the ``nvidia-ml-py`` package), imported only when
a sampler is made. Without it, without an NVIDIA driver or without a GPU the
sampler is a no-op: ``available`` is false and every reading is ``None``.
Nothing heavy is imported (no torch, no CUDA context is created).
"""

from __future__ import annotations

from collections.abc import Iterable

MIB = 2**20


class GpuMemory:
    """Peak GPU memory per process (over the pids it is shown) and the peak of
    the device-wide memory in use above what was in use when it started."""

    def __init__(self) -> None:
        self._nvml = None
        self._handles: list = []
        self.peak_by_pid: dict[int, int] = {}  # bytes
        self.peak_used_bytes = 0  # device-wide, above the baseline
        self._baseline = 0
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
        except Exception:  # noqa: BLE001 - no module, no driver, no library: no GPU
            return
        try:
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i)
                             for i in range(pynvml.nvmlDeviceGetCount())]
            self._nvml = pynvml
            self._baseline = self._used()
        except Exception:  # noqa: BLE001
            self._handles = []
            self._shutdown(pynvml)

    @property
    def available(self) -> bool:
        """Whether a GPU was found (then the readings are numbers)."""
        return bool(self._handles)

    def _used(self) -> int:
        return sum(self._nvml.nvmlDeviceGetMemoryInfo(h).used for h in self._handles)

    def sample(self, pids: Iterable[int]) -> None:
        """Read every GPU once and keep the peaks of the processes in ``pids``."""
        if self._nvml is None:
            return
        wanted = set(pids)
        nvml = self._nvml
        now: dict[int, int] = {}
        for handle in self._handles:
            try:
                processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except Exception:  # noqa: BLE001 - a driver that cannot list them
                processes = []
            for process in processes:
                used = getattr(process, "usedGpuMemory", None)
                if process.pid in wanted and used:  # None: not available (some VMs)
                    now[process.pid] = now.get(process.pid, 0) + used
        for pid, used in now.items():
            self.peak_by_pid[pid] = max(self.peak_by_pid.get(pid, 0), used)
        try:
            self.peak_used_bytes = max(self.peak_used_bytes, self._used() - self._baseline)
        except Exception:  # noqa: BLE001
            pass

    def per_process_mb(self, exclude: Iterable[int] = ()) -> float | None:
        """The largest per-process peak in MiB over the processes seen, less
        ``exclude``; ``None`` without a GPU or when none of them used it."""
        skip = set(exclude)
        peaks = [b for pid, b in self.peak_by_pid.items() if pid not in skip]
        return max(peaks) / MIB if peaks else None

    def used_mb(self) -> float | None:
        """The peak device-wide memory in use above the start, in MiB (all
        processes on the GPUs, ours or not); ``None`` without a GPU."""
        return self.peak_used_bytes / MIB if self._handles else None

    def close(self) -> None:
        if self._nvml is not None:
            self._shutdown(self._nvml)
            self._nvml = None

    @staticmethod
    def _shutdown(nvml) -> None:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass
