"""The benches' shared timing and reporting: interleaved repeats with medians, the machine's load, and a table header
with the date and the versions, written once for the benches that import them."""
import datetime, importlib.metadata, os, platform, statistics, time

import torch

def sync(device=None):
    "Wait for queued GPU work, so that a wall-clock time covers it (nothing to do on a CPU)."
    if torch.cuda.is_available() and (device is None or torch.device(device).type == 'cuda'): torch.cuda.synchronize()

def interleaved(fns:dict, repeats:int=5, warmup:int=1, device=None) -> dict:
    """Seconds of each call of `fns[name]()`, the names alternating (a, b, a, b, ...) so that load from other processes
    hits every one alike; `warmup` rounds first, not recorded. Returns {name: [seconds, ...]}."""
    times = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup: times[name].append(time.perf_counter() - t0)
    return times

def medians(times:dict) -> dict:
    "{name: median seconds} of `interleaved`'s result."
    return {name: statistics.median(ts) for name, ts in times.items()}

def interleaved_medians(fns:dict, repeats:int=5, warmup:int=1, device=None) -> dict:
    "Median seconds per call of each function, timed interleaved."
    return medians(interleaved(fns, repeats, warmup, device))

def load_average() -> float:
    "The 1-minute load average (0 where the OS does not report one)."
    try: return os.getloadavg()[0]
    except OSError: return 0.0

def is_loaded(load:float|None=None) -> bool:
    "More runnable processes than cores: timings are then upper bounds, noisy by tens of percent."
    return (load_average() if load is None else load) > (os.cpu_count() or 1)

def threads_for_load() -> int:
    """One torch thread when the machine is oversubscribed (OpenMP threads would spin-wait on each other and a matmul
    runs many times slower), else torch's default. Returns the thread count in use."""
    if is_loaded(): torch.set_num_threads(1)
    return torch.get_num_threads()

def versions() -> str:
    "torch and the compared libraries' versions, those installed."
    out = []
    for name in ('torch', 'transformers', 'peft', 'trl', 'bitsandbytes', 'accelerate'):
        try: out.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError: pass
    return ', '.join(out)

def header(load_start:float, load_end:float|None=None) -> str:
    "A table's provenance line: date, machine, threads, versions, load average, and a mark when the machine was loaded."
    load_end = load_average() if load_end is None else load_end
    loaded = is_loaded(max(load_start, load_end))
    mark = ("**Measured on a loaded machine** (load average above the core count): timings are upper bounds and noisy; "
            "read the ratios of interleaved runs, not the seconds. " if loaded else "")
    return (f"{mark}Written {datetime.date.today().isoformat()} on {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, load average {load_start:.1f} at the start "
            f"and {load_end:.1f} at the end; {versions()}.")
