"""Benchmark: ftcourse.quant NF4 quantize/dequantize vs bitsandbytes' CPU kernels, on the same tensors, in one run;
then a training step through a 4-bit layer (forward + backward of NF4Linear vs bitsandbytes' Linear4bit in training mode).
Run: python bench/nf4.py > bench/nf4.md  (bench/run_all.py does this)."""
import math, os
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import torch
import bitsandbytes as bnb, bitsandbytes.functional as bnbF
from _timing import interleaved_medians, header, load_average
from ftcourse.quant import quantize_nf4, dequantize_nf4, NF4Linear

torch._dynamo.config.disable = True   # bitsandbytes' CPU backend would torch.compile its own ops: measure them as shipped, eager

REPEATS = 7

def pair_ms(ours, theirs, repeats=None):
    "Median milliseconds of ours and of bitsandbytes, timed interleaved (ours, bnb, ours, ...) after a warm-up round."
    m = interleaved_medians({'ours': ours, 'bnb': theirs}, repeats or REPEATS, warmup=1)
    return 1000 * m['ours'], 1000 * m['bnb']

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

def compiled_dequantize(st):
    "torch.compile of the same arithmetic (byte -> pair of float32 levels, times the block scale, rounded once), or None."
    from ftcourse.quant import nf4_absmax
    pairs = torch.stack([st.code[torch.arange(256) >> 4], st.code[torch.arange(256) & 15]], 1).float()
    am, dt, bs = nf4_absmax(st), st.dtype, st.blocksize
    try:
        f = torch.compile(lambda p: (pairs[p.reshape(-1).long()].view(-1, bs) * am[:, None]).to(dt).view(st.shape), dynamic=False)
        def run(p):
            with torch._dynamo.config.patch(disable=False): return f(p)
        run(torch.zeros(math.prod(st.shape) // 2, dtype=torch.uint8))   # compile now, outside the timing
        return run
    except Exception as e:
        print('torch.compile unavailable:', type(e).__name__)
        return None

def main():
    print('# NF4 benchmark: ftcourse.quant vs bitsandbytes (CPU)\n')
    print(header(LOAD0) + f' Medians of {REPEATS} interleaved calls after a warm-up (3 for quantize and the layer).\n')
    rows, floor = [], []
    for name, w in tensors():
        for dq in [False, True]:
            q, s = bnbF.quantize_4bit(w, blocksize=64, quant_type='nf4', compress_statistics=dq)
            p, st = quantize_nf4(w, 64, dq)
            assert torch.equal(p, q)
            ref = bnbF.dequantize_4bit(q, s)
            assert torch.equal(dequantize_nf4(p, st), ref.reshape(w.shape))
            tq_o, tq_b = pair_ms(lambda: quantize_nf4(w, 64, dq),
                                 lambda: bnbF.quantize_4bit(w, blocksize=64, quant_type='nf4', compress_statistics=dq), 3)
            td_o, td_b = pair_ms(lambda: dequantize_nf4(p, st), lambda: bnbF.dequantize_4bit(q, s))
            rows.append((name, dq, tq_o, tq_b, td_o, td_b))
            if w.numel() >= 4096 * 4096 and dq:   # the floor: compiled, and a plain copy of the output
                comp = compiled_dequantize(st)
                fns = {'ours': lambda: dequantize_nf4(p, st), 'bnb': lambda: bnbF.dequantize_4bit(q, s), 'copy': lambda: w.clone()}
                if comp is not None and torch.equal(comp(p), ref.reshape(w.shape)): fns['compiled'] = lambda: comp(p)
                floor.append((name, w, {k: 1000 * v for k, v in interleaved_medians(fns, REPEATS, warmup=1).items()}))
    print('| tensor | double quant | quantize ours ms | quantize bnb ms | ours/bnb | dequantize ours ms | dequantize bnb ms | ours/bnb |')
    print('|---|---|---|---|---|---|---|---|')
    for name, dq, a, b, c, d in rows:
        print(f'| {name} | {dq} | {a:.1f} | {b:.1f} | {a/b:.2f} | {c:.1f} | {d:.1f} | {c/d:.2f} |')
    print('\nThe floor, on the 4096 x 4096 rows (double quantization): a dequantization reads n/2 bytes of codes and writes '
          'n values of the output dtype; a plain copy of the output reads and writes n values. GB/s = bytes moved / median time.\n')
    print('| tensor | ours ms | ours compiled ms | bnb ms | copy ms | ours GB/s | compiled GB/s | bnb GB/s | copy GB/s |')
    print('|---|---|---|---|---|---|---|---|---|')
    for name, w, t in floor:
        n, b = w.numel(), w.element_size()
        moved = n / 2 + n * b
        gbs = lambda ms: moved / ms / 1e6
        c = t.get('compiled')
        print(f"| {name} | {t['ours']:.1f} | {'-' if c is None else f'{c:.1f}'} | {t['bnb']:.1f} | {t['copy']:.1f} | "
              f"{gbs(t['ours']):.2f} | {'-' if c is None else f'{gbs(c):.2f}'} | {gbs(t['bnb']):.2f} | {2 * n * b / t['copy'] / 1e6:.2f} |")
    print()

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
        t_o, t_b = pair_ms(lambda: ours(x).backward(g), lambda: ref(x).backward(g), 3)
        print(f'| {d_out}x{d_in}, {rows} | {t_o:.1f} | {t_b:.1f} | {t_o/t_b:.2f} | {st.unique/2**20:.2f} MiB | {4*d_out*d_in/2**20:.2f} MiB |')

if __name__ == '__main__':
    LOAD0 = load_average()
    main()
    train_step()
