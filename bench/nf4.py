"""Benchmark: ftcourse.quant NF4 quantize/dequantize vs bitsandbytes' CPU kernels, on the same tensors, in one run;
then a training step through a 4-bit layer (forward + backward of NF4Linear vs bitsandbytes' Linear4bit in training mode).
Run: python bench/nf4.py  (writes nothing; copy the tables into bench/nf4.md)."""
import time, platform, os
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import torch
import bitsandbytes as bnb, bitsandbytes.functional as bnbF
from ftcourse.quant import quantize_nf4, dequantize_nf4, NF4Linear

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

def linear4bit(lin):
    "bitsandbytes' Linear4bit (NF4, double quantization, fp32 compute) holding `lin`'s weight, in training mode."
    ref = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.float32, quant_type='nf4',
                            compress_statistics=True)
    ref.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type='nf4',
                                   compress_statistics=True, blocksize=64)
    return ref.to('cpu').train()

def train_step():
    "Forward + backward through one frozen 4-bit layer (input needs a gradient, as under LoRA): ours vs bitsandbytes."
    from ftcourse.checkpoint import SavedTensors
    print('| layer (out x in), input rows | fwd+bwd ours ms | fwd+bwd bnb ms | ours/bnb | saved for backward, ours | fp32 weight |')
    print('|---|---|---|---|---|---|')
    torch.manual_seed(0)
    for (d_out, d_in), rows in [((1536, 576), 512), ((576, 1536), 512), ((4096, 4096), 512)]:
        lin = torch.nn.Linear(d_in, d_out, bias=False)
        ours, ref = NF4Linear.from_linear(lin), linear4bit(lin)
        x = torch.randn(rows, d_in, requires_grad=True)
        g = torch.randn(rows, d_out)
        y_o, y_b = ours(x), ref(x)
        assert torch.equal(y_o, y_b)
        with SavedTensors() as st: ours(x)
        t_o = best_of(lambda: ours(x).backward(g))
        t_b = best_of(lambda: ref(x).backward(g))
        print(f'| {d_out}x{d_in}, {rows} | {t_o:.1f} | {t_b:.1f} | {t_o/t_b:.2f} | {st.unique/2**20:.2f} MiB | {4*d_out*d_in/2**20:.2f} MiB |')

if __name__ == '__main__':
    main()
    train_step()
