"""Launched by tests/test_distributed.py under torchrun: train the tiny model with each strategy (and through the
`ftcourse sft` command) and report, per rank, which examples this process trained on, what it wrote to disk, the
history and the final weights.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_train.py WORK_DIR cli ddp fsdp fsdp-resume ddp-masked
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
            '--learning-rate', '1e-3', '--n-eval', '8', '--eval-every', '0']

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

if __name__ == '__main__':
    work, strategies = Path(sys.argv[1]), sys.argv[2:]
    writes = []
    record_writes(str(work/'runs'), writes)   # every run writes under work/runs
    exs, coll = examples()
    key = {tuple(e['input_ids']): i for i, e in enumerate(exs)}
    for strategy in strategies:
        if strategy == 'cli':              # first, as in a fresh `torchrun -m ftcourse.cli` process
            from ftcourse.cli import main
            try: main([*CLI_ARGS, '--output-dir', str(work/'runs'/'cli')])
            except SystemExit as e: assert not e.code, e.code
        state = process_state()
        rank = state.process_index
        if strategy == 'cli':
            report = dict(rank=rank, world=state.num_processes, writes=writes[:])
            (work/f'cli-rank{rank}.json').write_text(json.dumps(report))
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
