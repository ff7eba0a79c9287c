"""Benchmark: ftcourse.lora (LoRALinear / apply_lora) vs peft, forward + backward on the same model and input.

Run: python bench/lora.py [--device cpu|cuda] [--reps N] [--md bench/lora.md]
Both sides get identical weights, adapters and inputs; timings are interleaved (ours, peft, ours, peft, ...) so that
load on a shared machine hits both alike, and the median is reported. The outputs are checked equal before timing.
"""
import argparse, copy, os, platform
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import torch, transformers, peft
from torch import nn
from peft import LoraConfig, get_peft_model
from ftcourse.core import set_seed
from _timing import interleaved_medians, header, load_average
from ftcourse.lora import LoRALinear, apply_lora, copy_lora_from_peft, peft_lora_layer, count_trainable, as_config, SMOLLM2_135M

def interleaved(fa, fb, device, reps):
    "Median seconds of ours (fa) and peft (fb), alternating, after a warm-up round."
    m = interleaved_medians({'ours': fa, 'peft': fb}, reps, warmup=1, device=device)
    return m['ours'], m['peft']

def bench_layer(device, reps, d_in=576, d_out=1536, r=16, tokens=4 * 128):
    set_seed(0)
    base = nn.Linear(d_in, d_out, bias=False).to(device)
    ours, theirs = LoRALinear(copy.deepcopy(base), r, 2 * r), peft_lora_layer(copy.deepcopy(base), r, 2 * r)
    with torch.no_grad():
        ours.lora_B.normal_(); theirs.lora_A['default'].weight.copy_(ours.lora_A); theirs.lora_B['default'].weight.copy_(ours.lora_B)
    x = torch.randn(tokens, d_in, device=device, requires_grad=True)
    assert (ours(x) - theirs(x)).abs().max() <= 1e-5
    def step(layer):
        def f():
            layer.zero_grad(set_to_none=True); x.grad = None
            layer(x).square().mean().backward()
        return f
    return interleaved(step(ours), step(theirs), device, reps)

def bench_model(device, reps, targets, r, batch=4, seq=128):
    from transformers import AutoModelForCausalLM
    set_seed(0)  # SmolLM2-135M's architecture with random weights: timing does not depend on the values, and no download
    m1 = AutoModelForCausalLM.from_config(as_config(SMOLLM2_135M)).to(device); m2 = copy.deepcopy(m1)
    apply_lora(m1, r=r, alpha=2 * r, target_modules=targets)
    p2 = get_peft_model(m2, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets if isinstance(targets, str) else list(targets)))
    for n, p in p2.named_parameters():
        if 'lora_B' in n: nn.init.normal_(p, std=0.01)
    copy_lora_from_peft(m1, p2)
    assert count_trainable(m1) == p2.get_nb_trainable_parameters()[0]
    m1.train(); p2.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, m1.config.vocab_size, (batch, seq), generator=g).to(device)
    with torch.no_grad(): assert (m1(input_ids=ids).logits - p2(input_ids=ids).logits).abs().max() <= 1e-3
    def step(model):
        def f():
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
        return f
    res = interleaved(step(m1), step(p2), device, reps)
    del m1, m2, p2
    return res

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--reps', type=int, default=5)
    ap.add_argument('--md', default=None, help='also write the table to this markdown file')
    a = ap.parse_args()
    device = torch.device(a.device)
    dev_name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    rows, load0 = [], load_average()
    ly = bench_layer(device, a.reps * 10)
    rows.append(("Linear 576->1536, r=16, 512 tokens, fwd+bwd", *ly))
    for targets, r, label in ((('q_proj', 'v_proj'), 8, 'q,v r=8'), ('all-linear', 16, 'all-linear r=16')):
        mo = bench_model(device, a.reps, targets, r)
        rows.append((f"SmolLM2-135M arch. {label}, 4x128 tokens, fwd+bwd", *mo))
    lines = [f"# LoRA: ftcourse.lora vs peft (forward + backward)", "",
             f"Device: {dev_name}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; fp32; "
             f"median of interleaved repeats ({a.reps * 10} for the layer, {a.reps} for the model).", "", header(load0), "",
             "| case | ours (ms) | peft (ms) | ours / peft |", "|---|---:|---:|---:|"]
    lines += [f"| {c} | {o*1e3:.2f} | {p*1e3:.2f} | {o/p:.2f} |" for c, o, p in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.md:
        with open(a.md, 'w') as f: f.write(text)

if __name__ == '__main__': main()
