"""The output head, plain against chunked (ftcourse.checkpoint.chunked_logps): time, bytes saved for backward and peak
memory of forward + backward through SmolLM2-135M's head (its real 49,152 x 576 weight) for N labelled positions, with
the weight trained (the chunked head recomputes each chunk's logits in backward) and frozen (it computes the input's
gradient direction in forward and recomputes nothing).

Peak memory: each variant runs once in a fresh process (with a random weight of the head's shape: loading the model
would set the process's peak); on a CPU the peak resident set size (ru_maxrss) grows by the
step's transient tensors, on CUDA torch.cuda.max_memory_allocated above the memory before the step.
Writes bench/head.md.   python bench/head.py [--positions 1024] [--chunk 256] [--repeats 5]"""
import argparse, json, os, resource, subprocess, sys
from pathlib import Path
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import torch
sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved_medians, header, load_average, threads_for_load

ap = argparse.ArgumentParser()
ap.add_argument('--positions', type=int, default=1024); ap.add_argument('--chunk', type=int, default=256)
ap.add_argument('--repeats', type=int, default=5); ap.add_argument('--one', default=None)
a = ap.parse_args()

def plain(h, W, y):
    z = (h @ W.T).float()
    return z.gather(-1, y[:, None]).squeeze(-1) - z.logsumexp(-1)

def setup(random_weight=False):
    """The head's weight (the real one, or a random one of its shape: loading the model would set the process's peak RSS),
    random hidden states and targets, and the two methods."""
    from ftcourse.checkpoint import chunked_logps
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    g = torch.Generator().manual_seed(0)
    if random_weight: W = (0.02 * torch.randn(49152, 576, generator=g)).to(dev)
    else:
        from ftcourse.core import load_model
        model, _ = load_model(device=dev)
        W = model.lm_head.weight.detach().clone()
        del model
    h = torch.randn(a.positions, W.shape[1], generator=g).to(W.device)
    y = torch.randint(0, W.shape[0], (a.positions,), generator=g).to(W.device)
    fns = {'plain': plain, 'chunked': lambda h, W, y: chunked_logps(h, W, y, a.chunk)}
    return W, h, y, fns

def step(fn, W, h, y, train_w):
    hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_(train_w)
    return lambda: fn(hh, WW, y).sum().backward()

def rss_mib():
    """The process's peak resident set (MiB): /proc's VmHWM, which a new program starts afresh (ru_maxrss keeps the peak
    of the process that forked it, here the parent holding the model)."""
    try:
        for line in open('/proc/self/status'):
            if line.startswith('VmHWM:'): return int(line.split()[1]) / 1024
    except OSError: pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

if a.one:   # one variant in a fresh process: its peak memory
    W, h, y, fns = setup(random_weight=True)
    name, train = a.one.split('-')
    f = step(fns[name], W, h, y, train == 'trained')
    cuda = W.is_cuda
    if cuda: torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    before = rss_mib()
    f()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else rss_mib() - before
    print('RESULT ' + json.dumps(dict(peak_mib=peak)))
    sys.exit()

from ftcourse.checkpoint import SavedTensors
load0 = load_average()
threads_for_load()
W, h, y, fns = setup()
rows = []
for train_w in (True, False):
    saved = {}
    for name, fn in fns.items():
        hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_(train_w)
        with SavedTensors(exclude=[WW]) as st: fn(hh, WW, y)
        saved[name] = st.unique / 2**20
    secs = interleaved_medians({name: step(fn, W, h, y, train_w) for name, fn in fns.items()}, a.repeats, warmup=1, device=W.device)
    peaks = {}
    for name in fns:
        out = subprocess.run([sys.executable, __file__, '--positions', str(a.positions), '--chunk', str(a.chunk), '--one',
                              f"{name}-{'trained' if train_w else 'frozen'}"], capture_output=True, text=True)
        line = next((l for l in out.stdout.splitlines() if l.startswith('RESULT ')), None)
        if line is None: sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
        peaks[name] = json.loads(line[7:])['peak_mib']
    rows.append((train_w, saved, secs, peaks))

V, d = W.shape
mem = 'CUDA peak above the step\'s start (MiB)' if W.is_cuda else 'peak RSS growth during the step (MiB)'
lines = ["# The output head in chunks: time and memory", "", header(load0), "",
         f"SmolLM2-135M's output layer ({V} x {d}, float32), {a.positions} labelled positions, chunks of {a.chunk}, "
         f"forward + backward of the sum of the log-probabilities; seconds are medians of {a.repeats} interleaved runs "
         f"after a warm-up. The float32 logits of these positions are {a.positions * V * 4 / 2**20:.0f} MiB.", "",
         f"| head weight | method | seconds | saved for backward (MiB) | {mem} |", "|---|---|---:|---:|---:|"]
for train_w, saved, secs, peaks in rows:
    for name in fns:
        lines.append(f"| {'trained' if train_w else 'frozen'} | {name} | {secs[name]:.3f} | {saved[name]:.1f} | {peaks[name]:.0f} |")
lines.append("")
for train_w, saved, secs, peaks in rows:
    lines.append(f"- head {'trained' if train_w else 'frozen'}: chunked / plain time {secs['chunked'] / secs['plain']:.2f}, "
                 f"saved bytes {saved['chunked'] / saved['plain']:.3f}, peak {peaks['chunked'] / max(peaks['plain'], 1e-9):.2f}.")
lines += ["", "With the weight trained the chunked head computes one more product of the head's size (the recomputed logits), "
          "so it costs up to 4/3 of the plain head's matrix products; with the weight frozen it computes the same two "
          "products as the plain head (logits, and the input's gradient direction) and keeps no logits."]
text = '\n'.join(lines) + '\n'
print(text)
(Path(__file__).parent / 'head.md').write_text(text)
