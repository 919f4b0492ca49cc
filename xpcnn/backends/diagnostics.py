"""What the ``info`` and ``bench`` commands report about the machine: backends, GPUs, device memory."""

from __future__ import annotations

import importlib

from .backend import cuda_problem, jax_gpus, torch_cuda_problem


def available_backends() -> list[dict[str, str]]:
    """Each known backend with its version and whether it can run here."""
    rows = []
    modules = {"numpy": "numpy", "array-api-strict": "array_api_strict", "cupy": "cupy", "torch": "torch", "jax": "jax"}
    for name, module in modules.items():
        try:
            version = importlib.import_module(module).__version__
        except ImportError:
            rows.append({"backend": name, "version": "-", "status": "not installed"})
            continue
        except Exception as exc:
            rows.append({"backend": name, "version": "-", "status": f"import failed: {exc}"})
            continue
        status = "ok"
        if name == "cupy":
            status = cuda_problem() or "ok"
        elif name in ("torch", "jax"):
            status = f"ok: {', '.join(_devices(name))}"
        rows.append({"backend": name, "version": version, "status": status})
    return rows


def _devices(name: str) -> list[str]:
    """The device names the torch or jax backend can use here."""
    if name == "torch":
        torch = importlib.import_module("torch")
        count = 0 if torch_cuda_problem(torch) else torch.cuda.device_count()
    else:
        count = len(jax_gpus(importlib.import_module("jax")))
    return ["cpu"] + [f"cuda:{index}" for index in range(count)]


def gpu_names() -> list[str]:
    """Names of the CUDA GPUs CuPy can see (empty without CuPy or a GPU)."""
    if cuda_problem() is not None:
        return []
    import cupy

    names = []
    for index in range(cupy.cuda.runtime.getDeviceCount()):
        props = cupy.cuda.runtime.getDeviceProperties(index)
        memory_gib = props["totalGlobalMem"] / 2**30
        names.append(f"cuda:{index}: {props['name'].decode()} ({memory_gib:.0f} GiB)")
    return names


def device_peak_mib(backend) -> float | None:
    """Peak GPU memory of the run in MiB (None on the CPU).

    CuPy: what its memory pool holds (it keeps its high-water mark); torch: its
    allocator's peak; JAX: the device's ``peak_bytes_in_use``.
    """
    if not backend.is_gpu:
        return None
    if backend.name == "cupy":
        import cupy

        return cupy.get_default_memory_pool().total_bytes() / 2**20
    if backend.name == "torch":
        import torch

        return torch.cuda.max_memory_allocated(backend.device) / 2**20
    return backend.device.memory_stats()["peak_bytes_in_use"] / 2**20
