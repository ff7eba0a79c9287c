"The `ftcourse` command: configuration from YAML and flags, clear errors before training, run folders, logs."
import contextlib, io, json, os, shutil, subprocess, sys
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file
from ftcourse.cli import main, params_table, memory_table
from ftcourse.config import config_yaml, load_config, ConfigError, RunConfig, read_run_config
from ftcourse.runs import load_run
from ftcourse.methods import run
from ftcourse.train import read_history

def cli(*argv):
    "Run `ftcourse argv...` in this process; returns (status, stdout, stderr)."
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        try: rc = main([str(a) for a in argv])
        except SystemExit as x: rc = x.code
    return rc, o.getvalue(), e.getvalue()

TINY = ['--model', 'tiny', '--n-eval', '8', '--eval-every', '0', '--batch-size', '4', '--mixed-precision', 'no']

def test_yaml_then_flags_and_the_saved_config_reproduces_the_run(tmp_path):
    (tmp_path/'run.yaml').write_text("method: sft\nmodel: tiny\nsteps: 9\nlora_r: 4\nlr: 1.0e-3\nn_eval: 8\neval_every: 0\n"
                                     "warmup_steps: 0\nlora_target_modules: [q_proj, v_proj]\n")
    rc, out, err = cli('sft', '--config', tmp_path/'run.yaml', '--steps', 3, '--output-dir', tmp_path/'a')
    assert rc == 0, err
    cfg = read_run_config(tmp_path/'a')
    assert (cfg.steps, cfg.lora_r, cfg.lr, cfg.lora_target_modules) == (3, 4, 1e-3, 'q_proj,v_proj')
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
    res = run(load_config(overrides=dict(model='tiny', mixed_precision='no', steps=4, eval_every=2, n_eval=8, lr=1e-3, output_dir=str(tmp_path/'r'),
                                         log_with='tensorboard')), device='cpu')
    m, tok = load_run(tmp_path/'r')
    x = torch.randint(0, len(tok), (2, 12))
    with torch.no_grad(): assert torch.allclose(res['model'](x).logits, m(x).logits, atol=1e-5)
    rows = read_history(tmp_path/'r'/'metrics.jsonl')                  # the run's one log, as the loop wrote it
    assert [r['step'] for r in rows if 'loss' in r] == [1, 2, 3, 4] and sum('eval_loss' in r for r in rows) == 3
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(str(next((tmp_path/'r').rglob('events.out.tfevents*')).parent)); ev.Reload()
    assert [round(e.value, 5) for e in ev.Scalars('loss')] == [round(float(r['loss']), 5) for r in rows if 'loss' in r]
    summary = json.loads((tmp_path/'r'/'summary.json').read_text())
    assert summary['trainable_params'] == sum(t.numel() for t in load_file(tmp_path/'r'/'trainable.safetensors').values())

