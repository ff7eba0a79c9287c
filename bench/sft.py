"""Our SFT loop (ftcourse.train + ftcourse.sft) against trl's SFTTrainer on the same work: the default model, the same
rows in the same order, full fine-tuning, batch 4, AdamW lr 5e-5, 2 warmup steps then cosine, clipping at 1.0, N steps.
Both in fp32, and both under bf16 autocast where the CPU runs bf16 natively (`fast_bf16`). Prints steps per second of each,
their ratio, the bytes each loss saves for backward, the loss of each at every step, and where our step's time goes (collate, forward and loss, backward, clipping
and optimizer); writes bench/sft.md.

    python bench/sft.py [--steps 10] [--repeats 3]
"""
import argparse, os, platform, statistics, tempfile, time
from pathlib import Path
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import torch
from torch.utils.data import SequentialSampler
from datasets import Dataset
from ftcourse.core import load_model, load_course_dataset, set_seed, fast_bf16, autocast
from ftcourse.sft import sft_dataset, collate_sft, sft_loss_fn
from ftcourse.train import TrainConfig, train

p = argparse.ArgumentParser(); p.add_argument('--steps', type=int, default=10); p.add_argument('--batch', type=int, default=4)
p.add_argument('--repeats', type=int, default=1, help='rounds of (ours, trl), alternating; medians are reported')
args = p.parse_args()
N, B, LR, WARM = args.steps, args.batch, 5e-5, 2
rows = load_course_dataset('sft', 'train').select(range(N * B))

def ours(precision):
    model, tok = load_model(); set_seed(0)
    exs, _ = sft_dataset(rows, tok, 128, verbose=False)
    cfg = TrainConfig(steps=N, batch_size=B, lr=LR, warmup_steps=WARM, max_grad_norm=1.0, eval_every=0, shuffle=False, progress=False,
                      mixed_precision=precision)   # pinned: the default 'auto' is bf16 on a CPU with native bf16
    t = time.perf_counter(); h = train(model, sft_loss_fn, exs, cfg, collate_fn=collate_sft(tok)); dt = time.perf_counter() - t
    return dt, [r['loss'] for r in h]

def breakdown(precision, steps=4):
    "Seconds per step in each phase of our step, measured by hand on the same batches (median over `steps`)."
    model, tok = load_model(); set_seed(0); model.train()
    exs, _ = sft_dataset(rows, tok, 128, verbose=False)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    phases = {k: [] for k in ('collate', 'forward + loss', 'backward', 'clip + AdamW step')}
    for i in range(steps):
        t0 = time.perf_counter(); b = collate_sft(tok)(exs[i * B:(i + 1) * B])
        t1 = time.perf_counter()
        with autocast('cpu', precision): loss, _ = sft_loss_fn(model, b)
        t2 = time.perf_counter(); loss.backward()
        t3 = time.perf_counter(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)): phases[k].append(dt)
    return {k: statistics.median(v) for k, v in phases.items()}

def saved_mib(precision):
    "MiB autograd saves for backward in one loss on the first batch (weights excluded), ours and trl's: {'ours': .., 'trl': ..}."
    from trl import SFTTrainer, SFTConfig
    from ftcourse.checkpoint import SavedTensors
    model, tok = load_model(); set_seed(0); model.train()
    exs, _ = sft_dataset(rows, tok, 128, verbose=False)
    out = {}
    with SavedTensors(exclude=model) as st, autocast('cpu', precision): sft_loss_fn(model, collate_sft(tok)(exs[:B]))
    out['ours'] = st.unique / 2**20
    pc = Dataset.from_list([dict(prompt=r['messages'][:-1], completion=r['messages'][-1:]) for r in rows])
    with tempfile.TemporaryDirectory() as d:
        tr = SFTTrainer(model=model, args=SFTConfig(output_dir=d, max_length=128, per_device_train_batch_size=B, report_to=[],
                                                    use_cpu=True, bf16=precision == 'bf16', dataset_num_proc=None),
                        train_dataset=pc, processing_class=tok)
        batch = tr.data_collator([tr.train_dataset[i] for i in range(B)])
        with SavedTensors(exclude=model) as st, autocast('cpu', precision): tr.compute_loss(model, batch)
    out['trl'] = st.unique / 2**20
    return out

