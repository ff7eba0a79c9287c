"""Greedy decoding on the real model: ftcourse.generate vs transformers' model.generate, with and without the KV cache.
Prints a markdown table (seconds, ms per token, ratios); asserts both produce the same tokens.
Usage: python bench/generate_kv_cache.py [--new 48] [--reps 2] [--threads N]"""
import argparse, os, platform, time
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import torch
from ftcourse.core import load_model
from ftcourse.generate import generate

ap = argparse.ArgumentParser()
ap.add_argument('--new', type=int, default=48); ap.add_argument('--reps', type=int, default=2)
ap.add_argument('--threads', type=int, default=0)
a = ap.parse_args()
if a.threads: torch.set_num_threads(a.threads)
model, tok = load_model()
prompt = tok("Once upon a time, in a small village by the sea, there lived", return_tensors='pt')['input_ids']

def best(f):
    out, t = None, float('inf')
    for _ in range(a.reps):
        t0 = time.perf_counter(); out = f(); t = min(t, time.perf_counter() - t0)
    return out, t

rows, outs = [], {}
for uc in [True, False]:
    mine, tm = best(lambda: generate(model, prompt, a.new, use_cache=uc))
    ref, th = best(lambda: model.generate(prompt, do_sample=False, max_new_tokens=a.new, use_cache=uc))
    assert torch.equal(mine, ref), "ftcourse.generate and model.generate disagree"
    n = mine.shape[1] - prompt.shape[1]
    rows.append((uc, n, tm, th)); outs[uc] = mine
assert torch.equal(outs[True], outs[False])
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, load avg {os.getloadavg()[0]:.1f}; "
      f"prompt {prompt.shape[1]} tokens, greedy, best of {a.reps}\n")
print("| KV cache | new tokens | ftcourse s | transformers s | ftcourse ms/token | ratio ftcourse/transformers |")
print("|---|---|---|---|---|---|")
for uc, n, tm, th in rows: print(f"| {'yes' if uc else 'no'} | {n} | {tm:.2f} | {th:.2f} | {tm/n*1e3:.0f} | {tm/th:.2f} |")
(_, n, c, _), (_, _, nc, _) = rows
print(f"\nspeed-up from the cache (ftcourse): {nc/c:.1f}x")
