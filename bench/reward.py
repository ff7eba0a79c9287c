"""Our reward-model training (ftcourse.reward + ftcourse.train) against trl's RewardTrainer on the same work: the default
model with the same random scalar head, the same tokenized pairs in the same order, full fine-tuning, 4 pairs per step,
AdamW lr 1e-5, 2 warmup steps then cosine, clipping at 1.0, N steps, fp32 on CPU. Prints steps per second of each, their
ratio, and both losses at every step; writes bench/reward.md.

    python bench/reward.py [--steps 8]
"""
import argparse, copy, os, platform, statistics, tempfile, time
from pathlib import Path
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import torch
from torch.utils.data import SequentialSampler
from datasets import Dataset
from transformers import LlamaForSequenceClassification
from ftcourse.core import load_model, load_course_dataset, set_seed
from ftcourse.sft import preference_dataset
from ftcourse.train import TrainConfig
from ftcourse.reward import RewardModel, train_reward

p = argparse.ArgumentParser(); p.add_argument('--steps', type=int, default=8); p.add_argument('--batch', type=int, default=4)
p.add_argument('--repeats', type=int, default=1, help='rounds of (ours, trl), alternating; medians are reported')
p.add_argument('--trl-first', action='store_true', help='run trl first (to see whether the order matters on a busy machine)')
args = p.parse_args()
N, B, LR, WARM = args.steps, args.batch, 1e-5, 2
rows = list(load_course_dataset('preference', 'train').select(range(N * B)))
_, tok = load_model()
exs, _ = preference_dataset(rows, tok, 128, verbose=False)
assert len(exs) == N * B
set_seed(0); head = torch.randn(1, 576) * 0.02                              # one random head for both

def ours():
    model, tok = load_model()
    rm = RewardModel.from_causal_lm(model)
    with torch.no_grad(): rm.head.weight.copy_(head)
    cfg = TrainConfig(steps=N, batch_size=B, lr=LR, warmup_steps=WARM, max_grad_norm=1.0, eval_every=0, shuffle=False, progress=False)
    t = time.perf_counter(); h = train_reward(rm, tok, rows, cfg=cfg, verbose=False); dt = time.perf_counter() - t
    return dt, [r['loss'] for r in h], [r['accuracy'] for r in h]

def trl_():
    from trl import RewardTrainer, RewardConfig
    causal, tok = load_model()
    cfg = copy.deepcopy(causal.config); cfg.num_labels = 1; cfg.pad_token_id = tok.pad_token_id
    sc = LlamaForSequenceClassification(cfg)
    sc.model.load_state_dict(causal.model.state_dict()); del causal
    with torch.no_grad(): sc.score.weight.copy_(head)
    ds = Dataset.from_dict(dict(chosen_ids=[e['chosen_input_ids'] for e in exs], rejected_ids=[e['rejected_input_ids'] for e in exs]))
    with tempfile.TemporaryDirectory() as d:
        c = RewardConfig(output_dir=d, per_device_train_batch_size=B, max_steps=N, learning_rate=LR, warmup_steps=WARM,
                         lr_scheduler_type='cosine', max_grad_norm=1.0, weight_decay=0.0, optim='adamw_torch', logging_steps=1,
                         save_strategy='no', report_to=[], use_cpu=True, bf16=False, seed=0, disable_tqdm=True, max_length=128)
        tr = RewardTrainer(model=sc, args=c, train_dataset=ds, processing_class=tok)
        tr._get_train_sampler = lambda *a, **k: SequentialSampler(tr.train_dataset)   # the same order as ours
        t = time.perf_counter(); tr.train(); dt = time.perf_counter() - t
        logs = [r for r in tr.state.log_history if 'loss' in r]
        return dt, [r['loss'] for r in logs], [r['accuracy'] for r in logs]

load = os.getloadavg()
rounds = []
for _ in range(args.repeats):   # alternating, so load from other jobs hits both alike
    if args.trl_first: t, o = trl_(), ours()
    else: o, t = ours(), trl_()
    rounds.append((o, t))
(_, l_ours, a_ours), (_, l_trl, a_trl) = rounds[0]
t_ours, t_trl = statistics.median(o[0] for o, _ in rounds), statistics.median(t[0] for _, t in rounds)
load_end = os.getloadavg()
ratio = (N / t_ours) / (N / t_trl)
diffs = [abs(a - b) for a, b in zip(l_ours, l_trl)]
lines = ["# Reward-model training vs trl RewardTrainer", "",
         f"Same model (SmolLM2-135M-Instruct, offline copy) with the same random scalar head, the same {N * B} tokenized pairs in order "
         f"(trl gets them pre-tokenized as `chosen_ids`/`rejected_ids`), full fine-tuning, {B} pairs per step, AdamW lr {LR}, "
         f"{WARM} warmup steps + cosine, clip 1.0, {N} steps, fp32 on CPU. Machine: {platform.processor() or platform.machine()}, "
         f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}, load average {load[0]:.2f} at the start and {load_end[0]:.2f} at the end (a shared machine: other jobs ran too, so the timings are noisy). "
         f"Seconds: median of {args.repeats} alternating runs of each. {'trl ran first. ' if args.trl_first else 'Ours ran first. '}Run: `python bench/reward.py --steps {N}{' --trl-first' if args.trl_first else ''}`.", "",
         "| | seconds | steps/s |", "|---|---|---|",
         f"| ours (ftcourse.reward on ftcourse.train) | {t_ours:.1f} | {N / t_ours:.3f} |", f"| trl RewardTrainer | {t_trl:.1f} | {N / t_trl:.3f} |", "",
         f"**Speed ratio (ours / trl, steps per second): {ratio:.2f}**", "",
         "| step | loss ours | loss trl | abs. difference | accuracy ours | accuracy trl |", "|---|---|---|---|---|---|"]
lines += [f"| {i + 1} | {a:.6f} | {b:.6f} | {abs(a - b):.1e} | {x:.2f} | {y:.2f} |" for i, (a, b, x, y) in enumerate(zip(l_ours, l_trl, a_ours, a_trl))]
lines += ["", f"Largest loss difference: {max(diffs):.1e}. " + ("The losses are bit-identical at every step: " if max(diffs) == 0 else "")
          + "both compute the same float32 operations on the same batches (the chapter's test shows equal loss, metrics and gradients "
          "on one batch), and the optimizer steps are the same AdamW with the same schedule."]
text = '\n'.join(lines) + '\n'
print(text)
(Path(__file__).parent/'reward.md').write_text(text)
