"The `ftcourse` command: configuration from YAML and flags, clear errors before training, run folders, logs, two processes."
import contextlib, io, json, os, shutil, subprocess, sys
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file
from ftcourse.cli import (main, load_config, ConfigError, RunConfig, run, load_run, params_table, memory_table, read_run_config)

def cli(*argv):
    "Run `ftcourse argv...` in this process; returns (status, stdout, stderr)."
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        try: rc = main([str(a) for a in argv])
        except SystemExit as x: rc = x.code
    return rc, o.getvalue(), e.getvalue()

TINY = ['--model', 'tiny', '--n-eval', '8', '--eval-every', '0', '--batch-size', '4']

def test_yaml_then_flags_and_the_saved_config_reproduces_the_run(tmp_path):
    (tmp_path/'run.yaml').write_text("method: sft\nmodel: tiny\nsteps: 9\nlora_r: 4\nlearning_rate: 1.0e-3\nn_eval: 8\neval_every: 0\n"
                                     "warmup_steps: 0\nlora_target_modules: [q_proj, v_proj]\n")
    rc, out, err = cli('sft', '--config', tmp_path/'run.yaml', '--steps', 3, '--output-dir', tmp_path/'a')
    assert rc == 0, err
    cfg = read_run_config(tmp_path/'a')
    assert (cfg.steps, cfg.lora_r, cfg.learning_rate, cfg.lora_target_modules) == (3, 4, 1e-3, 'q_proj,v_proj')
    a = load_file(tmp_path/'a'/'trainable.safetensors')
    assert a and all('lora_' in k for k in a) and all(k.split('.')[-2] in ('q_proj', 'v_proj') for k in a)
    # the folder's config.yaml alone reproduces the run bit for bit
    rc, out, err = cli('sft', '--config', tmp_path/'a'/'config.yaml', '--output-dir', tmp_path/'b')
    assert rc == 0, err
    b = load_file(tmp_path/'b'/'trainable.safetensors')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if 'lora_B' in k)   # training moved B away from its zero init

def test_config_errors_name_the_problem(tmp_path):
    (tmp_path/'typo.yaml').write_text("method: dpo\nleraning_rate: 1e-4\n")
    with pytest.raises(ConfigError, match="unknown option 'leraning_rate' .did you mean 'learning_rate'"): load_config(tmp_path/'typo.yaml')
    (tmp_path/'broken.yaml').write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match='broken.yaml: not valid YAML'): load_config(tmp_path/'broken.yaml')
    (tmp_path/'list.yaml').write_text("- steps\n- 3\n")
    with pytest.raises(ConfigError, match='must be a mapping'): load_config(tmp_path/'list.yaml')
    (tmp_path/'binary.yaml').write_bytes(b'\xff\xfe\x00\x01')
    with pytest.raises(ConfigError, match='not valid YAML'): load_config(tmp_path/'binary.yaml')
    with pytest.raises(ConfigError, match='no such file'): load_config(tmp_path/'missing.yaml')
    with pytest.raises(ConfigError, match='steps must be int'): load_config(overrides=dict(steps='3.5'))
    with pytest.raises(ConfigError, match='lora_r must be positive'): load_config(overrides=dict(lora_r=0))
    with pytest.raises(ConfigError, match='adapter must be one of'): load_config(overrides=dict(adapter='ia3'))
    with pytest.raises(ConfigError, match='not a run folder'): load_config(overrides=dict(base_run=str(tmp_path)))
    # on the command line: one line on stderr, status 2, nothing written
    rc, out, err = cli('dpo', '--config', tmp_path/'typo.yaml', '--output-dir', tmp_path/'o')
    assert rc == 2 and "did you mean 'learning_rate'" in err and not (tmp_path/'o').exists()
    rc, out, err = cli('sft', '--lora-rank', '4')
    assert rc == 2 and 'unrecognized arguments: --lora-rank' in err
    (tmp_path/'dpo.yaml').write_text("method: dpo\n")
    rc, out, err = cli('sft', '--config', tmp_path/'dpo.yaml')
    assert rc == 2 and 'describes a dpo run' in err