def test_qlora_run_merges_into_its_dequantized_base(tmp_path):
    res = run(load_config(overrides=dict(model='tiny', mixed_precision='no', adapter='qlora', steps=2, eval_every=0, n_eval=8, lr=1e-3,
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

def test_reward_and_dpo_runs_chain_off_the_sft_run(tmp_path):
    "reward and dpo from a finished SFT run (base_run): the SFT weights are merged in first, the run folders reload."
    from ftcourse.runs import load_reward_run
    from ftcourse.reward import reward_metrics
    from ftcourse.core import load_course_dataset
    assert cli('sft', *TINY, '--steps', 2, '--lr', 1e-3, '--warmup-steps', 0, '--output-dir', tmp_path/'sft')[0] == 0
    o = io.StringIO()
    with contextlib.redirect_stdout(o):
        trained = run(load_config(overrides=dict(method='reward', model='tiny', mixed_precision='no', n_eval=8, eval_every=0, batch_size=4, steps=2,
                                                 base_run=str(tmp_path/'sft'), output_dir=str(tmp_path/'rm'))), device='cpu')
    assert 'pairs kept' in o.getvalue() and 'dropped' in o.getvalue()     # the data report is shown, drops counted
    rm, tok = load_reward_run(tmp_path/'rm')
    saved = load_file(tmp_path/'rm'/'trainable.safetensors')
    assert 'head.weight' in saved and torch.equal(rm.head.weight, saved['head.weight'])
    # the reloaded reward model (adapters merged) scores held-out pairs as the model that just trained did
    rows = list(load_course_dataset('preference', 'test'))[:8]
    reloaded, in_process = reward_metrics(rm, tok, rows), reward_metrics(trained['model'], tok, rows)
    for k in ('chosen', 'rejected'): torch.testing.assert_close(torch.tensor(reloaded[k]), torch.tensor(in_process[k]), rtol=0, atol=1e-5)
    assert reloaded['accuracy'] == in_process['accuracy']
    rc, out, err = cli('dpo', *TINY, '--steps', 2, '--beta', 0.2, '--base-run', tmp_path/'sft', '--output-dir', tmp_path/'dpo')
    assert rc == 0, err
    sft, _ = load_run(tmp_path/'sft'); dpo, _ = load_run(tmp_path/'dpo')
    x = torch.randint(0, len(tok), (1, 10))
    with torch.no_grad(): assert not torch.allclose(sft(x).logits, dpo(x).logits)   # DPO moved the SFT model
    with pytest.raises(ConfigError, match='reward model, not a policy'): load_run(tmp_path/'rm')
    rc, out, err = cli('ppo', '--model', 'tiny', '--reward-model', tmp_path/'sft', '--output-dir', tmp_path/'ppo')
    assert rc == 2 and 'is a sft run, not a reward model' in err, err

def test_tour_quick_writes_the_report_and_every_run(tmp_path):
    "The whole pipeline on the tiny model (2 steps per method): every run folder, the side-by-side report, the plots."
    out = tmp_path/'tour'
    rc, stdout, err = cli('tour', '--model', 'tiny', '--quick', '--out', out)
    assert rc == 0, err
    rep = json.loads((out/'report.json').read_text())
    methods = [r['method'] for r in rep['rows']]
    assert methods == ['start', 'sft', 'reward', 'ppo', 'grpo', 'dpo', 'orpo']
    for r in rep['rows'][1:]:
        saved = load_file(out/r['method']/'trainable.safetensors')
        assert r['trainable_params'] == sum(t.numel() for t in saved.values()) > 0
        assert r['peak_mb'] > 0 and (out/r['method']/'metrics.jsonl').exists()
        assert read_run_config(out/r['method']).method == r['method']
    for r in rep['rows']:
        if r['method'] != 'reward':
            assert 0 <= r['judge'] <= 1 and 0 <= r['pref_accuracy'] <= 1 and isinstance(r['reward'], float)
    assert rep['rows'][0]['kl'] == 0 and all(r['kl'] != 0 for r in rep['rows'] if r['method'] in ('sft', 'dpo', 'orpo'))
    assert (out/'ppo'/'value_head.safetensors').exists()
    assert read_run_config(out/'ppo').reward_model == str(out/'reward') and read_run_config(out/'dpo').base_run == str(out/'sft')
    md = (out/'report.md').read_text()
    sections = {sec.split('\n')[0]: sec for sec in md.split('\n## ')}
    rows_of = lambda title: sum(line.startswith('| ') for line in sections[title].splitlines())
    assert rows_of('Every run') == 1 + len(methods)                       # the header, then one row per run
    assert rows_of('Against the SFT model, with 95% intervals') == len(methods)   # the header, every policy (not the reward model)
    assert 'Judge score per task' in sections
    assert '(metrics.png)' in md and (out/'metrics.png').stat().st_size > 10_000 and (out/'training.png').exists()
    assert '| method | judge |' in stdout
    rc, stdout, err = cli('tour', '--model', 'tiny', '--quick', '--out', out)
    assert rc == 2 and 'already holds a tour' in err

# ---- every user error: one line on stderr, exit status 2; --debug adds the traceback

def _mistakes(tmp_path):
    "(argv, a phrase the line must hold) for each kind of mistake a user can make."
    (tmp_path/'typo.yaml').write_text("method: dpo\nleraning_rate: 1e-4\n")
    (tmp_path/'broken.yaml').write_text("steps: [1,\n")
    (tmp_path/'bad.jsonl').write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    (tmp_path/'notjson.jsonl').write_text('{"messages": \n')
    (tmp_path/'latin1.jsonl').write_bytes(b'{"messages": "caf\xe9"}\n')
    (tmp_path/'folder.jsonl').mkdir()
    (tmp_path/'notes').mkdir()
    (tmp_path/'notes'/'thesis.tex').write_text('precious')
    crashed = tmp_path/'crashed'          # a run folder whose run never finished: config.yaml and no weights
    crashed.mkdir()
    (crashed/'config.yaml').write_text("method: sft\nmodel: tiny\n")
    return [
        (['chat', '--model', 'typo/not-a-model', '--prompt', 'hi'], "Could not load the model 'typo/not-a-model'"),
        (['sft', '--model', 'typo/not-a-model', '--output-dir', tmp_path/'o1'], "Could not load the model"),
        (['sft', '--model', 'tiny', '--dataset', tmp_path/'nothere.jsonl'], 'no such file'),
        (['sft', '--model', 'tiny', '--dataset', tmp_path/'folder.jsonl'], 'is a folder'),
        (['sft', '--config', tmp_path/'missing.yaml'], 'no such file'),
        (['sft', '--config', tmp_path/'notes'], 'is a folder'),
        (['sft', '--model', 'tiny', '--dataset', tmp_path/'bad.jsonl', '--output-dir', tmp_path/'o2'], 'row 1'),
        (['sft', '--model', 'tiny', '--dataset', tmp_path/'notjson.jsonl', '--output-dir', tmp_path/'o3'], 'not valid JSON'),
        (['sft', '--model', 'tiny', '--dataset', tmp_path/'latin1.jsonl', '--output-dir', tmp_path/'o4'], 'not UTF-8'),
        (['dpo', '--config', tmp_path/'typo.yaml'], "did you mean 'learning_rate'"),
        (['sft', '--config', tmp_path/'broken.yaml'], 'not valid YAML'),
        (['chat', '--run', tmp_path/'notes', '--prompt', 'hi'], 'not a run folder'),
        (['chat', '--run', crashed, '--prompt', 'hi'], 'no trainable.safetensors'),
        (['sft', '--model', 'tiny', '--base-run', tmp_path/'notes'], 'not a run folder'),
        (['ppo', '--model', 'tiny', '--reward-model', tmp_path/'notes'], 'not a run folder'),
        (['sft', '--model', 'tiny', '--output-dir', tmp_path/'notes'], 'not a run'),
        (['ppo', '--model', 'tiny', '--warmup-steps', 5], 'ppo does not support warmup_steps=5'),
        (['sft', '--model', 'tiny', '--beta', 0.3], 'has no effect on a sft run'),
        (['sft', '--lora-rank', 4], 'unrecognized arguments: --lora-rank'),
        (['memory', '--dtype', 'int3'], "invalid choice: 'int3'"),
        (['params', '--model', 'no/such-model-offline'], 'no config for'),
        (['tour', '--model', 'tiny', '--quick', '--out', tmp_path/'notes'], 'not a tour'),
    ]

def test_every_user_error_is_one_line_and_status_2(tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    for argv, phrase in _mistakes(tmp_path):
        rc, out, err = cli(*argv)
        assert rc == 2, (argv, rc, err[-2000:])
        assert err.count('\n') == 1 and err.endswith('\n'), (argv, err[-2000:])   # exactly one line, no traceback
        assert phrase in err, (argv, err)
    assert (tmp_path/'notes'/'thesis.tex').read_text() == 'precious'
    assert not any((tmp_path/o).exists() for o in ('o1', 'o2', 'o3', 'o4'))    # nothing written before the error

def test_debug_shows_the_traceback(tmp_path):
    rc, out, err = cli('sft', '--model', 'tiny', '--dataset', tmp_path/'nothere.jsonl', '--debug')
    lines = err.strip().splitlines()
    assert rc == 2 and lines[0] == 'Traceback (most recent call last):' and len(lines) > 3
    assert lines[-1].startswith('ftcourse sft: error: ') and 'no such file' in lines[-1]

def test_the_console_script_prints_one_line(tmp_path):
    "The installed `ftcourse` command in a fresh process, offline: the two inputs that used to print tracebacks."
    ftc = shutil.which('ftcourse') or str(Path(sys.executable).parent/'ftcourse')
    env = dict(os.environ, HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1')
    for argv in (['chat', '--model', 'typo/not-a-model', '--prompt', 'hi'], ['sft', '--model', 'tiny', '--dataset', 'nothere.jsonl']):
        r = subprocess.run([ftc, *argv], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and r.stdout == '' and r.stderr.count('\n') == 1, (argv, r.stderr[-3000:])
        assert r.stderr.startswith(f'ftcourse {argv[0]}: error: ')

def test_a_bug_still_shows_its_traceback(monkeypatch):
    "Only user errors become one line: anything else is a bug, and its traceback is not hidden."
    import ftcourse.cli as cli_module
    def broken(args): raise ZeroDivisionError('a bug')
    monkeypatch.setattr(cli_module, 'cmd_params', broken)
    with pytest.raises(ZeroDivisionError): main(['params'])

def test_chat_with_a_local_model_folder(tmp_path):
    "`ftcourse chat --model PATH` loads a folder written by `save_pretrained`, as a merged export is, and answers as the model does."
    from ftcourse.core import tiny_model
    from ftcourse.cli import chat_reply
    model, tok = tiny_model()
    model.save_pretrained(tmp_path/'merged')
    tok.save_pretrained(tmp_path/'merged')
    rc, out, err = cli('chat', '--model', tmp_path/'merged', '--prompt', 'hi', '--max-new-tokens', 6)
    assert rc == 0, err
    assert out.rstrip('\n') == chat_reply(model, tok, [dict(role='user', content='hi')], max_new_tokens=6)

def test_export_a_run_and_chat_with_the_merged_model(tmp_path):
    "`ftcourse export` writes a merged model that `ftcourse chat --model` answers with as the run does; bad input is one line."
    assert cli('sft', *TINY, '--steps', 2, '--lr', 1e-2, '--output-dir', tmp_path/'r')[0] == 0
    rc, out, err = cli('export', '--run', tmp_path/'r', '--format', 'merged', '--out', tmp_path/'merged')
    assert rc == 0 and str(tmp_path/'merged') in out, err
    chat = ['--prompt', 'What is 2+3?', '--max-new-tokens', 8]
    rc_run, from_run, err = cli('chat', '--run', tmp_path/'r', *chat)
    rc_exp, from_export, err = cli('chat', '--model', tmp_path/'merged', *chat)
    assert rc_run == rc_exp == 0 and from_export == from_run, err
    assert cli('sft', *TINY, '--steps', 1, '--adapter', 'full', '--output-dir', tmp_path/'full')[0] == 0
    for argv, phrase in [(['--run', tmp_path/'r', '--format', 'merged', '--out', tmp_path/'merged'], 'exists'),
                         (['--run', tmp_path, '--format', 'merged', '--out', tmp_path/'m2'], 'not a run folder'),
                         (['--run', tmp_path/'full', '--format', 'peft', '--out', tmp_path/'p'], '--format merged'),
                         (['--run', tmp_path/'r', '--format', 'onnx', '--out', tmp_path/'o'], "invalid choice: 'onnx'")]:
        rc, out, err = cli('export', *argv)
        assert rc == 2 and err.count('\n') == 1 and phrase in err, (argv, err)
    rc, out, err = cli('export', '--run', tmp_path/'r', '--format', 'merged', '--out', tmp_path/'merged', '--overwrite')
    assert rc == 0, err

def test_one_parser_hf_argument_parser_yaml_first_flags_win(tmp_path):
    "The options are parsed by transformers' HfArgumentParser, from the YAML file and then the flags, with the same types."
    from transformers import HfArgumentParser
    from ftcourse.config import OptionParser
    assert isinstance(OptionParser(), HfArgumentParser)
    rc, out, err = cli('sft', '--help')
    assert rc == 0 and '--save_every' in out and '--resume' in out and '(default: 8)' in out and '--beta' not in out
    assert '--beta' in cli('dpo', '--help')[1] and '--ppo_epochs' not in cli('dpo', '--help')[1]
    rc, out, err = cli('sft', '--lora-rank', 4)
    assert rc == 2 and "did you mean '--lora-r'" in err and err.count('\n') == 1
    (tmp_path/'bad.yaml').write_text("steps: ten\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: steps must be int, got 'ten'"): load_config(tmp_path/'bad.yaml')
    (tmp_path/'ok.yaml').write_text("model: tiny\nsteps: 7\nbase_run: null\noverwrite: yes\nmicro_batch_size: 2\n")
    cfg = load_config(tmp_path/'ok.yaml', dict(steps='5', micro_batch_size=None))
    assert (cfg.steps, cfg.overwrite, cfg.micro_batch_size, cfg.base_run) == (5, True, 2, None)
    with pytest.raises(ConfigError, match='steps cannot be empty'): load_config(overrides=None, path=_write(tmp_path, "steps:\n"))
    rc, out, err = cli('sft', '--method', 'dpo')
    assert rc == 2 and 'run it with `ftcourse dpo`' in err
    # the loop's name for the learning rate is `lr`; the name it had is still read, from a file or a flag
    (tmp_path/'old.yaml').write_text("learning_rate: 1.0e-3\n")
    assert load_config(tmp_path/'old.yaml').lr == 1e-3 == load_config(overrides=dict(learning_rate=1e-3)).lr
    assert 'learning_rate' not in config_yaml(load_config(tmp_path/'old.yaml'))
    assert RunConfig(learning_rate=1e-3).lr == 1e-3

def _write(tmp_path, text):
    (tmp_path/'t.yaml').write_text(text)
    return tmp_path/'t.yaml'

def test_grpo_runs_from_flags_and_yaml_and_refuses_what_it_cannot_do(tmp_path):
    "`ftcourse grpo`: a tiny run writes a run folder that reloads; bad options are one line and status 2 (configs/grpo.yaml: test_runs)."
    rc, out, err = cli('grpo', '--model', 'tiny', '--mixed-precision', 'no', '--steps', 2, '--batch-size', 2,
                       '--grpo-num-generations', 4, '--grpo-max-new-tokens', 6, '--grpo-tasks', 'parity,compare',
                       '--eval-every', 0, '--output-dir', tmp_path/'g')
    assert rc == 0, err
    assert 'prompts of the tasks parity, compare' in out
    saved = read_run_config(tmp_path/'g')
    assert (saved.method, saved.grpo_num_generations, saved.grpo_tasks) == ('grpo', 4, 'parity,compare')
    model, _ = load_run(tmp_path/'g')
    assert model is not None
    for flags, msg in ((['--grpo-loss-type', 'nope'], 'grpo_loss_type must be one of'),
                       (['--grpo-num-generations', 1], 'at least 2'),
                       (['--weight-decay', 0.1], 'grpo does not support weight_decay'),
                       (['--grpo-tasks', 'nosuchtask', '--steps', 1], 'no training row has one of these tasks'),
                       (['--beta', 0.1], 'beta has no effect on a grpo run')):
        rc, out, err = cli('grpo', '--model', 'tiny', *flags, '--output-dir', tmp_path/'bad')
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, (flags, err)
