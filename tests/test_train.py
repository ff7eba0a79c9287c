"The training loop: accumulation by token count, schedule, resuming, NaN stop, atomic checkpoints."
import contextlib, json, math
import pytest, torch
from transformers import get_cosine_schedule_with_warmup
from ftcourse.core import tiny_model, load_course_dataset
from ftcourse.sft import build_sft_example, collate_sft, sft_loss_fn
from ftcourse.train import (TrainConfig, train, read_history, History, cosine_with_warmup, batch_indices, count_items,
                            latest_checkpoint, load_checkpoint, save_checkpoint, evaluate)

@pytest.fixture(scope='module')
def data():
    m, tok = tiny_model()
    rows = load_course_dataset('sft', 'train').select(range(32))
    exs = [build_sft_example(tok, r['messages'], 256) for r in rows]
    return [dict(input_ids=e['input_ids'], labels=e['labels']) for e in exs], collate_sft(tok)

def _grads(data, micro, batch=4):
    exs, coll = data
    m, _ = tiny_model()
    grads = {}
    orig = torch.optim.AdamW.step
    def spy(self, *a, **k):
        grads.update({n: p.grad.clone() for n, p in m.named_parameters()}); return orig(self, *a, **k)
    torch.optim.AdamW.step = spy
    try: train(m, sft_loss_fn, exs, TrainConfig(steps=1, batch_size=batch, micro_batch_size=micro, max_grad_norm=None, eval_every=0, progress=False, mixed_precision="no"), collate_fn=coll)
    finally: torch.optim.AdamW.step = orig
    return grads

def test_accumulating_4_micro_batches_equals_one_batch_of_4(data):
    exs, coll = data
    counts = [count_items(coll([exs[i]])) for i in batch_indices(0, 4, len(exs))]
    assert len(set(counts)) > 1, "the test needs micro-batches with different token counts"
    g4, g1, g2 = _grads(data, 4), _grads(data, 1), _grads(data, 2)
    for n in g4:
        assert torch.allclose(g1[n], g4[n], rtol=1e-5, atol=1e-7), n
        assert torch.allclose(g2[n], g4[n], rtol=1e-5, atol=1e-7), n

def test_naive_mean_of_means_would_differ(data):
    "The normalisation matters: averaging micro-batch means gives another gradient (so the test above can fail)."
    exs, coll = data
    m, _ = tiny_model(); idx = batch_indices(0, 4, len(exs))
    for i in idx: (sft_loss_fn(m, coll([exs[i]]))[0] / 4).backward()
    naive = {n: p.grad.clone() for n, p in m.named_parameters()}
    g4 = _grads(data, 4)
    assert any(not torch.allclose(naive[n], g4[n], rtol=1e-3, atol=1e-6) for n in g4)

def test_schedule_matches_transformers():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = get_cosine_schedule_with_warmup(opt, num_warmup_steps=7, num_training_steps=50)
    for s in range(60): assert cosine_with_warmup(s, 7, 50) == hf.lr_lambdas[0](s)