def test_bad_dataset_row_stops_before_anything_is_written(tmp_path):
    rows = [dict(messages=[dict(role='user', content='2+2?'), dict(role='assistant', content='4')])] * 30
    rows.insert(17, dict(messages=[dict(role='user', content='no answer')]))
    (tmp_path/'d.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    rc, out, err = cli('sft', *TINY, '--dataset', tmp_path/'d.jsonl', '--output-dir', tmp_path/'o')
    assert rc == 2 and 'row 18' in err and 'assistant' in err, err
    assert not (tmp_path/'o').exists()

def test_own_jsonl_gets_a_seeded_held_out_split(tmp_path):
    rows = [dict(messages=[dict(role='user', content=f'{i}+1?'), dict(role='assistant', content=str(i + 1))]) for i in range(40)]
    (tmp_path/'d.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    rc, out, err = cli('sft', *TINY, '--steps', 1, '--dataset', tmp_path/'d.jsonl', '--output-dir', tmp_path/'o')
    assert rc == 0, err
    assert 'held out 4 of 40 rows' in out and '36 examples kept' in out

def test_output_dir_holding_another_run_is_refused(tmp_path):
    o = tmp_path/'o'
    assert cli('sft', *TINY, '--steps', 1, '--output-dir', o)[0] == 0
    before = (o/'trainable.safetensors').read_bytes()
    rc, out, err = cli('sft', *TINY, '--steps', 1, '--output-dir', o)
    assert rc == 2 and 'already holds another run' in err and (o/'trainable.safetensors').read_bytes() == before
    assert cli('sft', *TINY, '--steps', 1, '--output-dir', o, '--overwrite', '--seed', 1)[0] == 0
    assert (o/'trainable.safetensors').read_bytes() != before
    other = tmp_path/'notes'; other.mkdir(); (other/'thesis.tex').write_text('precious')
    rc, out, err = cli('sft', *TINY, '--steps', 1, '--output-dir', other, '--overwrite')
    assert rc == 2 and 'not a run' in err and (other/'thesis.tex').read_text() == 'precious'

def test_run_folder_restores_the_model_and_logs_every_step(tmp_path):
    res = run(load_config(overrides=dict(model='tiny', steps=4, eval_every=2, n_eval=8, learning_rate=1e-3, output_dir=str(tmp_path/'r'),
                                         log_with='tensorboard')), device='cpu')
    m, tok = load_run(tmp_path/'r')
    x = torch.randint(0, len(tok), (2, 12))
    with torch.no_grad(): assert torch.allclose(res['model'](x).logits, m(x).logits, atol=1e-5)
    import csv
    rows = list(csv.DictReader(open(tmp_path/'r'/'metrics.csv')))
    assert [r['step'] for r in rows if r['loss']] == ['1', '2', '3', '4'] and sum(bool(r['eval_loss']) for r in rows) == 3
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(str(next((tmp_path/'r').rglob('events.out.tfevents*')).parent)); ev.Reload()
    assert [round(e.value, 5) for e in ev.Scalars('loss')] == [round(float(r['loss']), 5) for r in rows if r['loss']]
    summary = json.loads((tmp_path/'r'/'summary.json').read_text())
    assert summary['trainable_params'] == sum(t.numel() for t in load_file(tmp_path/'r'/'trainable.safetensors').values())

def test_qlora_run_merges_into_its_dequantized_base(tmp_path):
    res = run(load_config(overrides=dict(model='tiny', adapter='qlora', steps=2, eval_every=0, n_eval=8, learning_rate=1e-3,
                                         output_dir=str(tmp_path/'q'))), device='cpu')
    m, tok = load_run(tmp_path/'q')
    x = torch.randint(0, len(tok), (2, 12))
    with torch.no_grad(): assert torch.allclose(res['model'](x).logits, m(x).logits, atol=1e-4)

def test_params_and_memory_commands_print_the_chapters_numbers():
    from ftcourse.lora import lora_param_count, KNOWN_CONFIGS
    from ftcourse.quant import estimate_training_memory, LLAMA_LINEARS
    rc, out, err = cli('params', '--model', 'Llama-2-7B', '--lora-r', 8, '--targets', 'q_proj,v_proj')
    assert rc == 0 and '4,194,304 trainable parameters' in out
    n = lora_param_count(KNOWN_CONFIGS['Mistral-7B-v0.1'], 16, 'all-linear')
    assert params_table('Mistral-7B-v0.1', 16)['lora_params'] == n
    rc, out, err = cli('memory', '--model', 'Llama-3-8B', '--batch-size', 2, '--seq-len', 256)
    assert rc == 0 and all(m in out for m in ('full', 'lora', 'qlora'))
    from ftcourse.lora import as_config
    e = estimate_training_memory(as_config(KNOWN_CONFIGS['Llama-3-8B']), 'qlora', 2, 256, 16, LLAMA_LINEARS, dtype=torch.bfloat16)
    row = [r for r in memory_table('Llama-3-8B', 2, 256) if r['method'] == 'qlora'][0]
    assert row['total'] == e['total'] / 2**30 and f"{e['total'] / 2**30:9.2f}" in out
    rc, out, err = cli('params', '--model', 'no/such-model-offline')
    assert rc == 2 and 'no config for' in err

def test_chat_with_a_finished_run(tmp_path):
    assert cli('sft', *TINY, '--steps', 1, '--output-dir', tmp_path/'r')[0] == 0
    rc, out, err = cli('chat', '--run', tmp_path/'r', '--prompt', 'hi', '--max-new-tokens', 4)
    assert rc == 0 and f"run {tmp_path/'r'}" in err

def test_two_processes_match_one_process(tmp_path):
    "torchrun with 2 CPU processes (gloo) and the same global batch: the same losses and the same trained weights."
    args = ['sft', *TINY, '--adapter', 'full', '--steps', 3, '--warmup-steps', 0, '--learning-rate', 1e-3]
    ftc = shutil.which('ftcourse') or str(Path(sys.executable).parent/'ftcourse')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    one = subprocess.run([ftc, *map(str, args), '--output-dir', tmp_path/'one'], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29533', ftc,
                          *map(str, args), '--output-dir', tmp_path/'two'], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count('saved sft run') == 2   # both ranks trained
    import csv
    l1, l2 = ([float(r['loss']) for r in csv.DictReader(open(tmp_path/d/'metrics.csv'))] for d in ('one', 'two'))
    assert len(l1) == len(l2) == 3 and l1 == pytest.approx(l2, rel=1e-6)
    a, b = load_file(tmp_path/'one'/'trainable.safetensors'), load_file(tmp_path/'two'/'trainable.safetensors')
    from ftcourse.core import tiny_model
    init = dict(tiny_model()[0].named_parameters())
    assert max((a[k] - init[k]).abs().max() for k in a) > 1e-4             # the weights moved...
    for k in a: torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)  # ...the same way in both runs

def test_reward_and_dpo_runs_chain_off_the_sft_run(tmp_path):
    "reward and dpo from a finished SFT run (base_run): the SFT weights are merged in first, the run folders reload."
    from ftcourse.cli import load_reward_run
    from ftcourse.reward import reward_metrics
    from ftcourse.core import load_course_dataset
    assert cli('sft', *TINY, '--steps', 2, '--learning-rate', 1e-3, '--warmup-steps', 0, '--output-dir', tmp_path/'sft')[0] == 0
    rc, out, err = cli('reward', *TINY, '--steps', 2, '--base-run', tmp_path/'sft', '--output-dir', tmp_path/'rm')
    assert rc == 0, err
    assert 'pairs kept' in out and 'dropped' in out       # the data report is shown, drops counted
    rm, tok = load_reward_run(tmp_path/'rm')
    saved = load_file(tmp_path/'rm'/'trainable.safetensors')
    assert 'head.weight' in saved and torch.equal(rm.head.weight, saved['head.weight'])
    rows = list(load_course_dataset('preference', 'test'))[:8]
    assert 0 <= reward_metrics(rm, tok, rows)['accuracy'] <= 1
    rc, out, err = cli('dpo', *TINY, '--steps', 2, '--beta', 0.2, '--base-run', tmp_path/'sft', '--output-dir', tmp_path/'dpo')
    assert rc == 0, err
    sft, _ = load_run(tmp_path/'sft'); dpo, _ = load_run(tmp_path/'dpo')
    x = torch.randint(0, len(tok), (1, 10))
    with torch.no_grad(): assert not torch.allclose(sft(x).logits, dpo(x).logits)   # DPO moved the SFT model
    with pytest.raises(ConfigError, match='reward model, not a policy'): load_run(tmp_path/'rm')
    rc, out, err = cli('ppo', *TINY, '--reward-model', tmp_path/'sft', '--output-dir', tmp_path/'ppo')
    assert rc == 2 and 'is a sft run, not a reward model' in err, err

def test_tour_quick_writes_the_report_and_every_run(tmp_path):
    "The whole pipeline on the tiny model (2 steps per method): every run folder, the side-by-side report, the plots."
    out = tmp_path/'tour'
    rc, stdout, err = cli('tour', '--model', 'tiny', '--quick', '--out', out)
    assert rc == 0, err
    rep = json.loads((out/'report.json').read_text())
    methods = [r['method'] for r in rep['rows']]
    assert methods == ['start', 'sft', 'reward', 'ppo', 'dpo', 'orpo']
    for r in rep['rows'][1:]:
        saved = load_file(out/r['method']/'trainable.safetensors')
        assert r['trainable_params'] == sum(t.numel() for t in saved.values()) > 0
        assert r['peak_mb'] > 0 and (out/r['method']/'metrics.csv').exists()
        assert read_run_config(out/r['method']).method == r['method']
    for r in rep['rows']:
        if r['method'] != 'reward':
            assert 0 <= r['judge'] <= 1 and 0 <= r['pref_accuracy'] <= 1 and isinstance(r['reward'], float)
    assert rep['rows'][0]['kl'] == 0 and all(r['kl'] != 0 for r in rep['rows'] if r['method'] in ('sft', 'dpo', 'orpo'))
    assert (out/'ppo'/'value_head.safetensors').exists()
    assert read_run_config(out/'ppo').reward_model == str(out/'reward') and read_run_config(out/'dpo').base_run == str(out/'sft')
    md = (out/'report.md').read_text()
    assert md.count('\n| ') == 7 and '(metrics.png)' in md and (out/'metrics.png').stat().st_size > 10_000 and (out/'training.png').exists()
    assert '| method | judge |' in stdout
    rc, stdout, err = cli('tour', '--model', 'tiny', '--quick', '--out', out)
    assert rc == 2 and 'already holds a tour' in err
