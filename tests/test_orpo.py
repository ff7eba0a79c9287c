"ORPO: log-odds, the loss against trl's ORPOTrainer (loss, metrics, gradients), the paper's NLL, the trainer."
import logging, math
import pytest, torch
from ftcourse.core import tiny_model, load_course_dataset, set_seed
from ftcourse.sft import preference_dataset, sft_loss
from ftcourse.lora import apply_lora, lora_layers
from ftcourse.dpo import collate_dpo, compare_metrics, preference_metrics, trl_paired_batch
from ftcourse.orpo import (log1mexp, log_odds, orpo_loss, orpo_loss_fn, TRL_ORPO_METRICS, trl_orpo_trainer,
                           train_orpo, step_memory, logp_preferences)
from ftcourse.dpo import concatenated_logps
from ftcourse.train import TrainConfig, train, count_items

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

@pytest.mark.parametrize('x', [-1e-6, -1e-8, 0.0])
def test_log1mexp_and_orpo_gradient_finite_near_zero(x):
    "A mean log-prob at or next to 0 (a confident model, or bf16) gives finite values and the true gradient, not NaN."
    tiny32 = torch.finfo(torch.float32).tiny
    xd = x if x < 0 else -tiny32                                        # at 0 the value is taken at -tiny
    xt = torch.tensor([x], requires_grad=True)
    v = log1mexp(xt); v.backward()
    f64 = lambda z: torch.tensor([z], dtype=torch.float64)
    torch.testing.assert_close(v.detach().double(), f64(math.log(-math.expm1(xd))), rtol=1e-6, atol=0)
    # d/dx log(1 - e^x) = e^x / expm1(x), in float64 (at 0: its value at -tiny, the one-sided limit to float precision)
    torch.testing.assert_close(xt.grad.double(), f64(math.exp(xd) / math.expm1(xd)), rtol=1e-5, atol=0)
    # orpo_loss with the chosen answer at x and the rejected at -1, λ = 0.1; its gradient in float64 by hand:
    # dL/dc = -λ σ(-log OR) d(log odds)/dc, with d(log odds)/dc = 1 - e^c / expm1(c);
    # at 0 its limit is -λ·odds(rejected)
    lam, r = 0.1, -1.0
    c = torch.tensor([x], requires_grad=True)
    loss, _ = orpo_loss(c, torch.tensor([r]), torch.tensor(0.0), lam=lam)
    loss.backward()
    lo = lambda z: z - math.log(-math.expm1(z))
    want = -lam / (1 + math.exp(lo(xd) - lo(r))) * (1 - math.exp(xd) / math.expm1(xd))
    assert torch.isfinite(loss) and torch.isfinite(c.grad).all()
    assert abs(c.grad.item() - want) < 1e-4 * abs(want), (c.grad.item(), want)
    assert abs(want - (-lam * math.exp(r) / -math.expm1(r))) < 1e-5     # ≈ -0.0582 at all three points
    # the rejected side at 0 too: finite, and log_odds finite in both directions
    z = torch.tensor([x, x], requires_grad=True)
    log_odds(z).sum().backward()
    assert torch.isfinite(z.grad).all()

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
    l_trl, m_trl = tr.get_batch_loss_metrics(m, trl_paired_batch(b), 'train'); g_trl = _grads(m, l_trl)
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
        logits = m(input_ids=b['input_ids'][:8], attention_mask=b['attention_mask'][:8]).logits
        # the paper's L_SFT: each chosen row's own SFT loss (a mean over its answer tokens), then the mean over rows
        sft = torch.stack([sft_loss(logits[i:i + 1], b['labels'][i:i + 1]) for i in range(8)]).mean().item()
        pooled = sft_loss(logits, b['labels'][:8]).item()             # one token mean over the batch: not the paper's
    assert abs(mt['nll'] - sft) < 1e-5 * sft and abs(pooled - sft) > 1e-3
    assert abs(ms['nll'] - mt['nll']) > 1e-3                          # the two spans really differ
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

def _accumulated(m, tok, loss_fn, examples, micro):
    "Loss and gradients as ftcourse.train forms them: micro-batches of `micro` pairs, each weighted by count_items."
    batches = [collate_dpo(tok)(examples[i:i + micro]) for i in range(0, len(examples), micro)]
    counts = [count_items(b) for b in batches]
    assert counts == [micro] * len(batches)                              # the loop weights preference batches by pairs
    loss = sum(loss_fn(m, b)[0] * c / sum(counts) for b, c in zip(batches, counts))
    return loss.item(), _grads(m, loss)

def test_accumulation_gives_the_full_batch_loss(rows):
    "4 pairs, one batch against 4 micro-batches of 1: the paper's loss (a mean over pairs) is exact, trl's token-mean NLL not."
    m, tok = tiny_model(seed=1)
    exs = preference_dataset(rows.select(range(4)), tok, 128, verbose=False)[0]
    lf = orpo_loss_fn(0.1)
    full, g_full = _accumulated(m, tok, lf, exs, 4)
    micro, g_micro = _accumulated(m, tok, lf, exs, 1)
    assert abs(full - micro) < 1e-6 * full
    for n in g_full:
        torch.testing.assert_close(g_micro[n], g_full[n], rtol=1e-4, atol=1e-5 * g_full[n].abs().max().item())
    # the same through the loop itself: the logged loss and the gradient norm do not depend on micro_batch_size
    hs = []
    for mb in (None, 1):
        m, tok = tiny_model(seed=1)
        cfg = TrainConfig(steps=1, batch_size=4, micro_batch_size=mb, lr=1e-3, warmup_steps=0, eval_every=0,
                          progress=False, shuffle=False, mixed_precision='no')   # compared with an fp32 loss: fp32
        hs.append(train(m, lf, exs, cfg, collate_fn=collate_dpo(tok))[-1])
    assert abs(hs[0]['loss'] - full) < 1e-5 * full and abs(hs[1]['loss'] - full) < 1e-5 * full
    assert abs(hs[0]['grad_norm'] - hs[1]['grad_norm']) < 1e-5 * hs[0]['grad_norm']
    # trl's variant: a token mean per micro-batch, so pair weighting changes the loss (the stated exception)
    m, tok = tiny_model(seed=1)
    full_s, _ = _accumulated(m, tok, orpo_loss_fn(0.1, nll_on='sequence'), exs, 4)
    micro_s, _ = _accumulated(m, tok, orpo_loss_fn(0.1, nll_on='sequence'), exs, 1)
    assert abs(full_s - micro_s) > 1e-4

def test_logp_preferences_per_pair_in_row_order(rows):
    "One 0/1 per pair, in row order (scored longest first in batches), equal to each pair scored alone; eval mode restored."
    m, tok = tiny_model(seed=2)
    exs, _ = preference_dataset(rows, tok, 128, verbose=False)
    alone = []
    with torch.no_grad():
        for e in exs:
            lp = concatenated_logps(m, collate_dpo(tok)([e]), average=True)
            alone.append(int(lp['chosen'].item() > lp['rejected'].item()))
    m.train()
    assert logp_preferences(m, tok, rows, batch_size=3) == alone and m.training
    assert 0 < sum(alone) < len(alone)                                  # both outcomes occur: the order is really tested
