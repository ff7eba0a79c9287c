"`ftcourse.runs` and `ftcourse.methods`: every option takes effect in its method or is refused naming the method; one writer per run folder."
import contextlib, inspect, io, json
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file
from ftcourse.config import FIXED, METHOD_ONLY, METHODS, ConfigError, RunConfig, load_config, read_run_config
from ftcourse.runs import is_main_process, load_run
from ftcourse.methods import TRAINERS, run

TINY = dict(model='tiny', n_eval=8, batch_size=4, lr=1e-3)
PPO_TINY = dict(method='ppo', model='tiny', batch_size=4, lr=1e-3)   # PPO holds no rows out: no n_eval

@pytest.mark.parametrize('option, value', [('warmup_steps', 5), ('weight_decay', 0.1), ('eval_every', 5),
                                           ('eval_dataset', 'held_out.jsonl'), ('n_eval', 16), ('strategy', 'fsdp')])
def test_ppo_refuses_each_option_it_would_ignore(option, value):
    with pytest.raises(ConfigError, match=rf"{option}=.* ppo"): load_config(overrides=dict(method='ppo', **{option: value}))

@pytest.mark.parametrize('option, value', [('beta', 0.3), ('orpo_lambda', 0.5), ('reward_model', 'runs/reward'),
                                           ('ppo_max_new_tokens', 8), ('ppo_kl_coef', 0.2), ('ppo_epochs', 4)])
def test_other_methods_refuse_an_option_they_would_ignore(option, value):
    for method in METHODS:
        if method in METHOD_ONLY[option]: continue
        with pytest.raises(ConfigError, match=f"has no effect on a {method} run"):
            load_config(overrides=dict(method=method, **{option: value}))

def test_every_option_is_read_by_every_method_or_listed():
    "An option that is neither used by all methods nor listed as method-only or fixed would slip through unchecked."
    from ftcourse import runs, methods
    assert set(TRAINERS) == set(METHODS)       # every method with options has a trainer
    source = inspect.getsource(methods) + inspect.getsource(runs.build_model) + inspect.getsource(runs.add_adapter) + \
             inspect.getsource(runs._lora_targets)
    from dataclasses import fields
    from ftcourse.train import TrainConfig
    loop = {f.name for f in fields(TrainConfig)}           # train_config copies the options named as the loop names them
    unread = [f.name for f in fields(RunConfig) if f'cfg.{f.name}' not in source and f.name not in set(METHOD_ONLY) | loop]
    assert set(unread) <= {'method', 'output_dir', 'overwrite', 'seed'}, unread   # these four run() and the folder use

def test_ppo_fixed_values_are_what_train_ppo_runs_with(tmp_path, monkeypatch):
    """The values a ppo run is pinned to are the ones chapter 7's train_ppo gives the loop (AdamW's default decay, no
    warmup); the run's folder, save_every (counted in iterations) and log_with reach the loop."""
    from ftcourse import ppo
    from ftcourse.train import History
    assert inspect.signature(torch.optim.AdamW).parameters['weight_decay'].default == FIXED['ppo']['weight_decay'][0]
    cfg = load_config(overrides=dict(method='ppo'))
    assert (cfg.warmup_steps, cfg.weight_decay, cfg.eval_every, cfg.log_with, cfg.strategy) == (0, 0.01, 0, None, 'ddp')
    with pytest.raises(ConfigError, match='ppo does not support'): run(RunConfig(method='ppo', model='tiny'))   # built directly
    seen = {}
    def train(model, loss_fn, data, loop, collate_fn): seen['loop'] = loop; return History()
    monkeypatch.setattr(ppo, 'train', train)
    flags = dict(PPO_TINY, steps=3, ppo_epochs=2, save_every=2, log_with='tensorboard', output_dir=str(tmp_path/'p'))
    with contextlib.redirect_stdout(io.StringIO()): run(load_config(overrides=flags), device='cpu')
    loop = seen['loop']
    updates = 2 * 2                                    # ppo_epochs x batch_size / micro_batch_size (half the batch)
    assert (loop.warmup_steps, loop.weight_decay, loop.eval_every) == (0, FIXED['ppo']['weight_decay'][0], 0)
    assert (loop.steps, loop.save_every, loop.log_with) == (3 * updates, 2 * updates, ['tensorboard'])
    assert loop.out_dir == str(tmp_path/'p') and not loop.resume
    assert (tmp_path/'p'/'value_head.safetensors').exists()

