"`--save-every` and `--resume`: a run killed with SIGKILL and resumed ends where the uninterrupted run ends."
import contextlib, io, json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file
from ftcourse.cli import main
from ftcourse.train import read_history
from ftcourse.ppo import iteration_history

def command(method, out, *extra):
    "A tiny run's command line: fp32 (no autocast), so that it is the same computation in every process."
    return [sys.executable, '-m', 'ftcourse.cli', method, '--model', 'tiny', '--n-eval', '8', '--eval-every', '6',
            '--batch-size', '4', '--steps', '16', '--save-every', '4', '--lr', '1e-3',
            '--mixed-precision', 'no', '--output-dir', str(out), *extra]

ENV = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1')

def start(argv, log:Path):
    return subprocess.Popen(argv, env=ENV, stdout=open(log, 'w'), stderr=subprocess.STDOUT)

def kill_after_checkpoint(proc, out:Path, step:int, timeout:float=600):
    "SIGKILL `proc` as soon as a checkpoint of step `step` or later exists in `out`; returns that checkpoint's step."
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(p.name.split('-')[1]) for p in out.glob('checkpoint-*')]
        if steps and max(steps) >= step:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return max(steps)
        if proc.poll() is not None: pytest.fail(f"the run ended (status {proc.returncode}) before a checkpoint of step {step}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail('no checkpoint appeared')

def without_time(rows): return [{k: v for k, v in r.items() if k != 'seconds'} for r in rows]

@pytest.mark.parametrize('method', ['sft', 'dpo'])
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path, method):
    whole = start(command(method, tmp_path/'whole'), tmp_path/'whole.log')        # the two run side by side
    killed = start(command(method, tmp_path/'killed'), tmp_path/'killed.log')
    at = kill_after_checkpoint(killed, tmp_path/'killed', 4)
    assert killed.returncode == -signal.SIGKILL and at < 16
    assert not (tmp_path/'killed'/'trainable.safetensors').exists()      # it died mid-run: no final weights
    resumed = subprocess.run(command(method, tmp_path/'killed', '--resume'), env=ENV, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path/'killed'}/checkpoint-{at:06d} at step {at}" in resumed.stdout + resumed.stderr
    assert whole.wait(timeout=600) == 0, (tmp_path/'whole.log').read_text()[-3000:]
    a, b = read_history(tmp_path/'whole'/'metrics.jsonl'), read_history(tmp_path/'killed'/'metrics.jsonl')
    assert [r['step'] for r in a if 'loss' in r] == list(range(1, 17)) and any('eval_loss' in r for r in a)
    assert without_time(a) == without_time(b)                             # every loss, lr, norm and evaluation
    wa, wb = load_file(tmp_path/'whole'/'trainable.safetensors'), load_file(tmp_path/'killed'/'trainable.safetensors')
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

def ppo_command(out, reward_run, *extra):
    "A tiny PPO run against a tiny reward model: 12 iterations of 4 updates (2 epochs x 2 minibatches), saved every 3."
    return [sys.executable, '-m', 'ftcourse.cli', 'ppo', '--model', 'tiny', '--reward-model', str(reward_run),
            '--batch-size', '4', '--steps', '12', '--save-every', '3', '--lr', '1e-3', '--ppo-max-new-tokens', '6',
            '--mixed-precision', 'no', '--output-dir', str(out), *extra]