def test_data_order_covers_every_example_each_epoch():
    stream = [i for s in range(10) for i in batch_indices(s, 3, 10, seed=4)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert batch_indices(2, 4, 10, shuffle=False) == [8, 9, 0, 1]

def _run(data, out_dir, crash_at=None, resume=False, steps=6, cfg_resume=False):
    exs, coll = data
    m, _ = tiny_model(); calls = dict(n=0)
    def loss_fn(model, b):
        calls['n'] += model.training                 # count training forwards only (evaluation runs in eval mode)
        if crash_at and calls['n'] == crash_at: raise RuntimeError('simulated crash')
        return sft_loss_fn(model, b)
    cfg = TrainConfig(steps=steps, batch_size=4, micro_batch_size=2, lr=1e-3, warmup_steps=2, save_every=2, eval_every=3,
                      out_dir=str(out_dir), progress=False, mixed_precision="no", resume=cfg_resume)
    try: h = train(m, loss_fn, exs, cfg, collate_fn=coll, eval_data=exs[:8], resume=resume)
    except RuntimeError: h = None
    return m, h

def test_resume_gives_the_uninterrupted_parameters(data, tmp_path):
    whole, h = _run(data, tmp_path/'a')
    _run(data, tmp_path/'b', crash_at=9)                   # dies in step 5 (2 micro-batches a step), after checkpoint-4
    assert latest_checkpoint(tmp_path/'b').name == 'checkpoint-000004'
    resumed, h2 = _run(data, tmp_path/'b', resume=True)
    for (n, p), q in zip(whole.named_parameters(), resumed.parameters()): assert torch.equal(p, q), n
    assert [r['step'] for r in h if 'loss' in r] == [r['step'] for r in h2 if 'loss' in r] == [1, 2, 3, 4, 5, 6]
    assert [r['loss'] for r in h if 'loss' in r] == [r['loss'] for r in h2 if 'loss' in r]
    assert h.series('eval_loss')[0] == [0, 3, 6]
    lines = (tmp_path/'b'/'metrics.jsonl').read_text().splitlines()
    assert [json.loads(l)['step'] for l in lines] == [r['step'] for r in h2]
    logged = read_history(tmp_path/'b'/'metrics.jsonl')          # the run's one log, read back as the loop returned it
    assert isinstance(logged, History) and [{k: v for k, v in r.items() if k != 'seconds'} for r in logged] == \
        [{k: v for k, v in r.items() if k != 'seconds'} for r in h2]
    assert not list((tmp_path/'b').glob('.tmp-*')) and len(list((tmp_path/'b').glob('checkpoint-*'))) == 2

def test_nan_loss_stops_before_the_weights_change(data):
    exs, coll = data
    m, _ = tiny_model(); before = [p.clone() for p in m.parameters()]
    def nan_loss(model, b):
        l, met = sft_loss_fn(model, b); return l * float('nan'), met
    with pytest.raises(FloatingPointError, match='the loss is nan at step 1'):
        train(m, nan_loss, exs, TrainConfig(steps=3, eval_every=0, progress=False), collate_fn=coll)
    assert all(torch.equal(p, q) for p, q in zip(before, m.parameters()))

def test_checkpoint_roundtrip_uses_safe_formats(data, tmp_path):
    exs, coll = data
    m, _ = tiny_model()
    train(m, sft_loss_fn, exs, TrainConfig(steps=2, eval_every=0, out_dir=str(tmp_path), progress=False), collate_fn=coll)
    ck = latest_checkpoint(tmp_path)
    assert (ck/'trainable.safetensors').exists() and ck.name == 'checkpoint-000002'
    m2, _ = tiny_model(seed=1)
    load_checkpoint(ck, m2)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), m2.parameters()))

def test_bad_config_is_a_clear_error(data):
    exs, coll = data
    m, _ = tiny_model()
    with pytest.raises(ValueError, match='batch_size=4 must split'):
        train(m, sft_loss_fn, exs, TrainConfig(steps=1, batch_size=4, micro_batch_size=3, progress=False), collate_fn=coll)
    for p in m.parameters(): p.requires_grad_(False)
    with pytest.raises(ValueError, match='nothing to train'):
        train(m, sft_loss_fn, exs, TrainConfig(steps=1, progress=False), collate_fn=coll)

def test_strategy_errors_are_clear(data):
    exs, coll = data
    m, _ = tiny_model()
    with pytest.raises(ValueError, match="strategy='zero3': use 'ddp' or 'fsdp'"):
        train(m, sft_loss_fn, exs, TrainConfig(steps=1, strategy='zero3', progress=False), collate_fn=coll)
    with pytest.raises(ValueError, match="strategy='fsdp' shards the model across processes: start them with torchrun"):
        train(m, sft_loss_fn, exs, TrainConfig(steps=1, strategy='fsdp', progress=False), collate_fn=coll)