def test_grpo_passes_the_runs_folder_checkpoints_and_trackers_to_the_loop(tmp_path, monkeypatch):
    "A grpo run's folder, save_every, resume and log_with reach the loop (none is fixed); its collate has `set_step`."
    from ftcourse import grpo
    from ftcourse.train import History
    assert not {'save_every', 'resume', 'log_with'} & set(FIXED['grpo'])
    seen = {}
    def train(model, loss_fn, data, loop, collate_fn, eval_fn=None):
        seen.update(loop=loop, collate_fn=collate_fn)
        return History()
    monkeypatch.setattr(grpo, 'train', train)
    flags = dict(method='grpo', model='tiny', batch_size=4, micro_batch_size=2, steps=3, save_every=2,
                 log_with='tensorboard', output_dir=str(tmp_path/'g'))
    with contextlib.redirect_stdout(io.StringIO()): run(load_config(overrides=flags), device='cpu')
    loop = seen['loop']
    assert (loop.steps, loop.save_every, loop.log_with, loop.keep_checkpoints) == (3, 2, ['tensorboard'], 1)
    assert loop.out_dir == str(tmp_path/'g') and not loop.resume
    assert callable(seen['collate_fn'].set_step)

def test_fsdp_is_refused_exactly_by_the_methods_that_do_not_train_through_the_loop():
    "FSDP is chapter 2b's `train(strategy='fsdp')`: a method whose trainer calls `train` takes it, the others refuse it."
    import re
    from ftcourse import methods, reward, ppo, dpo, orpo, grpo
    trainers = dict(sft=methods.train_sft, reward=reward.train_reward, ppo=ppo.train_ppo, grpo=grpo.train_grpo,
                    dpo=dpo.train_dpo, orpo=orpo.train_orpo)
    assert set(trainers) == set(METHODS)
    # GRPO and PPO train through the loop but generate inside it (their collates sample): under FSDP every process must
    # join every forward, and sampled answers end at different lengths on each, so they refuse FSDP with that reason
    samples_in_loop = {'grpo', 'ppo'}
    for method, trainer in trainers.items():
        src = inspect.getsource(trainer)
        uses_loop = re.search(r'(?<![\w.])train\(', src) is not None
        takes_fsdp = uses_loop and method not in samples_in_loop
        assert takes_fsdp == ('strategy' not in FIXED.get(method, {})), method
        if takes_fsdp: assert load_config(overrides=dict(method=method, strategy='fsdp')).strategy == 'fsdp'
    for trainer in (grpo.train_grpo, ppo.train_ppo):   # they do use the loop
        assert re.search(r'(?<![\w.])train\(', inspect.getsource(trainer))

