"""Gradient checkpointing's time overhead on SmolLM2-135M (CPU, float32): ours vs transformers vs theory, in one run.

Usage: python bench/checkpointing.py [--tokens 64] [--batch 1] [--repeats 3] > bench/checkpointing.md
Runs are interleaved (one of each setup per round, after a warm-up round) so that load from other
processes affects every setup alike; the table reports medians."""
import argparse, collections, contextlib, os, platform, sys, time
from pathlib import Path
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import torch, transformers
from torch.utils._python_dispatch import TorchDispatchMode
sys.path.insert(0, str(Path(__file__).parent))
from _timing import header, load_average
from ftcourse.core import load_model
from ftcourse.checkpoint import (checkpoint_layers, checkpoint_segments, hf_checkpointing, fwd_bwd_seconds,
                                 saved_tensor_bytes, decoder_layers)

class OpCounter(TorchDispatchMode):
    "Counts every aten operation dispatched (forward, recomputation and backward), by name."
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))

def op_counts(model, ids, setup):
    with setup(model), OpCounter() as c:
        model(ids, labels=ids, use_cache=False).loss.backward()
    model.zero_grad(set_to_none=True)
    return c.counts

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--tokens', type=int, default=64); ap.add_argument('--batch', type=int, default=1)
    ap.add_argument('--repeats', type=int, default=3)
    a = ap.parse_args()
    load0 = load_average()
    if os.getloadavg()[0] > (os.cpu_count() or 1): torch.set_num_threads(1)   # oversubscribed: OpenMP threads would spin-wait
    model, _ = load_model(); model.train()
    ids = torch.randint(0, model.config.vocab_size, (a.batch, a.tokens), generator=torch.Generator().manual_seed(0))
    n = len(decoder_layers(model))
    layer_params = sum(p.numel() for l in decoder_layers(model) for p in l.parameters())
    f = layer_params / (layer_params + model.lm_head.weight.numel())   # share of forward matmul FLOPs in the layers
    setups = {
        'none':                     (lambda m: contextlib.nullcontext(), 1.0),
        'ours, every layer':        (checkpoint_layers, 1 + f/3),
        'transformers, every layer':(hf_checkpointing, 1 + f/3),
        'ours, every 2nd layer':    (lambda m: checkpoint_layers(m, every=2), 1 + f/3 * len(range(0, n, 2))/n),
        'ours, segments of 5':      (lambda m: checkpoint_segments(m, 5), 1 + f/3),
    }
    def fwd(m, x): return m(x, labels=x, use_cache=False)
    mem = {}
    for name, (setup, _) in setups.items():
        with setup(model): mem[name] = saved_tensor_bytes(fwd, model, ids, exclude=model)['unique']
    ops = {name: op_counts(model, ids, setups[name][0]) for name in ('none', 'ours, every layer', 'transformers, every layer')}
    t0 = time.time()
    secs = fwd_bwd_seconds(model, ids, {k: v[0] for k, v in setups.items()}, repeats=a.repeats, warmup=1)
    print(f"# Gradient checkpointing: measured time overhead vs theory\n")
    print(header(load0) + "\n")
    print(f"SmolLM2-135M-Instruct, float32, CPU ({platform.machine()}, {torch.get_num_threads()} threads), "
          f"batch {a.batch} x {a.tokens} tokens, forward+backward, median of {a.repeats} interleaved runs after a warm-up "
          f"({time.time()-t0:.0f} s). torch {torch.__version__}, transformers {transformers.__version__}. "
          f"Theory: backward = 2 x forward, so recomputing a fraction f of the forward costs 1 + f/3; "
          f"f = {f:.2f} = decoder-layer parameters / (layers + output layer), the rule of thumb f = 1 gives 1.33.\n")
    print("| setup | saved for backward (MB) | fwd+bwd (s) | time vs none | theory |")
    print("|---|---:|---:|---:|---:|")
    for name, (_, th) in setups.items():
        print(f"| {name} | {mem[name]/1e6:.1f} | {secs[name]:.2f} | {secs[name]/secs['none']:.2f}x | {th:.2f}x |")
    print(f"\nours / transformers (every layer): {secs['ours, every layer']/secs['transformers, every layer']:.2f}x time, "
          f"{mem['ours, every layer']/mem['transformers, every layer']:.3f}x saved bytes.")
    same = ops['ours, every layer'] == ops['transformers, every layer']
    print(f"\nOperations dispatched in one forward + backward (aten ops, counted by a TorchDispatchMode): none "
          f"{sum(ops['none'].values())}, ours {sum(ops['ours, every layer'].values())}, transformers "
          f"{sum(ops['transformers, every layer'].values())}; ours and transformers run "
          f"{'the same operations, op for op in count' if same else 'different operations'}. Both call "
          "`torch.utils.checkpoint.checkpoint(..., use_reentrant=False)` on each layer's forward with only the hidden state "
          "positional and save and restore the RNG state alike, so a difference between their times is measurement noise "
          "(other jobs on the machine), not work: rerun to see it move.")

if __name__ == '__main__': main()
