"""bench-scale's GPU memory sampler (fedlora.runtime.gpu_memory) and its new fields:
a no-op without a GPU, per-process peaks through NVML where there is one
(a fake NVML here), and ``clients_per_s`` in every row."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from types import SimpleNamespace

import pytest

from fedlora.commands import bench_scale
from fedlora.runtime.gpu_memory import MIB, GpuMemory


def _no_gpu_checks(gpu: GpuMemory) -> None:
    assert not gpu.available
    gpu.sample([os.getpid(), 1])
    assert gpu.peak_by_pid == {}
    assert gpu.per_process_mb() is None and gpu.used_mb() is None
    gpu.close()
    gpu.close()  # twice is harmless


def test_no_op_without_pynvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    _no_gpu_checks(GpuMemory())


def test_no_op_without_a_driver(monkeypatch):
    """nvidia-ml-py installed but no NVIDIA driver: nvmlInit raises."""
    def init():
        raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", types.SimpleNamespace(nvmlInit=init))
    _no_gpu_checks(GpuMemory())


def test_no_op_on_this_machine():
    """Whatever this machine has: without a GPU, nothing is reported."""
    gpu = GpuMemory()
    if gpu.available:
        pytest.skip("this machine has a GPU")
    _no_gpu_checks(gpu)


class FakeNvml:
    """One GPU whose process list and memory in use the test sets."""

    def __init__(self) -> None:
        self.processes: list = []
        self.used = 1000 * MIB
        self.shut = False

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shut = True

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=self.used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return self.processes


def test_per_process_peaks_with_a_gpu(monkeypatch):
    nvml = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    gpu = GpuMemory()
    assert gpu.available and gpu.used_mb() == 0
    nvml.processes = [SimpleNamespace(pid=10, usedGpuMemory=300 * MIB),
                      SimpleNamespace(pid=11, usedGpuMemory=500 * MIB),
                      SimpleNamespace(pid=99, usedGpuMemory=9000 * MIB),  # not ours
                      SimpleNamespace(pid=12, usedGpuMemory=None)]  # not available
    nvml.used = 2000 * MIB
    gpu.sample([10, 11, 12])
    nvml.processes = [SimpleNamespace(pid=10, usedGpuMemory=700 * MIB)]
    nvml.used = 1500 * MIB
    gpu.sample(iter([10, 11]))
    assert gpu.peak_by_pid == {10: 700 * MIB, 11: 500 * MIB}
    assert gpu.per_process_mb() == 700 and gpu.per_process_mb(exclude=[10]) == 500
    assert gpu.used_mb() == 1000  # peak above the 1000 MiB in use at the start
    gpu.close()
    assert nvml.shut
    gpu.sample([10])  # after close: ignored, readings kept
    assert gpu.per_process_mb() == 700


@pytest.mark.e2e
def test_tree_sampler_reports_no_gpu_fields_without_a_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    rss = bench_scale.TreeRss(child.pid)
    child.wait()
    assert rss.stop() > 0
    assert rss.gpu_fields() == {}


def _run(updates=20, rounds_s=4.0, wall_s=10.0, **extra) -> dict:
    return {"workers": 2, "wall_s": wall_s, "compute_s": 6.0, "rounds_s": rounds_s,
            "ray_ready_s": 1.0, "rounds_start_s": 2.0, "first_round_s": 2.5,
            "aggregate_s": 0.1, "updates": updates, "peak_rss_mb": 900.0, **extra}


def test_summarise_reports_clients_per_s_and_gpu_memory_only_when_seen():
    row = bench_scale.summarise(10, 2, _run(), None)
    assert row["clients_per_s"] == 5.0
    assert not any(key.startswith("gpu_") for key in row)
    gpu = {"gpu_mem_mb_per_worker": 812.34, "gpu_mem_mb_driver": None,
           "gpu_mem_mb_used": 1700.0}
    row = bench_scale.summarise(10, 2, _run(**gpu), _run(rounds_s=8.0, wall_s=20.0, **gpu))
    assert row["clients_per_s"] == 5.0 and row["stock_clients_per_s"] == 2.5
    assert row["gpu_mem_mb_per_worker"] == 812.3 and row["gpu_mem_mb_driver"] is None
    assert row["stock_gpu_mem_mb_per_worker"] == 812.3
    assert row["speedup_vs_stock"] == 2.0