def test_bad_strategies_stop_the_command_with_one_line(tmp_path, capsys):
    "A strategy that is not ddp/fsdp, and fsdp in a lone process, are one line and exit status 2, before any loading."
    from ftcourse.cli import main
    base = ['sft', '--model', 'tiny', '--steps', '1', '--output-dir', str(tmp_path/'r')]
    for flags, message in ((['--strategy', 'zero3'], 'strategy must be one of ddp, fsdp'),
                           (['--strategy', 'fsdp'], 'torchrun --nproc_per_node 2 -m ftcourse.cli sft --strategy fsdp')):
        assert main([*base, *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path/'r').exists()                    # refused before the run folder was written

def test_ppo_run_uses_sequence_len_and_all_rows(tmp_path):
    "sequence_len keeps only prompts with room for the new tokens; a ppo run holds no rows out and reloads."
    rows = [dict(prompt='What is 2+2?' + ' Think.' * (i % 5) * 8, answer='4') for i in range(20)]
    (tmp_path/'p.jsonl').write_text(''.join(json.dumps(dict(prompt=r['prompt'], chosen='4', rejected='5', answer='4')) + '\n'
                                            for r in rows))
    from ftcourse.core import tiny_model
    from ftcourse.sft import chat_ids
    tok = tiny_model()[1]
    lengths = [len(chat_ids(tok, [dict(role='user', content=r['prompt'])], add_generation_prompt=True)) for r in rows]
    seq_len = sorted(lengths)[10] + 4     # room for the shorter half or so
    expect = sum(n + 4 <= seq_len for n in lengths)
    assert 0 < expect < len(rows)
    o = io.StringIO()
    with contextlib.redirect_stdout(o):
        run(load_config(overrides=dict(PPO_TINY, steps=1, dataset=str(tmp_path/'p.jsonl'),
                                       sequence_len=seq_len, ppo_max_new_tokens=4, output_dir=str(tmp_path/'ppo'))), device='cpu')
    assert f"{expect} prompts kept, {len(rows) - expect} dropped" in o.getvalue()
    assert 'held out' not in o.getvalue()
    assert read_run_config(tmp_path/'ppo').weight_decay == 0.01 and (tmp_path/'ppo'/'value_head.safetensors').exists()
    with pytest.raises(ConfigError, match='no prompt fits'):
        run(load_config(overrides=dict(PPO_TINY, steps=1, dataset=str(tmp_path/'p.jsonl'), sequence_len=min(lengths) + 3,
                                       ppo_max_new_tokens=4, output_dir=str(tmp_path/'none'))), device='cpu')

def test_only_the_main_process_writes_the_run_folder(tmp_path, monkeypatch):
    "A process that is not rank 0 trains but leaves config.yaml, metrics, weights and summary to the main process."
    assert is_main_process()
    monkeypatch.setenv('RANK', '1')
    assert not is_main_process()
    res = run(load_config(overrides=dict(TINY, steps=1, eval_every=0, output_dir=str(tmp_path/'r'))), device='cpu')
    written = {p.name for p in (tmp_path/'r').glob('*')} if (tmp_path/'r').exists() else set()
    assert not written & {'config.yaml', 'trainable.safetensors', 'summary.json'}, written   # the loop's log: test_distributed
    assert res['history'] and res['trainable_params'] > 0     # it did train

@pytest.mark.parametrize('use_dora', [False, True])
def test_a_run_can_start_from_a_peft_adapter_folder(tmp_path, use_dora):
    "--base-run accepts a peft LoRA or DoRA folder: the run's starting model is the base with peft's adapter merged in."
    from peft import LoraConfig, get_peft_model
    from ftcourse.core import tiny_model
    from ftcourse.cli import main
    from ftcourse.export import load_peft_adapter
    base, tok = tiny_model()
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj'], init_lora_weights=False,
                                                 use_dora=use_dora))
    with torch.no_grad():     # trained magnitudes: DoRA differs from LoRA only once they leave their initial norms
        for n, p in peft_model.named_parameters():
            if 'lora_magnitude_vector' in n: p.mul_(1 + torch.rand_like(p))
    peft_model.save_pretrained(tmp_path/'adapter')
    x = torch.randint(0, len(tok), (2, 9))
    with torch.no_grad(): want = peft_model(input_ids=x).logits
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(['sft', '--model', 'tiny', '--n-eval', '8', '--eval-every', '0', '--steps', '1', '--lr', '1e-9',
                     '--base-run', str(tmp_path/'adapter'), '--output-dir', str(tmp_path/'r')]) == 0
    got = load_run(tmp_path/'r', peft_loader=load_peft_adapter)[0]
    with torch.no_grad(): torch.testing.assert_close(got(x).logits, want, rtol=1e-4, atol=1e-4)   # lr 1e-9: the start, merged
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):    # the command reloads it too
        assert main(['chat', '--run', str(tmp_path/'r'), '--prompt', 'hi', '--max-new-tokens', '2']) == 0

def test_the_recipes_in_configs_are_the_tours_runs(tmp_path, monkeypatch):
    "configs/*.yaml, the files a user copies, load cleanly and equal the tour's five runs on a CPU."
    from ftcourse.tour import TOUR_ORDER, tour_configs
    from dataclasses import asdict
    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(tmp_path)                      # base_run and reward_model must be run folders: make them
    for m in ('sft', 'reward'):
        (tmp_path/'runs'/m).mkdir(parents=True)
        (tmp_path/'runs'/m/'config.yaml').write_text(f"method: {m}\n")
    want = tour_configs('runs', device='cpu')
    for m in TOUR_ORDER:
        got = load_config(root/'configs'/f'{m}.yaml')
        assert asdict(got) == asdict(want[m]), m

def test_load_trainable_refuses_a_file_without_every_trained_parameter(tmp_path):
    "A trained parameter with no tensor in the file would keep its initial value: refused, naming it."
    from safetensors.torch import save_file
    from ftcourse.runs import build_model, load_trainable, save_trainable
    model = build_model(RunConfig(model='tiny', lora_target_modules='q_proj,v_proj'))[0]
    save_trainable(model, tmp_path/'all.safetensors')
    load_trainable(model, tmp_path/'all.safetensors')
    tensors = load_file(tmp_path/'all.safetensors')
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, tmp_path/'some.safetensors')
    with pytest.raises(KeyError, match=f"no tensor for the trained parameter '{dropped}' .1 missing"):
        load_trainable(model, tmp_path/'some.safetensors')
