"ORPO: log-odds, the loss against trl's ORPOTrainer (loss, metrics, gradients), the paper's NLL, the trainer."
import logging
import pytest, torch
from ftcourse.core import tiny_model, load_course_dataset, set_seed
from ftcourse.sft import preference_dataset, sft_loss
from ftcourse.lora import apply_lora, lora_layers
from ftcourse.dpo import collate_dpo, compare_metrics, preference_metrics
from ftcourse.orpo import (log1mexp, log_odds, orpo_loss, orpo_loss_fn, TRL_ORPO_METRICS, trl_orpo_trainer, trl_orpo_batch,
                           train_orpo, step_memory)
from ftcourse.train import TrainConfig

logging.getLogger('trl').setLevel(logging.ERROR)

@pytest.fixture(scope='module')
def rows(): return load_course_dataset('preference', 'train').select(range(8))

def test_log1mexp_matches_float64_and_trl():
    from trl.experimental.orpo.orpo_trainer import log1mexp as trl_log1mexp
    x = -torch.logspace(-8, 2, 200)
    exact = torch.log(-torch.expm1(x.double())).float()
    torch.testing.assert_close(log1mexp(x), exact, rtol=1e-6, atol=1e-12)   # atol: float32 underflow far below 0
    assert torch.equal(log1mexp(x), trl_log1mexp(x))
    p = torch.rand(50).clamp(1e-4, 1 - 1e-4)
    torch.testing.assert_close(log_odds(p.log()), torch.log(p / (1 - p)), rtol=1e-4, atol=1e-5)

def test_orpo_loss_values():
    lp = torch.tensor([-0.3, -2.0])
    loss, aux = orpo_loss(lp, lp, torch.tensor(0.5), lam=0.2)
    assert torch.isclose(loss, torch.tensor(0.5 + 0.2 * 0.6931472)) and aux['log_odds_chosen'] == 0
    # the odds-ratio term alone: λ·softplus(−log OR) with log OR from the definition
    c, r = torch.tensor([-0.1]), torch.tensor([-1.5])
    pc, pr = c.exp(), r.exp()
    log_or = torch.log(pc / (1 - pc)) - torch.log(pr / (1 - pr))
    loss, aux = orpo_loss(c, r, torch.tensor(0.0), lam=1.0)
    torch.testing.assert_close(loss, torch.nn.functional.softplus(-log_or)[0], rtol=1e-5, atol=0)

def _grads(m, loss):
    loss.backward(); g = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}; m.zero_grad(set_to_none=True)
    return g

@pytest.mark.parametrize('lora', [False, True])
def test_matches_trl(rows, lora):
    m, tok = tiny_model(seed=2)
    if lora:
        apply_lora(m, r=4, alpha=8, target_modules='all-linear'); set_seed(3)
        for l in lora_layers(m).values(): torch.nn.init.normal_(l.lora_B, std=0.05)
    tr = trl_orpo_trainer(m, tok, rows, lam=0.25)
    b = collate_dpo(tok)(preference_dataset(rows, tok, 128, verbose=False)[0])
    m.train()
    l_trl, m_trl = tr.get_batch_loss_metrics(m, trl_orpo_batch(b), 'train'); g_trl = _grads(m, l_trl)
    l_ours, m_ours = orpo_loss_fn(0.25, nll_on='sequence')(m, b); g_ours = _grads(m, l_ours)
    torch.testing.assert_close(l_ours, l_trl, rtol=1e-5, atol=0)
    for k, (a, t, d) in compare_metrics(m_ours, m_trl, TRL_ORPO_METRICS).items(): assert d <= 1e-5 * max(1, abs(t)), (k, a, t)
    assert g_ours.keys() == g_trl.keys() and g_ours
    for n in g_trl: assert (g_ours[n] - g_trl[n]).abs().max() <= 1e-4 * g_trl[n].abs().max() + 1e-9, n

def test_paper_nll_is_sft_loss_on_chosen(rows):
    m, tok = tiny_model(seed=1)
    b = collate_dpo(tok)(preference_dataset(rows, tok, 128, verbose=False)[0])
    with torch.no_grad():
        _, mt = orpo_loss_fn(0.1)(m, b)
        _, ms = orpo_loss_fn(0.1, nll_on='sequence')(m, b)
        sft = sft_loss(m(input_ids=b['input_ids'][:8], attention_mask=b['attention_mask'][:8]).logits, b['labels'][:8]).item()
    assert abs(mt['nll'] - sft) < 1e-5 * sft and abs(ms['nll'] - mt['nll']) > 1e-3   # the two spans really differ
    for k in ('chosen_logps', 'rejected_logps', 'log_odds_ratio', 'margin'): assert abs(mt[k] - ms[k]) < 1e-5 * max(1, abs(ms[k])), k
    with pytest.raises(ValueError, match='nll_on'): orpo_loss_fn(0.1, nll_on='prompt')

def test_train_orpo_learns_and_needs_no_reference(rows):
    m, tok = tiny_model(); apply_lora(m, r=8, alpha=16, target_modules='all-linear')
    cfg = TrainConfig(steps=8, batch_size=4, lr=3e-3, warmup_steps=0, eval_every=8, progress=False)
    h = train_orpo(m, tok, rows, eval_rows=rows.select(range(4)), cfg=cfg, lam=0.5, verbose=False)
    losses = [r['loss'] for r in h if 'loss' in r]
    assert losses[-1] < losses[0] and h.last('eval_nll') < h[0]['eval_nll']
    assert {'nll', 'log_odds_ratio', 'chosen_reward', 'accuracy', 'margin'} <= h[1].keys()
    pm = preference_metrics(m, tok, rows.select(range(4)))
    assert pm['chosen_reward'] > 0      # the SFT term made the chosen answers likelier than under the base model

def test_step_memory_counts_reference_and_activations(rows):
    m, tok = tiny_model(); apply_lora(m, r=4, alpha=8, target_modules='all-linear')
    b = collate_dpo(tok)(preference_dataset(rows, tok, 128, verbose=False)[0])
    a = step_memory(m, orpo_loss_fn(0.1), b)
    ref, _ = tiny_model()
    from ftcourse.dpo import dpo_loss_fn
    d = step_memory(m, dpo_loss_fn(0.1, ref_model=ref), b, ref_model=ref)
    assert a['activations'] > 0 and a['reference'] == 0
    assert d['reference'] == sum(p.numel() * 4 for p in ref.parameters())
    assert abs(d['activations'] - a['activations']) < 0.1 * a['activations']  # the reference forward saves nothing
