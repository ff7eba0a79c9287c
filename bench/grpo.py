"""GRPO training steps, ours (ftcourse.grpo.train_grpo on ftcourse.train) against trl's GRPOTrainer, on the same work:
chapter 3's SFT model (or the tiny one with --tiny) with the same LoRA adapters (rank 8, every linear layer, same
initialisation), the same prompts in the same order, P prompts x G completions of at most L new tokens per step, the judge
as the reward (on the tiny model, whose random text the judge never accepts: character codes modulo 5), loss 'dapo',
beta 0, AdamW lr 1e-4, cosine, clipping at 1.0, N steps, fp32.

Both sample with ftcourse.evaluate.sample_responses and the same seeds (trl through its rollout_func hook), so both see the
same completions and the per-step losses and gradient norms must agree; each run is timed end to end (sampling, scoring,
forward, backward, optimizer step). trl's own sampler (model.generate) is not timed here: with it the completions, and so
the losses, differ. Prints steps/s and the per-step differences; writes bench/grpo.md.

    python bench/grpo.py [--steps 3] [--prompts 2] [--generations 4] [--new-tokens 16] [--tiny]
"""
import argparse, logging, os, platform, time, warnings
from pathlib import Path
os.environ.setdefault('HF_HUB_OFFLINE', '1')

p = argparse.ArgumentParser()
p.add_argument('--steps', type=int, default=3); p.add_argument('--prompts', type=int, default=2)
p.add_argument('--generations', type=int, default=4); p.add_argument('--new-tokens', type=int, default=16)
p.add_argument('--tiny', action='store_true', help='the tiny test model instead of SmolLM2-135M-Instruct')
args = p.parse_args()

import torch
from ftcourse.core import tiny_model, load_course_dataset, set_seed
from ftcourse.lora import apply_lora, sft_model
from ftcourse.ppo import judge_reward
from ftcourse.grpo import GRPOConfig, train_grpo, trl_grpo_trainer, compare_runs
logging.getLogger('trl').setLevel(logging.ERROR); warnings.filterwarnings('ignore')

def policy():
    # the real model is chapter 3's SFT model, which answers some of these questions right: the rewards are mixed
    model, tok = tiny_model() if args.tiny else sft_model(verbose=False)[:2]
    set_seed(0); apply_lora(model, r=8, alpha=16, target_modules='all-linear')
    return model, tok

rows = [r for r in load_course_dataset('sft', 'train') if r['task'] in ('parity', 'compare')][:args.steps * args.prompts]
cfg = GRPOConfig(steps=args.steps, prompts_per_step=args.prompts, num_generations=args.generations, lr=1e-4,
                 max_new_tokens=args.new_tokens, filter_zero_std=False, mixed_precision='no', shuffle=False, progress=False)
# the judge on the real model; on the tiny model (whose text the judge never accepts) a reward with a signal
reward = (lambda rows, texts: torch.tensor([(sum(map(ord, t)) % 5) / 4 for t in texts])) if args.tiny else None
model, tok = policy()
tr = trl_grpo_trainer(model, tok, rows, reward, cfg=cfg)
t = time.perf_counter(); tr.train(); trl_s = time.perf_counter() - t
model, tok = policy()
t = time.perf_counter(); hist = train_grpo(model, tok, rows, reward or judge_reward, cfg=cfg); ours_s = time.perf_counter() - t
steps = compare_runs(hist, tr.state.log_history, ('loss', 'grad_norm', 'reward', 'completions/mean_length'))
loss_diff = max(abs(a - b) for s in steps for a, b in [s['loss']])
gn_rel = max(abs(a - b) / max(abs(b), 1e-12) for s in steps for a, b in [s['grad_norm']])
assert all(a == b for s in steps for a, b in [s['completions/mean_length']]), 'the completions differ'

load = os.getloadavg()[0]
name = 'tiny test model' if args.tiny else "chapter 3's SFT model, SmolLM2-135M-Instruct with its LoRA merged"
lines = [f"# GRPO steps vs trl's GRPOTrainer\n",
         f"Same model ({name}) with the same LoRA adapters (r=8, alpha 16, every linear layer), {len(rows)} prompts of the parity "
         f"and compare tasks in order, {args.prompts} prompts x {args.generations} completions of at most {args.new_tokens} new "
         f"tokens per step, {'a reward with a signal on random text (character codes modulo 5)' if args.tiny else 'judge reward'}, loss 'dapo', beta 0, AdamW lr 1e-4 with cosine decay, clip 1.0, {args.steps} steps, "
         f"fp32 on the CPU. Both sample with `sample_responses` and the same seeds (trl through `rollout_func`), so both see "
         f"the same completions. Machine: {platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
         f"load average at the end {load:.2f}{' (measured on a loaded machine: the times are upper bounds)' if load > os.cpu_count() else ''}. "
         f"Run: `python bench/grpo.py --steps {args.steps} --prompts {args.prompts} --generations {args.generations} "
         f"--new-tokens {args.new_tokens}{' --tiny' if args.tiny else ''}`.\n",
         "| run | seconds | steps/s |", "|---|---|---|",
         f"| ours (`train_grpo`) | {ours_s:.1f} | {args.steps / ours_s:.3f} |", f"| trl (`GRPOTrainer`) | {trl_s:.1f} | {args.steps / trl_s:.3f} |",
         f"\n**Speed ratio (ours / trl, steps per second) {trl_s / ours_s:.2f}**; largest per-step loss difference {loss_diff:.1e}, "
         f"largest relative gradient-norm difference {gn_rel:.1e}, equal completion lengths at every step.\n",
         "| step | loss ours | loss trl | grad norm ours | grad norm trl | reward |", "|---|---|---|---|---|---|"]
lines += [f"| {i} | {s['loss'][0]:.6f} | {s['loss'][1]:.6f} | {s['grad_norm'][0]:.6f} | {s['grad_norm'][1]:.6f} | {s['reward'][0]:.3f} |"
          for i, s in enumerate(steps, 1)]
NOTE = ("\nWhat the times contain (not profiled): both runs sample with the same function, so the difference is in the rest "
        "of the step: trl's trainer machinery (its dataloader of repeated prompts, its generation-batch buffering, the "
        "completions it decodes and logs, its fused output head that also computes the entropy) against `ftcourse.train`'s "
        "loop. On the tiny model the arithmetic is small, so such per-step costs weigh more than they would on a real model.\n")
text = '\n'.join(lines) + '\n' + NOTE
print(text)
(Path(__file__).parent/'grpo.md').write_text(text)
