"""FSDP2 against DDP on whatever the processes run on (CUDA with nccl, or the CPU with gloo): the same tiny-model run
with `strategy='ddp'` and `strategy='fsdp'`, in fp32 and (on CUDA) under bf16 autocast; prints the losses and PASS/FAIL.
DDP in any number of processes equals one process (tests/test_distributed.py shows it on the CPU): it is the reference.

    torchrun --nproc_per_node 1 tests/fsdp_check.py     # one GPU: fully_shard on CUDA, nccl, bf16 autocast
    torchrun --nproc_per_node 2 tests/fsdp_check.py     # two GPUs (or, without CUDA, two CPU processes over gloo)
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/fsdp_check.py --bf16   # on the CPU, bf16 autocast as well

Exit status 0 when every comparison passes, 1 otherwise.
"""
import os, sys
from pathlib import Path
import torch

sys.path.insert(0, str(Path(__file__).parent))
from dist_train import examples
from ftcourse.core import tiny_model
from ftcourse.sft import sft_loss_fn
from ftcourse.train import TrainConfig, train, trainable_state_dict, process_state

# fp32: only the order of the gradient sums differs: losses within a relative 1e-5, weights after 4 AdamW steps at
# lr 1e-3 within 1e-5. bf16 autocast: both strategies round the same forward to bf16, but the gradients are summed in
# another order, and AdamW turns a tiny gradient's sign into a whole step (up to lr = 1e-3 per weight), so the weights
# are compared by their update: |w_fsdp - w_ddp| / |w_ddp - w_start| (norms over all weights) within 5%, losses 1e-3.
TOLERANCE = {'no': (1e-5, 1e-5), 'bf16': (1e-3, 5e-2)}

def run(strategy, precision, exs, coll):
    model, _ = tiny_model()
    cfg = TrainConfig(steps=4, batch_size=8, micro_batch_size=2, lr=1e-3, warmup_steps=0, mixed_precision=precision,
                      eval_every=0, progress=False, strategy=strategy)
    hist = train(model, sft_loss_fn, exs, cfg, collate_fn=coll)
    return [r['loss'] for r in hist if 'loss' in r], trainable_state_dict(model)

def weight_difference(a, b, precision):
    "fp32: the largest difference of a weight; bf16: the difference of the updates relative to the update's size."
    if precision == 'no': return max((a[k] - b[k]).abs().max().item() for k in a)
    start = dict(tiny_model()[0].named_parameters())
    diff = sum(((a[k] - b[k]).float() ** 2).sum() for k in a) ** 0.5
    update = sum(((a[k] - start[k].detach()).float() ** 2).sum() for k in a) ** 0.5
    return (diff / update).item()

if __name__ == '__main__':
    state = process_state()
    exs, coll = examples()
    # bf16 autocast on CUDA where supported; on the CPU on request
    bf16 = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else '--bf16' in sys.argv
    precisions = ['no', 'bf16'] if bf16 else ['no']
    ok = True
    for precision in precisions:
        (l_ddp, w_ddp), (l_fsdp, w_fsdp) = run('ddp', precision, exs, coll), run('fsdp', precision, exs, coll)
        rtol, atol = TOLERANCE[precision]
        loss_rel = max(abs(a - b) / abs(a) for a, b in zip(l_ddp, l_fsdp))
        weight_abs = weight_difference(w_ddp, w_fsdp, precision)
        passed = loss_rel <= rtol and weight_abs <= atol and w_ddp.keys() == w_fsdp.keys()
        ok &= passed
        if state.is_main_process:
            print(f"{state.num_processes} process(es) on {state.device}, mixed_precision={precision!r}")
            print("  ddp  losses: " + ' '.join(f'{l:.6f}' for l in l_ddp))
            print("  fsdp losses: " + ' '.join(f'{l:.6f}' for l in l_fsdp))
            what = 'largest weight difference' if precision == 'no' else 'difference of the updates, relative'
            print(f"  largest relative loss difference {loss_rel:.1e} (tolerance {rtol:g}), {what} "
                  f"{weight_abs:.1e} (tolerance {atol:g}): {'PASS' if passed else 'FAIL'}")
    if state.is_main_process: print('fsdp_check:', 'PASS' if ok else 'FAIL')
    sys.exit(0 if ok else 1)