def trl_(precision):
    from trl import SFTTrainer, SFTConfig
    model, tok = load_model(); set_seed(0)
    pc = Dataset.from_list([dict(prompt=r['messages'][:-1], completion=r['messages'][-1:]) for r in rows])
    with tempfile.TemporaryDirectory() as d:
        cfg = SFTConfig(output_dir=d, max_length=128, per_device_train_batch_size=B, max_steps=N, learning_rate=LR,
                        warmup_steps=WARM, lr_scheduler_type='cosine', max_grad_norm=1.0, weight_decay=0.0, optim='adamw_torch',
                        logging_steps=1, save_strategy='no', report_to=[], use_cpu=True, bf16=precision == 'bf16', seed=0,
                        disable_tqdm=True, dataset_num_proc=None)
        tr = SFTTrainer(model=model, args=cfg, train_dataset=pc, processing_class=tok)
        tr._get_train_sampler = lambda *a, **k: SequentialSampler(tr.train_dataset)   # the same order as ours
        t = time.perf_counter(); tr.train(); dt = time.perf_counter() - t
        return dt, [r['loss'] for r in tr.state.log_history if 'loss' in r]

precisions = ['no', 'bf16'] if fast_bf16('cpu') else ['no']
name = {'no': 'fp32', 'bf16': 'bf16 autocast'}
lines = [f"# SFT loop vs trl SFTTrainer", "",
         f"Same model (SmolLM2-135M-Instruct, offline copy), same {N * B} rows in order, full fine-tuning, batch {B}, max_len 128, AdamW lr {LR}, "
         f"{WARM} warmup steps + cosine, clip 1.0, {N} steps on CPU, at equal precision: both fp32"
         + (", then both under bf16 autocast (this CPU runs bf16 natively)" if len(precisions) > 1 else "") + ". "
         f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
         f"load average {os.getloadavg()[0]:.2f} at the start. Seconds: median of {args.repeats} alternating runs of each. "
         f"Run: `python bench/sft.py --steps {N} --repeats {args.repeats}`.", ""]
for prec in precisions:
    rounds = [(ours(prec), trl_(prec)) for _ in range(args.repeats)]   # alternating, so load from other jobs hits both alike
    t_ours, t_trl = statistics.median(o[0] for o, _ in rounds), statistics.median(t[0] for _, t in rounds)
    l_ours, l_trl = rounds[0][0][1], rounds[0][1][1]
    ratio = (N / t_ours) / (N / t_trl)
    diffs = [abs(a - b) for a, b in zip(l_ours, l_trl)]
    parts, mem = breakdown(prec), saved_mib(prec)
    lines += [f"## {name[prec]}", "", "| | seconds | steps/s |", "|---|---|---|",
              f"| ours (ftcourse.train) | {t_ours:.1f} | {N / t_ours:.3f} |", f"| trl SFTTrainer | {t_trl:.1f} | {N / t_trl:.3f} |", "",
              f"**Speed ratio (ours / trl, steps per second), {name[prec]}: {ratio:.2f}**", "",
              f"Memory: autograd saves {mem['ours']:.1f} MiB for backward in our loss on the first batch and {mem['trl']:.1f} MiB "
              f"in trl's `compute_loss` on the same rows (the model's weights excluded; ours/trl {mem['ours'] / mem['trl']:.2f}).", "",
              "Where our step's time goes (seconds, median of 4 steps measured by hand outside the loop):", "",
              "| phase | seconds | share |", "|---|---|---|"]
    lines += [f"| {k} | {v:.3f} | {v / sum(parts.values()):.0%} |" for k, v in parts.items()]
    lines += ["", "| step | loss ours | loss trl | abs. difference |", "|---|---|---|---|"]
    lines += [f"| {i + 1} | {a:.6f} | {b:.6f} | {abs(a - b):.1e} |" for i, (a, b) in enumerate(zip(l_ours, l_trl))]
    lines += ["", f"Largest loss difference: {max(diffs):.1e}.", ""]
lines += ["trl logs its loss rounded and computes log-probabilities through its fused LM head (a different summation order), so "
          "the runs agree to float rounding at step 1 and drift slowly after (the optimizer amplifies rounding differences; "
          "more so in bf16). `sft_loss_fn` computes logits only over the answer span (chapter 2a); trl computes them at "
          "every position."]
text = '\n'.join(lines) + '\n'
print(text)
(Path(__file__).parent/'sft.md').write_text(text)
