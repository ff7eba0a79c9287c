"""fp32 against bf16 autocast on this CPU, on the same work: a LoRA SFT step, a LoRA DPO step and a QLoRA SFT step of
the default model. For each: the median seconds per step of each precision (runs interleaved, repeated), their ratio,
and the loss gap between the two runs at every step (same initial adapters, same data in the same order).
Writes bench/precision.md.

    python bench/precision.py [--steps 8] [--repeats 2]
"""
import argparse, os, platform, statistics, time
from pathlib import Path
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import torch
import transformers
from ftcourse.core import load_model, load_course_dataset, set_seed, fast_bf16
from ftcourse.lora import apply_lora
from ftcourse.quant import quantize_lora_bases
from ftcourse.sft import sft_dataset, collate_sft, sft_loss_fn, preference_dataset
from ftcourse.dpo import collate_dpo, dpo_loss_fn, precompute_ref_logps
from ftcourse.train import TrainConfig, train
from _timing import is_loaded, load_average

parser = argparse.ArgumentParser()
parser.add_argument('--steps', type=int, default=8)
parser.add_argument('--repeats', type=int, default=2)
args = parser.parse_args()

WORKLOADS = {  # name: (data kind, sequences or pairs per step, learning rate, QLoRA)
    'LoRA SFT, 4 x 128 tokens': ('sft', 4, 1e-3, False),
    'LoRA DPO, 2 pairs': ('dpo', 2, 5e-4, False),
    'QLoRA SFT, 4 x 128 tokens': ('sft', 4, 1e-3, True),
}

def one_run(kind:str, batch:int, lr:float, qlora:bool, precision:str) -> tuple[float, list[float]]:
    "Median seconds per step (the first step left out: warm-up) and the loss at every step."
    model, tok = load_model()
    set_seed(0)                                   # the same initial adapters in both precisions
    apply_lora(model, r=8, alpha=16, target_modules='all-linear')
    if qlora: quantize_lora_bases(model)
    if kind == 'sft':
        rows = load_course_dataset('sft', 'train').select(range(args.steps * batch))
        examples, _ = sft_dataset(rows, tok, 128, verbose=False)
        loss_fn, collate = sft_loss_fn, collate_sft(tok)
    else:
        rows = load_course_dataset('preference', 'train').select(range(args.steps * batch))
        examples = precompute_ref_logps(model, preference_dataset(rows, tok, 128, verbose=False)[0], tok)
        loss_fn, collate = dpo_loss_fn(0.1), collate_dpo(tok)
    cfg = TrainConfig(steps=args.steps, batch_size=batch, lr=lr, warmup_steps=1, eval_every=0, shuffle=False,
                      progress=False, mixed_precision=precision)
    hist = train(model, loss_fn, examples, cfg, collate_fn=collate)
    seconds = [r['seconds'] for r in hist if 'seconds' in r][1:]
    return statistics.median(seconds), [r['loss'] for r in hist if 'loss' in r]

load_before = load_average()
rows, t0 = [], time.time()
for name, (kind, batch, lr, qlora) in WORKLOADS.items():
    times = {'no': [], 'bf16': []}
    losses = {}
    for _ in range(args.repeats):
        for precision in ('no', 'bf16'):         # interleaved: a change in the machine's load hits both alike
            sec, loss = one_run(kind, batch, lr, qlora, precision)
            times[precision].append(sec)
            losses[precision] = loss
    fp32, bf16 = statistics.median(times['no']), statistics.median(times['bf16'])
    gaps = [abs(a - b) for a, b in zip(losses['no'], losses['bf16'])]
    rel = max(g / abs(a) for g, a in zip(gaps, losses['no']))
    rows.append((name, fp32, bf16, fp32 / bf16, gaps[0], max(gaps), rel, losses['no'][-1], losses['bf16'][-1]))
    print(f"{name}: fp32 {fp32:.2f} s/step, bf16 {bf16:.2f} s/step ({fp32 / bf16:.2f}x); "
          f"loss gap first step {gaps[0]:.1e}, largest {max(gaps):.1e} ({rel:.1%})", flush=True)
load_after = load_average()

loaded = is_loaded(max(load_before, load_after))   # the bench's own threads count too: above the core count
lines = ["# fp32 against bf16 autocast on the CPU", "",
         f"Measured {time.strftime('%Y-%m-%d')} by `python bench/precision.py --steps {args.steps} --repeats {args.repeats}` "
         f"in {time.time() - t0:.0f} s. Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
         f"torch {torch.__version__} with {torch.get_num_threads()} threads, transformers {transformers.__version__}; "
         f"native bf16 on this CPU: {fast_bf16('cpu')}. Load average {load_before:.1f} before, {load_after:.1f} after"
         + (" — **a loaded machine: the seconds are upper bounds, the ratios noisier than on an idle one**." if loaded else "."),
         "",
         "The default model (SmolLM2-135M-Instruct), LoRA r=8 on every linear layer (QLoRA: the frozen bases in NF4), "
         f"{args.steps} steps from the same initial adapters on the same data in the same order; each precision "
         f"run {args.repeats} times, interleaved; seconds per step are medians without the first step.", "",
         "| workload | fp32 s/step | bf16 s/step | speed-up | loss gap, step 1 | largest loss gap | relative | final loss fp32 | final loss bf16 |",
         "|---|---|---|---|---|---|---|---|---|"]
lines += [f"| {n} | {a:.2f} | {b:.2f} | **{r:.2f}×** | {g1:.1e} | {g:.1e} | {rel:.2%} | {fa:.4f} | {fb:.4f} |"
          for n, a, b, r, g1, g, rel, fa, fb in rows]
growth = max(g / max(g1, 1e-12) for _, _, _, _, g1, g, *_ in rows)
lines += ["", "The weights, the adapters and AdamW stay in fp32 in both runs; only the matrix products round to bf16. "
          f"Across the workloads the largest loss gap over the {args.steps} steps is at most {growth:.1f} times the first "
          "step's gap."]
text = '\n'.join(lines) + '\n'
print(text)
Path(__file__).with_suffix('.md').write_text(text)
