"""Two processes on the CPU (torchrun, gloo) against one: each process trains on half of each global batch, gradients
are averaged across processes (DDP) or reduce-scattered over shards (FSDP2), only the main process writes, and the
losses and trained weights are those of one process that sees the whole batch."""
import json, os, subprocess, sys
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from dist_train import examples, config, masked, CLI_ARGS
from ftcourse.core import tiny_model
from ftcourse.sft import sft_loss_fn
from ftcourse.train import read_history
from ftcourse.train import train, batch_indices, trainable_state_dict

# fp32 on the CPU. Two processes sum the gradient in another order than one process's four micro-batches, so the
# results agree to rounding, not bit for bit: losses within a relative 1e-5, weights (after three AdamW steps) within
# an absolute 1e-5 (the learning rate is 1e-3, so this is 1% of one step).
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-5
# Per-process memory under FSDP against `per_gpu_memory(..., 'zero3')`, which divides the whole model's bytes by the
# process count: FSDP2 splits each tensor along its first dimension, so a tensor whose rows do not divide evenly (the
# tiny model's 259-row embedding) leaves one process a row more; AdamW also keeps a scalar step count per tensor. Both
# are far below 0.1% of the tiny model's 1.2 MB shard, so the measured bytes must agree with the estimate within 0.1%.
MEMORY_RTOL = 1e-3

@pytest.fixture(scope='module')
def launched(tmp_path_factory):
    "One torchrun launch of two processes: the `ftcourse sft` command, then the loop with DDP, then with FSDP."
    work = tmp_path_factory.mktemp('dist')
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1')
    env.pop('CUDA_VISIBLE_DEVICES', None)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           str(Path(__file__).parent/'dist_train.py'), str(work), 'cli', 'ddp', 'fsdp', 'fsdp-resume', 'ddp-masked', 'cli-fsdp']
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    runs = ('cli', 'ddp', 'fsdp', 'fsdp-resume', 'ddp-masked', 'cli-fsdp')
    reports = {(s, r): json.loads((work/f'{s}-rank{r}.json').read_text()) for s in runs for r in (0, 1)}
    return work, reports, p.stdout

@pytest.fixture(scope='module')
def data(): return examples()

@pytest.fixture(scope='module')
def one_process(tmp_path_factory, data):
    "The same run in one process (this one): the whole global batch, in four micro-batches of one sequence."
    exs, coll = data
    model, _ = tiny_model()
    cfg = config('ddp', tmp_path_factory.mktemp('one'))
    hist = train(model, sft_loss_fn, exs, cfg, collate_fn=coll, eval_data=exs[-4:])
    return hist, trainable_state_dict(model)

@pytest.mark.parametrize('strategy', ['ddp', 'fsdp'])
def test_each_rank_trains_on_half_of_each_global_batch(launched, data, strategy):
    work, reports, _ = launched
    exs, _ = data
    for rank in (0, 1):
        rep = reports[strategy, rank]
        assert rep['world'] == 2 and rep['distributed_type'] == 'DistributedType.MULTI_CPU'
        # its share: every other example of each step's batch, starting at its rank (2 of 4 per step, 3 steps)
        expected = [i for step in range(3) for i in batch_indices(step, 4, len(exs))[rank::2]]
        assert rep['seen'] == expected
    a, b = (set(reports[strategy, r]['seen']) for r in (0, 1))
    assert not a & b and len(a | b) == 12                       # disjoint halves that cover every global batch

