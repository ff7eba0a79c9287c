"DPO: sequence log-probs, the loss against trl's DPOTrainer (loss, metrics, gradients, precomputed reference), the three references, the trainer."
import logging
import pytest, torch
from ftcourse.core import tiny_model, load_course_dataset, set_seed
from ftcourse.sft import preference_dataset, collate_preference
from ftcourse.lora import apply_lora, lora_layers
from ftcourse.train import TrainConfig, train
from ftcourse.lora import adapters_disabled
from ftcourse.dpo import (sequence_logps, token_logps, concatenated_logps, dpo_loss, pair_metrics, collate_dpo,
                          precompute_ref_logps, frozen_copy, dpo_loss_fn, trl_dpo_trainer, trl_loss_metrics, compare_metrics,
                          TRL_DPO_METRICS, train_dpo, preference_metrics, evaluate_pairs)

logging.getLogger('trl').setLevel(logging.ERROR)

@pytest.fixture(scope='module')
def rows(): return load_course_dataset('preference', 'train').select(range(8))

def lora_policy(seed=0, std=0.05):
    "A tiny model with LoRA adapters whose B is random, so the policy differs from its base."
    m, tok = tiny_model(seed); apply_lora(m, r=4, alpha=8, target_modules='all-linear')
    set_seed(seed + 1)
    for l in lora_layers(m).values(): torch.nn.init.normal_(l.lora_B, std=std)
    return m, tok

def unloaded(m):
    "A frozen copy of a LoRA model with every LoRALinear replaced by its base layer: the base model."
    b = frozen_copy(m)
    for name, l in lora_layers(b).items():
        parent, _, child = name.rpartition('.'); setattr(b.get_submodule(parent), child, l.base)
    return b

def test_sequence_logps_is_minus_token_count_times_cross_entropy(rows):
    m, tok = tiny_model()
    exs, _ = preference_dataset(rows, tok, 128, verbose=False)
    b = collate_preference(tok)(exs)
    with torch.no_grad():
        lp = sequence_logps(m(input_ids=b['input_ids'], attention_mask=b['attention_mask']).logits, b['labels'])
        for i in (0, 5, 11):
            ce = m(input_ids=b['input_ids'][i:i+1], attention_mask=b['attention_mask'][i:i+1], labels=b['labels'][i:i+1]).loss
            n = (b['labels'][i, 1:] != -100).sum()
            assert torch.allclose(lp[i], -ce * n, rtol=1e-5), i
    # the prompt and the padding do not count: changing a prompt label's target does nothing once masked
    lab = b['labels'].clone(); assert (lab[:, :3] == -100).all()

def test_answer_span_equals_full_logits(rows):
    m, tok = tiny_model()
    b = collate_dpo(tok)(preference_dataset(rows, tok, 128, verbose=False)[0])
    with torch.no_grad(): a, f = concatenated_logps(m, b), concatenated_logps(m, b, keep_span=False)
    for k in ('chosen', 'rejected'): torch.testing.assert_close(a[k], f[k], rtol=1e-5, atol=1e-5)
    assert torch.equal(a['n_chosen'], f['n_chosen']) and b['n_items'] == 8

def test_dpo_loss_values():
    z = torch.tensor([-3.0, -7.0])
    loss, cr, rr = dpo_loss(z, z, z, z, beta=0.3)
    assert torch.isclose(loss, torch.log(torch.tensor(2.0))) and (cr == 0).all() and pair_metrics(cr, rr)['accuracy'] == 0
    loss, cr, rr = dpo_loss(z + 1, z - 1, z, z, beta=0.5)
    assert torch.isclose(loss, -torch.nn.functional.logsigmoid(torch.tensor(1.0)))
    assert pair_metrics(cr, rr) == dict(chosen_reward=0.5, rejected_reward=-0.5, accuracy=1.0, margin=1.0)

def _grads(m, loss):
    loss.backward(); g = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}; m.zero_grad(set_to_none=True)
    return g

def _check_against_trl(policy, tok, tr, ours_fn, rows):
    tb = tr.data_collator([tr.train_dataset[i] for i in range(len(rows))])
    exs = preference_dataset(rows, tok, 128, verbose=False)[0]
    if 'ref_chosen_logps' in tb: exs = [dict(e, ref_chosen_logps=float(c), ref_rejected_logps=float(r)) for e, c, r in zip(exs, tb['ref_chosen_logps'], tb['ref_rejected_logps'])]
    ob = collate_dpo(tok)(exs)
    assert torch.equal(tb['input_ids'], ob['input_ids']) and torch.equal(tb['completion_mask'].bool(), ob['labels'] != -100)
    policy.train()
    l_trl, m_trl = trl_loss_metrics(tr, policy, tb); g_trl = _grads(policy, l_trl)
    l_ours, m_ours = ours_fn(policy, ob); g_ours = _grads(policy, l_ours)
    torch.testing.assert_close(l_ours, l_trl, rtol=1e-5, atol=1e-7)
    for k, (a, b, d) in compare_metrics(m_ours, m_trl, TRL_DPO_METRICS).items(): assert d <= 1e-5 * max(1, abs(b)), (k, a, b)
    assert g_ours.keys() == g_trl.keys() and g_ours
    for n in g_trl: assert (g_ours[n] - g_trl[n]).abs().max() <= 1e-4 * g_trl[n].abs().max() + 1e-9, n
    return m_ours

