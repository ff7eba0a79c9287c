"""Benchmark: ftcourse.quant NF4 quantize/dequantize vs bitsandbytes' CPU kernels, on the same tensors, in one run.
Run: python bench/nf4.py  (writes nothing; copy the table into bench/nf4.md)."""
import time, platform, os
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import torch
import bitsandbytes as bnb, bitsandbytes.functional as bnbF
from ftcourse.quant import quantize_nf4, dequantize_nf4

torch._dynamo.config.disable = True

def best_of(f, min_n=5, budget_s=2.0, max_n=50):
    "Best wall time (ms) of at least `min_n` calls after a warm-up, repeating up to `budget_s` seconds: the minimum is the least noisy statistic on a shared machine."
    f(); ts = []; t0 = time.perf_counter()
    while len(ts) < min_n or (time.perf_counter() - t0 < budget_s and len(ts) < max_n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return 1000 * min(ts)

def tensors():
    torch.manual_seed(0)
    yield 'random 4096x4096 fp32', torch.randn(4096, 4096) * 0.02
    yield 'random 4096x4096 bf16', (torch.randn(4096, 4096) * 0.02).bfloat16()
    try:
        from ftcourse.core import load_model
        m, _ = load_model()
        for n in ['model.layers.0.mlp.gate_proj.weight', 'model.layers.0.mlp.down_proj.weight']:
            yield f'SmolLM2 {n.split("layers.0.")[1]} {tuple(m.get_parameter(n).shape)}', m.get_parameter(n).detach()
    except Exception as e: print('real model skipped:', e)

def main():
    print(f'torch {torch.__version__}, bitsandbytes {bnb.__version__}, {platform.processor() or platform.machine()}, threads {torch.get_num_threads()}')
    rows = []
    for name, w in tensors():
        for dq in [False, True]:
            q, s = bnbF.quantize_4bit(w, blocksize=64, quant_type='nf4', compress_statistics=dq)
            p, st = quantize_nf4(w, 64, dq)
            assert torch.equal(p, q)
            tq_b = best_of(lambda: bnbF.quantize_4bit(w, blocksize=64, quant_type='nf4', compress_statistics=dq))
            tq_o = best_of(lambda: quantize_nf4(w, 64, dq))
            td_b = best_of(lambda: bnbF.dequantize_4bit(q, s))
            td_o = best_of(lambda: dequantize_nf4(p, st))
            rows.append((name, dq, tq_o, tq_b, td_o, td_b))
    print('| tensor | double quant | quantize ours ms | quantize bnb ms | ours/bnb | dequantize ours ms | dequantize bnb ms | ours/bnb |')
    print('|---|---|---|---|---|---|---|---|')
    for name, dq, a, b, c, d in rows:
        print(f'| {name} | {dq} | {a:.1f} | {b:.1f} | {a/b:.2f} | {c:.1f} | {d:.1f} | {c/d:.2f} |')

if __name__ == '__main__': main()
