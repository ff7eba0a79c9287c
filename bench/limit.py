"""Distance to the machine's limit: this machine's matrix-multiply peak in float32 and bfloat16 on SmolLM2-135M's own
shapes, then a LoRA SFT step's achieved FLOP/s as a fraction of that peak (float32, and bfloat16 autocast).

FLOPs of the step, counted from the shapes: forward 2·N·P for N tokens and the P weights of every matrix product
(decoder layers and the output head), plus attention's 4·B·H·T²·d_head per layer; backward under LoRA computes the
inputs' gradients through the frozen weights (2·N·P again) and the adapters' own (small, counted), and attention's
backward (twice its forward). Timings are medians of interleaved repeats after a warm-up.
Writes bench/limit.md.   python bench/limit.py [--batch 4] [--seq 128] [--repeats 5]"""
import argparse, os, sys
from pathlib import Path
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import torch
sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved, medians, header, load_average, threads_for_load

ap = argparse.ArgumentParser()
ap.add_argument('--batch', type=int, default=4); ap.add_argument('--seq', type=int, default=128)
ap.add_argument('--repeats', type=int, default=5); ap.add_argument('--rank', type=int, default=16)
a = ap.parse_args()

def matmul_peak(shapes, dtype, repeats):
    "GFLOP/s of x (M, K) @ w (K, N) for each (M, K, N), interleaved across shapes."
    g = torch.Generator().manual_seed(0)
    ops = {}
    for M, K, N in shapes:
        x, w = torch.randn(M, K, generator=g).to(dtype), torch.randn(K, N, generator=g).to(dtype)
        ops[(M, K, N)] = (lambda x=x, w=w: x @ w)
    secs = medians(interleaved(ops, repeats, warmup=2))
    return {s: 2 * s[0] * s[1] * s[2] / t / 1e9 for s, t in secs.items()}

def main():
    from ftcourse.core import load_model
    from ftcourse.lora import apply_lora
    load0 = load_average()
    threads_for_load()
    model, _ = load_model()
    cfg = model.config
    d, i, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    hd = d // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd
    N = a.batch * a.seq
    layer_shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, i), (d, i), (i, d)]   # q, k, v, o, gate, up, down (in, out)
    shapes = sorted({(N, k, n) for k, n in layer_shapes} | {(N, d, V)})
    peaks = {dt: matmul_peak(shapes, dt, a.repeats) for dt in (torch.float32, torch.bfloat16)}

    P = L * sum(k * n for k, n in layer_shapes) + d * V
    attn_fwd = L * 4 * a.batch * cfg.num_attention_heads * a.seq ** 2 * hd
    apply_lora(model, r=a.rank, alpha=2 * a.rank, target_modules='all-linear')
    lora_p = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # forward 2NP; backward: inputs' gradients 2NP; adapters: forward 2N·lora_p, backward 4N·lora_p; attention 3x forward
    flops = 4 * N * P + 6 * N * lora_p + 3 * attn_fwd
    model.train()
    ids = torch.randint(0, V, (a.batch, a.seq), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    def step(dtype):
        def f():
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return f
    secs = medians(interleaved({'float32': step(torch.float32), 'bfloat16': step(torch.bfloat16)}, a.repeats, warmup=1))

    lines = ["# Distance to the limit: a LoRA SFT step against this machine's matmul peak", "", header(load0), "",
             f"Matrix multiplies x (M, K) @ w (K, N) on the model's shapes, M = {N} tokens; GFLOP/s = 2MKN / median seconds "
             f"of {a.repeats} interleaved calls after 2 warm-up rounds.", "",
             "| M x K x N | float32 GFLOP/s | bfloat16 GFLOP/s |", "|---|---:|---:|"]
    lines += [f"| {M} x {K} x {Nn} | {peaks[torch.float32][(M, K, Nn)]:.0f} | {peaks[torch.bfloat16][(M, K, Nn)]:.0f} |"
              for M, K, Nn in shapes]
    peak = {dt: max(v.values()) for dt, v in peaks.items()}
    lines += ["", f"LoRA SFT step (r={a.rank}, every linear layer, AdamW), {a.batch} x {a.seq} tokens, forward + backward + "
              f"optimizer step: {flops / 1e9:.0f} GFLOP counted from the shapes ({P / 1e6:.1f}M weights in products, "
              f"{lora_p / 1e6:.2f}M adapter weights).", "",
              "| precision | step seconds | achieved GFLOP/s | peak GFLOP/s (best shape) | fraction of peak |", "|---|---:|---:|---:|---:|"]
    fractions = {}
    for name, dt in (('float32', torch.float32), ('bfloat16', torch.bfloat16)):
        achieved = flops / secs[name] / 1e9
        fractions[name] = achieved / peak[dt]
        lines.append(f"| {name}{' autocast' if dt == torch.bfloat16 else ''} | {secs[name]:.2f} | {achieved:.0f} | "
                     f"{peak[dt]:.0f} | {fractions[name]:.0%} |")
    lines += ["", "The step is more than its matrix products: normalisations, SiLU, softmax and rotary embeddings are "
              "memory-bound, and under bfloat16 autocast every weight is cast from float32 on each use; those do not count "
              "as FLOPs here, so they lower the fraction."]
    text = '\n'.join(lines) + '\n'
    print(text)
    for name, f in fractions.items(): print(f"fraction of the {name} peak: {f:.0%}")
    (Path(__file__).parent / 'limit.md').write_text(text)

if __name__ == '__main__': main()