def test_matches_trl_with_reference_model(rows):
    policy, tok = tiny_model(seed=1); ref, _ = tiny_model(seed=0)
    tr = trl_dpo_trainer(policy, tok, rows, ref_model=ref, beta=0.2)
    m = _check_against_trl(policy, tok, tr, dpo_loss_fn(0.2, ref_model=ref), rows)
    assert abs(m['margin']) > 1e-3          # a real comparison, not two zeros

def test_matches_trl_precomputed_reference_with_lora(rows):
    policy, tok = lora_policy(); base = unloaded(policy)
    tr = trl_dpo_trainer(policy, tok, rows, ref_model=base, beta=0.1, precompute_ref_log_probs=True)
    # trl's precomputed reference log-probs equal ours (base model = adapters off)
    ours = precompute_ref_logps(policy, preference_dataset(rows, tok, 128, verbose=False)[0], tok, batch_size=3, adapters=False)
    theirs = tr.train_dataset
    torch.testing.assert_close(torch.tensor([e['ref_chosen_logps'] for e in ours]), torch.tensor(theirs['ref_chosen_logps']), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor([e['ref_rejected_logps'] for e in ours]), torch.tensor(theirs['ref_rejected_logps']), rtol=1e-5, atol=1e-5)
    m = _check_against_trl(policy, tok, tr, dpo_loss_fn(0.1), rows)
    assert abs(m['margin']) > 1e-4

def test_three_references_agree(rows):
    policy, tok = lora_policy(); base = unloaded(policy)
    exs = preference_dataset(rows, tok, 128, verbose=False)[0]; col = collate_dpo(tok)
    with torch.no_grad():
        a, _ = dpo_loss_fn(0.1)(policy, col(exs))
        f, _ = dpo_loss_fn(0.1, ref_model=base)(policy, col(exs))
        p, m = dpo_loss_fn(0.1)(policy, col(precompute_ref_logps(policy, exs, tok, adapters=False)))
    torch.testing.assert_close(a, f, rtol=1e-6, atol=0); torch.testing.assert_close(a, p, rtol=1e-6, atol=0)
    assert abs(a.item() - 0.6931472) > 1e-4
    # the context manager switches the adapters back on, also after an exception
    with pytest.raises(RuntimeError):
        with adapters_disabled(policy): raise RuntimeError
    assert all(l.adapters_enabled for l in lora_layers(policy).values())

def test_no_reference_is_an_error(rows):
    m, tok = tiny_model()
    b = collate_dpo(tok)(preference_dataset(rows, tok, 128, verbose=False)[0])
    with pytest.raises(ValueError, match='no reference'): dpo_loss_fn(0.1)(m, b)
    with pytest.raises(ValueError, match="reference="): train_dpo(m, tok, rows, reference='nope')
    with pytest.raises(ValueError, match='LoRA'): train_dpo(m, tok, rows, reference='adapters')
    with pytest.raises(ValueError, match='LoRA'): preference_metrics(m, tok, rows)

def test_micro_batches_are_weighted_by_pairs(rows):
    "Accumulating 4 micro-batches of 1 pair gives the step of one batch of 4: the loop weights by n_items (pairs), not tokens."
    exs = None; res = []
    for mb in (None, 1):
        m, tok = lora_policy(); exs = precompute_ref_logps(m, preference_dataset(rows, tok, 128, verbose=False)[0], tok, adapters=False)
        cfg = TrainConfig(steps=1, batch_size=4, micro_batch_size=mb, lr=1e-2, warmup_steps=0, eval_every=0, progress=False, shuffle=False)
        h = train(m, dpo_loss_fn(0.1), exs, cfg, collate_fn=collate_dpo(tok))
        res.append((h[-1]['loss'], h[-1]['margin'], h[-1]['grad_norm'], torch.cat([p.detach().flatten() for p in m.parameters() if p.requires_grad])))
    assert abs(res[0][0] - res[1][0]) < 1e-5 and abs(res[0][1] - res[1][1]) < 1e-5
    assert abs(res[0][2] - res[1][2]) < 1e-5 * res[0][2]   # the accumulated gradient has the same norm
    # AdamW's first step is about lr·sign(g): entries with near-zero gradients may flip, so compare at a tenth of lr
    torch.testing.assert_close(res[0][3], res[1][3], rtol=0, atol=1e-3)

@pytest.mark.parametrize('reference', ['precomputed', 'adapters', 'frozen'])
def test_train_dpo_learns(rows, reference):
    m, tok = tiny_model(); apply_lora(m, r=8, alpha=16, target_modules='all-linear')
    cfg = TrainConfig(steps=8, batch_size=4, lr=3e-3, warmup_steps=0, eval_every=8, progress=False)
    h = train_dpo(m, tok, rows, eval_rows=rows.select(range(4)), cfg=cfg, reference=reference, verbose=False)
    losses = [r['loss'] for r in h if 'loss' in r]
    assert abs(losses[0] - 0.6931472) < 1e-4 and losses[-1] < losses[0]
    assert h.last('eval_margin') > 0 and {'chosen_reward', 'rejected_reward', 'accuracy', 'margin'} <= h[1].keys()
    pm = preference_metrics(m, tok, rows.select(range(4)))
    assert abs(pm['margin'] - h.last('eval_margin')) < 1e-4 and set(pm) >= {'accuracy', 'margin', 'logp_accuracy'}