def test_a_killed_ppo_run_resumes_to_the_uninterrupted_result(tmp_path):
    """PPO's checkpoints, at the end of every third iteration, hold the policy's adapters, the value head, AdamW's state and
    the random state that sampling draws from: a run killed after one resumes to the uninterrupted run's metrics and weights."""
    # a reward model that scores responses differently, so that the advantages are not all 0 and the policy moves
    rc, out, err = cli('reward', '--model', 'tiny', '--n-eval', '8', '--eval-every', '0', '--steps', '2',
                       '--mixed-precision', 'no', '--output-dir', tmp_path/'reward')
    assert rc == 0, err
    whole = start(ppo_command(tmp_path/'whole', tmp_path/'reward'), tmp_path/'whole.log')
    killed = start(ppo_command(tmp_path/'killed', tmp_path/'reward'), tmp_path/'killed.log')
    at = kill_after_checkpoint(killed, tmp_path/'killed', 12)      # step 12: the end of iteration 3
    assert killed.returncode == -signal.SIGKILL and at < 48 and at % 12 == 0
    assert not (tmp_path/'killed'/'trainable.safetensors').exists()
    assert not (tmp_path/'killed'/'value_head.safetensors').exists()
    resumed = subprocess.run(ppo_command(tmp_path/'killed', tmp_path/'reward', '--resume'), env=ENV, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path/'killed'}/checkpoint-{at:06d} at step {at}" in resumed.stdout + resumed.stderr
    assert whole.wait(timeout=600) == 0, (tmp_path/'whole.log').read_text()[-3000:]
    a, b = read_history(tmp_path/'whole'/'metrics.jsonl'), read_history(tmp_path/'killed'/'metrics.jsonl')
    assert len(a) == 48 and without_time(a) == without_time(b)           # one row per minibatch update, 4 an iteration
    iterations = iteration_history(a, updates=4)
    assert [r['step'] for r in iterations] == list(range(1, 13)) and iterations[-1]['kl'] != 0.0   # it moved
    for name in ('trainable.safetensors', 'value_head.safetensors'):
        wa, wb = load_file(tmp_path/'whole'/name), load_file(tmp_path/'killed'/name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name

def grpo_command(out, *extra):
    "A tiny GRPO run: 12 steps of 4 prompts in micro-batches of 2, 4 completions of each, saved every 4 steps."
    # the judge scores the tiny model's random text 0 throughout, which is no signal; a bonus for stopping with EOS
    # within 16 tokens makes some groups mixed, so that the policy moves
    return [sys.executable, '-m', 'ftcourse.cli', 'grpo', '--model', 'tiny', '--batch-size', '4',
            '--micro-batch-size', '2', '--steps', '12', '--save-every', '4', '--lr', '1e-3',
            '--grpo-num-generations', '4', '--grpo-max-new-tokens', '16', '--grpo-eos-bonus', '1.0',
            '--mixed-precision', 'no', '--output-dir', str(out), *extra]

def test_a_killed_grpo_run_resumes_to_the_uninterrupted_result(tmp_path):
    """GRPO samples in its collate function, seeded by the step and the micro-batch (the loop's `set_step` hook says
    the step): a run killed after a checkpoint and resumed samples the uninterrupted run's completions and ends with
    its weights."""
    whole = start(grpo_command(tmp_path/'whole'), tmp_path/'whole.log')
    killed = start(grpo_command(tmp_path/'killed'), tmp_path/'killed.log')
    at = kill_after_checkpoint(killed, tmp_path/'killed', 4)
    assert killed.returncode == -signal.SIGKILL and at < 12
    assert not (tmp_path/'killed'/'trainable.safetensors').exists()
    resumed = subprocess.run(grpo_command(tmp_path/'killed', '--resume'), env=ENV, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path/'killed'}/checkpoint-{at:06d} at step {at}" in resumed.stdout + resumed.stderr
    assert whole.wait(timeout=600) == 0, (tmp_path/'whole.log').read_text()[-3000:]
    a, b = read_history(tmp_path/'whole'/'metrics.jsonl'), read_history(tmp_path/'killed'/'metrics.jsonl')
    assert [r['step'] for r in a] == list(range(1, 13))
    assert any(r['grad_norm'] > 0 for r in a if r['step'] > at)          # the policy moves after the kill too
    assert without_time(a) == without_time(b)        # every reward, completion length, loss and gradient norm
    wa, wb = load_file(tmp_path/'whole'/'trainable.safetensors'), load_file(tmp_path/'killed'/'trainable.safetensors')
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

def cli(*argv):
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        rc = main([str(a) for a in argv])
    return rc, o.getvalue(), e.getvalue()

def test_resume_checks_the_folder_and_the_method(tmp_path):
    "A resumed run is the same run: other options are refused, in one line and status 2."
    tiny = ['--model', 'tiny', '--n-eval', '8', '--eval-every', '0', '--steps', '2', '--mixed-precision', 'no']
    assert cli('sft', *tiny, '--output-dir', tmp_path/'r')[0] == 0
    rc, out, err = cli('sft', *tiny, '--output-dir', tmp_path/'r')
    assert rc == 2 and 'or --resume to continue it' in err
    rc, out, err = cli('sft', *tiny, '--lora-r', '4', '--output-dir', tmp_path/'r', '--resume')
    assert rc == 2 and 'holds a run with lora_r=8, not 4' in err and err.count('\n') == 1, err
    assert cli('sft', '--config', tmp_path/'r'/'config.yaml', '--resume')[0] == 0      # its own options: nothing left to do
    rc, out, err = cli('sft', *tiny, '--output-dir', tmp_path/'r', '--resume', '--overwrite')
    assert rc == 2 and 'pass one' in err
    rc, out, err = cli('sft', *tiny, '--output-dir', tmp_path/'new', '--resume')      # nothing to resume: a fresh run
    assert rc == 0 and 'the run starts at step 0' in out