def test_evaluate_is_the_item_weighted_mean_and_restores_the_mode(data):
    "Held-out loss over uneven batches equals the loss of one batch of all the examples; the model's mode comes back."
    exs, coll = data
    m, _ = tiny_model()
    m.train()
    held_out = evaluate(m, sft_loss_fn, exs[:8], coll, batch_size=3)['eval_loss']   # batches of 3, 3 and 2
    assert m.training
    m.eval()
    with torch.no_grad(): whole = sft_loss_fn(m, coll(exs[:8]))[0].item()
    assert abs(held_out - whole) < 1e-5 * whole

def test_resume_through_the_config(data, tmp_path, capsys):
    "`TrainConfig(resume=True)` resumes as `train(..., resume=True)` does."
    whole, h = _run(data, tmp_path/'a')
    _run(data, tmp_path/'b', crash_at=9)                   # dies after checkpoint-4
    capsys.readouterr()
    resumed, h2 = _run(data, tmp_path/'b', cfg_resume=True)
    assert 'checkpoint-000004 at step 4' in capsys.readouterr().out   # a fresh run would give the same weights: check it resumed
    assert [r['loss'] for r in h if 'loss' in r] == [r['loss'] for r in h2 if 'loss' in r]   # steps 1-4 from the checkpoint
    for (n, p), q in zip(whole.named_parameters(), resumed.parameters()): assert torch.equal(p, q), n

def test_trained_model_runs_without_the_autocast_wrapper(data):
    "After a bf16 run, forward runs in the caller's precision: fp32 logits equal to a plain copy of the weights'."
    exs, coll = data
    m, _ = tiny_model()
    train(m, sft_loss_fn, exs, TrainConfig(steps=1, batch_size=4, eval_every=0, progress=False, mixed_precision='bf16'),
          collate_fn=coll)
    copy, _ = tiny_model()
    copy.load_state_dict(m.state_dict())
    copy.eval()
    x = coll(exs[:2])['input_ids']
    with torch.no_grad(): assert torch.equal(m(x).logits, copy(x).logits)

class StepListener:
    "A collate function with the loop's `set_step` hook: it records each step it is told and each micro-batch it makes."
    def __init__(self, collate):
        self.collate, self.events = collate, []
    def set_step(self, step):
        self.events.append(step)
    def __call__(self, examples):
        self.events.append('micro-batch')
        return self.collate(examples)

def test_the_collate_is_told_every_step_in_order_and_a_resumed_run_the_steps_left(data, tmp_path):
    "`train` calls `collate_fn.set_step(step)` before it makes each step's micro-batches; a resumed run, from its step."
    exs, coll = data
    def run(out_dir, crash_at=None, resume=False):
        m, _ = tiny_model()
        listener, forwards = StepListener(coll), dict(n=0)
        def loss_fn(model, batch):
            forwards['n'] += 1
            if forwards['n'] == crash_at: raise RuntimeError('simulated crash')
            return sft_loss_fn(model, batch)
        cfg = TrainConfig(steps=5, batch_size=4, micro_batch_size=2, save_every=2, eval_every=0, out_dir=str(out_dir),
                          progress=False, mixed_precision='no')
        with contextlib.suppress(RuntimeError): train(m, loss_fn, exs, cfg, collate_fn=listener, resume=resume)
        return listener.events
    step = lambda s: [s, 'micro-batch', 'micro-batch']     # two micro-batches a step, built after the step is told
    assert run(tmp_path/'whole') == [e for s in range(5) for e in step(s)]
    assert run(tmp_path/'cut', crash_at=7) == [e for s in range(4) for e in step(s)]   # dies in step 3's first forward
    assert latest_checkpoint(tmp_path/'cut').name == 'checkpoint-000002'
    assert run(tmp_path/'cut', resume=True) == [e for s in (2, 3, 4) for e in step(s)]