@pytest.mark.parametrize('strategy', ['ddp', 'fsdp'])
def test_only_the_main_process_writes(launched, strategy):
    work, reports, _ = launched
    assert reports[strategy, 1]['writes'] == []
    written = {p for _, p in reports[strategy, 0]['writes']}
    assert f'{strategy}/metrics.jsonl' in written and any(p.startswith(f'{strategy}/.tmp-checkpoint-') for p in written)
    names = sorted(p.name for p in (work/'runs'/strategy).iterdir())
    assert names == ['checkpoint-000002', 'checkpoint-000003', 'metrics.jsonl']
    lines = [json.loads(l) for l in (work/'runs'/strategy/'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in lines] == [0, 1, 2, 3, 3]        # one line per record: no second writer

@pytest.mark.parametrize('strategy', ['ddp', 'fsdp'])
def test_two_processes_equal_one_process(launched, one_process, strategy):
    work, reports, _ = launched
    hist, w1 = one_process
    for rank in (0, 1):
        h2 = reports[strategy, rank]['history']
        assert [r['step'] for r in h2] == [r['step'] for r in hist]
        assert [r.get('items') for r in h2] == [r.get('items') for r in hist]           # the global item count
        for key in ('loss', 'eval_loss', 'grad_norm'):
            l1, l2 = [r[key] for r in hist if key in r], [r[key] for r in h2 if key in r]
            assert l1 and l2 == pytest.approx(l1, rel=LOSS_RTOL), key
        w2 = load_file(work/f'{strategy}-rank{rank}.safetensors')
        assert w2.keys() == w1.keys()
        for k in w1: torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=WEIGHT_ATOL)
    init = dict(tiny_model()[0].named_parameters())
    assert max((w1[k] - init[k]).abs().max() for k in w1) > 1e-4  # the weights moved, so the comparison means something
    ck = load_file(work/'runs'/strategy/'checkpoint-000003'/'trainable.safetensors')   # whole tensors, not shards
    for k in w1: torch.testing.assert_close(ck[k], w1[k], rtol=0, atol=WEIGHT_ATOL)

def test_fsdp_resumes_from_a_checkpoint_exactly(launched):
    "A sharded run resumed from its step-2 checkpoint (weights and AdamW's state sharded again) ends as the whole run."
    work, reports, _ = launched
    for rank in (0, 1):
        rep = reports['fsdp-resume', rank]
        assert rep['seen'] == reports['fsdp', rank]['seen'][-2:]   # it trained step 3 only
        whole = load_file(work/f'fsdp-rank{rank}.safetensors')
        resumed = load_file(work/f'fsdp-resume-rank{rank}.safetensors')
        for k in whole: assert torch.equal(whole[k], resumed[k]), k       # the same operations on the same values
        losses = [[r['loss'] for r in h if 'loss' in r] for h in (rep['history'], reports['fsdp', rank]['history'])]
        assert losses[0] == losses[1]

def test_a_process_with_nothing_to_learn_still_takes_part(launched, data, tmp_path):
    "Process 1's share of step 0 is all masked: it still runs its micro-batches (weight 0), so nobody waits forever."
    work, reports, _ = launched
    exs, coll = data
    model, _ = tiny_model()
    hist = train(model, sft_loss_fn, masked(exs), config('ddp', tmp_path), collate_fn=coll, eval_data=exs[-4:])
    w1 = trainable_state_dict(model)
    for rank in (0, 1):
        h2 = reports['ddp-masked', rank]['history']
        assert [r.get('items') for r in h2] == [r.get('items') for r in hist]
        l1, l2 = ([r['loss'] for r in h if 'loss' in r] for h in (hist, h2))
        assert l2 == pytest.approx(l1, rel=LOSS_RTOL)
        w2 = load_file(work/f'ddp-masked-rank{rank}.safetensors')
        for k in w1: torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=WEIGHT_ATOL)

@pytest.fixture(scope='module')
def one_process_command(tmp_path_factory):
    "`ftcourse sft` in one process (this one): its run folder."
    import contextlib, io
    from ftcourse.cli import main
    out = tmp_path_factory.mktemp('one-command')/'run'
    with contextlib.redirect_stdout(io.StringIO()): assert main([*CLI_ARGS, '--output-dir', str(out)]) == 0
    return out

@pytest.mark.parametrize('run', ['cli', 'cli-fsdp'])
def test_the_command_writes_one_run_folder_from_rank_0(launched, one_process_command, run):
    "`torchrun ... ftcourse sft [--strategy fsdp]`: one run folder, written by rank 0 alone, as the one-process command's."
    import yaml
    work, reports, stdout = launched
    assert reports[run, 0]['world'] == 2
    assert reports[run, 1]['writes'] == [], reports[run, 1]['writes'][:5]
    assert {p.split('/')[0] for _, p in reports[run, 0]['writes']} <= {'.', run}           # '.': the parent folder
    assert {f'{run}/config.yaml', f'{run}/metrics.jsonl'} <= {p for _, p in reports[run, 0]['writes']}
    strategy = yaml.safe_load((work/'runs'/run/'config.yaml').read_text())['strategy']
    assert strategy == ('fsdp' if run == 'cli-fsdp' else 'ddp')
    l1, l2 = ([r['loss'] for r in read_history(d/'metrics.jsonl') if 'loss' in r]
              for d in (one_process_command, work/'runs'/run))
    assert len(l1) == 3 and l2 == pytest.approx(l1, rel=LOSS_RTOL)
    # whole tensors (FSDP's shards gathered by `trainable_state_dict`), equal to one process's within WEIGHT_ATOL
    a, b = (load_file(d/'trainable.safetensors') for d in (one_process_command, work/'runs'/run))
    assert b.keys() == a.keys() and all(b[k].shape == a[k].shape for k in a)
    for k in a: torch.testing.assert_close(b[k], a[k], rtol=0, atol=WEIGHT_ATOL)
    init = dict(tiny_model()[0].named_parameters())
    assert max((a[k] - init[k]).abs().max() for k in a) > 1e-4   # the weights moved, so the comparison means something

def test_per_process_memory_matches_the_estimate(launched):
    "Bytes each process holds after an optimizer step: FSDP's shards are the zero3 estimate, DDP's copy the ddp one."
    from ftcourse.cli import per_gpu_memory
    work, reports, _ = launched
    # the command's run: a full fine-tune of the tiny model in fp32 (no mixed precision on a CPU), AdamW
    est = {s: per_gpu_memory('tiny', 2, s, method='full', dtype='fp32') for s in ('zero3', 'ddp')}
    whole = per_gpu_memory('tiny', 1, 'ddp', method='full', dtype='fp32')['weights']
    for run, strategy in (('cli-fsdp', 'zero3'), ('cli', 'ddp')):
        mem = [reports[run, r]['memory'] for r in (0, 1)]
        for m in mem:
            assert m['whole_weights'] == whole                       # the estimate counts the tiny model's parameters
            for part in ('weights', 'gradients', 'optimizer'):
                assert m[part] == pytest.approx(est[strategy][part], rel=MEMORY_RTOL), (run, part)
        if run == 'cli-fsdp':                                        # the shards partition the model: no overlap
            assert mem[0]['weights'] + mem[1]['weights'] == whole
