"""Launched by tests/test_distributed.py under torchrun: train the tiny model with each strategy (and through the
`ftcourse sft` command) and report, per rank, which examples this process trained on, what it wrote to disk, the
history and the final weights. `cli-fsdp` is the command with `--strategy fsdp`; it also reports the bytes this process
holds in its shards of the weights, the gradients and AdamW's state after the last optimizer step.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_train.py WORK_DIR cli cli-fsdp ddp fsdp fsdp-resume ddp-masked
"""
import json, os, shutil, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from ftcourse.core import tiny_model, load_course_dataset
from ftcourse.sft import build_sft_example, collate_sft, sft_loss_fn
from ftcourse.train import TrainConfig, train, trainable_state_dict, process_state, batch_indices

def examples():
    "The test's examples, and a key per example to recognise it in a batch (its tokens)."
    _, tok = tiny_model()
    rows = load_course_dataset('sft', 'train').select(range(24))
    exs = [build_sft_example(tok, r['messages'], 96) for r in rows]
    return [dict(input_ids=e['input_ids'], labels=e['labels']) for e in exs], collate_sft(tok)

def config(strategy, out_dir):
    "The run both the two-process launch and the one-process reference use."
    return TrainConfig(steps=3, batch_size=4, micro_batch_size=1, lr=1e-3, warmup_steps=0, mixed_precision='no',
                       eval_every=3, save_every=2, out_dir=str(out_dir), progress=False, strategy=strategy)

def masked(exs):
    "`exs` with every label of process 1's share of step 0 set to -100: in step 0 it has nothing to learn from."
    out = [dict(e) for e in exs]
    for j in batch_indices(0, 4, len(exs))[1::2]: out[j]['labels'] = [-100] * len(out[j]['labels'])
    return out

CLI_ARGS = ['sft', '--model', 'tiny', '--adapter', 'full', '--steps', '3', '--batch-size', '4', '--warmup-steps', '0',
            '--learning-rate', '1e-3', '--n-eval', '8', '--eval-every', '0', '--mixed-precision', 'no']

def record_writes(watched:str, writes:list):
    "Record in `writes` each change under `watched`: files opened for writing, folders made, renamed or removed."
    def audit(event, args):
        if event == 'open' and isinstance(args[0], (str, Path)) and isinstance(args[1], str):
            paths = [args[0]] if set(args[1]) & set('wax+') else []
        elif event in ('os.mkdir', 'os.remove', 'os.rmdir', 'shutil.rmtree', 'os.rename'):
            paths = [a for a in args[:2] if isinstance(a, (str, Path))]
        else: return
        for p in paths:
            p = os.path.abspath(p)
            if p.startswith(watched): writes.append([event, os.path.relpath(p, watched)])
    sys.addaudithook(audit)

def local_bytes(tensors) -> int:
    "Bytes this process holds for `tensors`: a sharded tensor (DTensor) counts its local shard only."
    local = [t.to_local() if hasattr(t, 'to_local') else t for t in tensors if t is not None]
    return sum(t.numel() * t.element_size() for t in local)

def record_memory(memory:dict):
    "After every optimizer step (of any optimizer), store in `memory` the bytes of its weights, gradients and state."
    def hook(opt, args, kwargs):
        params = [p for g in opt.param_groups for p in g['params']]
        state = [v for p in params for v in opt.state[p].values() if torch.is_tensor(v)]
        memory.update(weights=local_bytes(params), gradients=local_bytes([p.grad for p in params]),
                      optimizer=local_bytes(state), whole_weights=sum(p.numel() * p.element_size() for p in params))
    from torch.optim.optimizer import register_optimizer_step_post_hook
    return register_optimizer_step_post_hook(hook)

if __name__ == '__main__':
    work, strategies = Path(sys.argv[1]), sys.argv[2:]
    writes = []
    record_writes(str(work/'runs'), writes)   # every run writes under work/runs
    exs, coll = examples()
    key = {tuple(e['input_ids']): i for i, e in enumerate(exs)}
    for strategy in strategies:
        memory = {}
        if strategy.startswith('cli'):     # first, as in a fresh `torchrun -m ftcourse.cli` process
            from ftcourse.cli import main
            flags = ['--strategy', 'fsdp'] if strategy == 'cli-fsdp' else []
            hook = record_memory(memory)
            try: code = main([*CLI_ARGS, *flags, '--output-dir', str(work/'runs'/strategy)])
            finally: hook.remove()
            assert code == 0, code
        state = process_state()
        rank = state.process_index
        if strategy.startswith('cli'):
            report = dict(rank=rank, world=state.num_processes, writes=writes[:], memory=memory)
            (work/f'{strategy}-rank{rank}.json').write_text(json.dumps(report))
            writes.clear()
            continue
        base, _, variant = strategy.partition('-')
        resume = variant == 'resume'       # a run that starts from the step-2 checkpoint of the `base` run before it
        if resume:
            if rank == 0:
                shutil.copytree(work/'runs'/base/'checkpoint-000002', work/'runs'/strategy/'checkpoint-000002')
            torch.distributed.barrier()
        data = masked(exs) if variant == 'masked' else exs
        model, _ = tiny_model()
        seen = []
        def loss_fn(m, batch):
            if m.training:                 # record the training micro-batches this process ran (not the evaluations)
                for ids, mask in zip(batch['input_ids'].tolist(), batch['attention_mask'].tolist()):
                    seen.append(key[tuple(t for t, a in zip(ids, mask) if a)])
            return sft_loss_fn(m, batch)
        cfg = config(base, work/'runs'/strategy)
        hist = train(model, loss_fn, data, cfg, collate_fn=coll, eval_data=exs[-4:], resume=resume)
        weights = trainable_state_dict(model)      # FSDP: every process takes part in gathering the shards
        save_file(weights, work/f'{strategy}-rank{rank}.safetensors')
        report = dict(rank=rank, world=state.num_processes, distributed_type=str(state.distributed_type),
                      seen=seen, writes=writes[:], history=list(hist))
        (work/f'{strategy}-rank{rank}.json').write_text(json.dumps(report))
        writes.clear()
