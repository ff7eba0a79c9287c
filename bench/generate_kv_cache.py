"""Greedy decoding on the real model: ftcourse.generate vs transformers' model.generate, with and without the KV cache.
Prints a markdown table (seconds, ms per token, ratios); asserts both produce the same tokens.
Usage: python bench/generate_kv_cache.py [--new 48] [--reps 2] [--threads N]"""
import argparse, os
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import torch
from ftcourse.core import load_model
from ftcourse.generate import generate
from _timing import interleaved_medians, header, load_average

ap = argparse.ArgumentParser()
ap.add_argument('--new', type=int, default=48); ap.add_argument('--reps', type=int, default=2)
ap.add_argument('--threads', type=int, default=0)
a = ap.parse_args()
if a.threads: torch.set_num_threads(a.threads)
model, tok = load_model()
prompt = tok("Once upon a time, in a small village by the sea, there lived", return_tensors='pt')['input_ids']

rows, outs, load0 = [], {}, load_average()
for uc in [True, False]:
    mine = generate(model, prompt, a.new, use_cache=uc)
    ref = model.generate(prompt, do_sample=False, max_new_tokens=a.new, use_cache=uc)
    t = interleaved_medians({'ours': lambda: generate(model, prompt, a.new, use_cache=uc),
                             'hf': lambda: model.generate(prompt, do_sample=False, max_new_tokens=a.new, use_cache=uc)},
                            repeats=a.reps, warmup=1)
    tm, th = t['ours'], t['hf']
    assert torch.equal(mine, ref), "ftcourse.generate and model.generate disagree"
    n = mine.shape[1] - prompt.shape[1]
    rows.append((uc, n, tm, th)); outs[uc] = mine
assert torch.equal(outs[True], outs[False])
print("# Greedy decoding with and without the KV cache: ftcourse.generate vs transformers\n")
print(header(load0) + f" Prompt {prompt.shape[1]} tokens, greedy, median of {a.reps} interleaved runs after a warm-up; "
      "both produce identical tokens (asserted).\n")
print("| KV cache | new tokens | ftcourse s | transformers s | ftcourse ms/token | ratio ftcourse/transformers |")
print("|---|---|---|---|---|---|")
for uc, n, tm, th in rows: print(f"| {'yes' if uc else 'no'} | {n} | {tm:.2f} | {th:.2f} | {tm/n*1e3:.0f} | {tm/th:.2f} |")
(_, n, c, _), (_, _, nc, _) = rows
print(f"\nspeed-up from the cache (ftcourse): {nc/c:.1f}x")
