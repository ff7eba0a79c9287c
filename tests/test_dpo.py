"DPO: sequence log-probs, the loss against trl's DPOTrainer (loss, metrics, gradients, precomputed reference), the three references, the trainer; IPO, SimPO and KTO against trl."
import logging
import pytest, torch
from ftcourse.core import tiny_model, load_course_dataset, set_seed
from ftcourse.sft import preference_dataset, collate_preference
from ftcourse.lora import apply_lora, lora_layers
from ftcourse.train import TrainConfig, train
from ftcourse.lora import adapters_disabled
from ftcourse.reward import pair_metrics
from ftcourse.dpo import (sequence_logps, token_logps, concatenated_logps, model_logps, dpo_loss, collate_dpo,
                          precompute_ref_logps, frozen_copy, dpo_loss_fn, trl_trainer, trl_dpo_trainer, trl_paired_batch,
                          compare_with_trl, assert_matches_trl, TRL_DPO_METRICS, TRL_KTO_METRICS, train_dpo, preference_metrics,
                          pair_logps, preference_accuracy, ipo_loss, simpo_loss, kto_loss, kto_reference_point,
                          kto_examples, collate_kto, kto_loss_fn, train_kto)
from ftcourse.train import evaluate

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

def _check_against_trl(policy, tok, tr, ours_fn, rows):
    tb = tr.data_collator([tr.train_dataset[i] for i in range(len(rows))])
    exs = preference_dataset(rows, tok, 128, verbose=False)[0]
    if 'ref_chosen_logps' in tb: exs = [dict(e, ref_chosen_logps=float(c), ref_rejected_logps=float(r)) for e, c, r in zip(exs, tb['ref_chosen_logps'], tb['ref_rejected_logps'])]
    ob = collate_dpo(tok)(exs)
    assert torch.equal(tb['input_ids'], ob['input_ids']) and torch.equal(tb['completion_mask'].bool(), ob['labels'] != -100)
    res = compare_with_trl(tr, policy, tb, ours_fn, ob, TRL_DPO_METRICS)
    assert_matches_trl(res)
    return {k: a for k, (a, b, d) in res['metrics'].items()}

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
        cfg = TrainConfig(steps=1, batch_size=4, micro_batch_size=mb, lr=1e-2, warmup_steps=0, eval_every=0, progress=False, shuffle=False,
                          mixed_precision='no')
        h = train(m, dpo_loss_fn(0.1), exs, cfg, collate_fn=collate_dpo(tok))
        res.append((h[-1]['loss'], h[-1]['margin'], h[-1]['grad_norm'], torch.cat([p.detach().flatten() for p in m.parameters() if p.requires_grad])))
    assert abs(res[0][0] - res[1][0]) < 1e-5 and abs(res[0][1] - res[1][1]) < 1e-5
    assert abs(res[0][2] - res[1][2]) < 1e-5 * res[0][2]   # the accumulated gradient has the same norm
    # AdamW's first step is about lr·sign(g): entries with near-zero gradients may flip, so compare at a tenth of lr
    torch.testing.assert_close(res[0][3], res[1][3], rtol=0, atol=1e-3)

@pytest.mark.parametrize('reference', ['precomputed', 'adapters', 'frozen'])
def test_train_dpo_learns(rows, reference):
    m, tok = tiny_model(); apply_lora(m, r=8, alpha=16, target_modules='all-linear')
    # fp32: the loop's evaluation is compared with preference_metrics, which runs without autocast
    cfg = TrainConfig(steps=8, batch_size=4, lr=3e-3, warmup_steps=0, eval_every=8, progress=False, mixed_precision='no')
    h = train_dpo(m, tok, rows, eval_rows=rows.select(range(4)), cfg=cfg, reference=reference, verbose=False)
    losses = [r['loss'] for r in h if 'loss' in r]
    assert abs(losses[0] - 0.6931472) < 1e-4 and losses[-1] < losses[0]
    assert h.last('eval_margin') > 0 and {'chosen_reward', 'rejected_reward', 'accuracy', 'margin'} <= h[1].keys()
    pm = preference_metrics(m, tok, rows.select(range(4)))
    assert abs(pm['margin'] - h.last('eval_margin')) < 1e-4 and set(pm) >= {'accuracy', 'margin', 'logp_accuracy'}

def test_one_pair_metrics_and_one_evaluation_loop(rows):
    "DPO scores implicit rewards with chapter 6's pair_metrics, and its held-out loss equals the loop's own evaluate."
    import ftcourse.dpo, ftcourse.reward
    assert ftcourse.dpo.pair_metrics is ftcourse.reward.pair_metrics
    m, tok = lora_policy()
    exs = preference_dataset(rows, tok, 128, verbose=False)[0]
    fn, col = dpo_loss_fn(0.1), collate_dpo(tok)
    loop = evaluate(m, fn, exs, col, batch_size=3)
    # the loop's evaluate averages every metric over pairs, batch by batch: the same as one batch of all the pairs
    with torch.no_grad(): loss, whole = fn(m.eval(), col(exs))
    assert abs(loop['eval_loss'] - loss.item()) < 1e-5
    assert all(abs(loop[f'eval_{k}'] - v) < 1e-5 for k, v in whole.items() if k not in ('loss', 'n_items'))
    assert {'eval_accuracy', 'eval_margin', 'eval_chosen_reward'} <= set(loop)
    # per-pair results agree with the aggregate metrics
    pm = preference_metrics(m, tok, exs, per_pair=True)
    assert pm['accuracy'] == sum(pm['correct']) / len(exs) and pm['logp_accuracy'] == sum(pm['logp_correct']) / len(exs)
    assert abs(pm['margin'] - loop['eval_margin']) < 1e-5

def test_family_losses_by_hand():
    z = torch.zeros(3)
    assert torch.isclose(ipo_loss(z, z, z, z, beta=0.1)[0], torch.tensor(25.0))
    # per-token normalisation: a gap of 10 nats over 10 tokens is 1 nat per token
    loss, cr, rr = ipo_loss(z + 10, z, z, z, beta=0.5, n_chosen=torch.full((3,), 10.0), n_rejected=torch.full((3,), 4.0))
    assert torch.isclose(loss, torch.tensor(0.0)) and torch.allclose(cr, torch.full((3,), 5.0))
    loss, cr, rr = simpo_loss(z - 1, z - 2, beta=2.0, gamma=0.5)
    assert torch.isclose(loss, -torch.nn.functional.logsigmoid(torch.tensor(1.5))) and torch.allclose(cr, z - 2)
    # KTO: the reference point is clamped at 0 and carries no gradient
    p = torch.tensor([-1.0, -2.0], requires_grad=True)
    kl = kto_reference_point(p, torch.tensor([0.0, 0.0]))
    assert kl.item() == 0 and not kl.requires_grad
    kl = kto_reference_point(torch.tensor([2.0, 4.0]), torch.zeros(2))
    assert kl.item() == 3.0
    logps, ref, d = torch.tensor([1.0, -1.0]), torch.zeros(2), torch.tensor([True, False])
    loss, cr, rr = kto_loss(logps, ref, d, torch.tensor(0.5), beta=2.0, desirable_weight=1.0, undesirable_weight=3.0)
    want = (1 - torch.sigmoid(torch.tensor(2 * 0.5)) + 3 * (1 - torch.sigmoid(torch.tensor(2 * 1.5)))) / 2
    assert torch.isclose(loss, want) and cr.tolist() == [2.0] and rr.tolist() == [-2.0]

def test_ipo_matches_trl(rows):
    policy, tok = tiny_model(seed=1); ref, _ = tiny_model(seed=0)
    tr = trl_dpo_trainer(policy, tok, rows, ref_model=ref, beta=0.2, loss_type=['ipo'])
    m = _check_against_trl(policy, tok, tr, dpo_loss_fn(0.2, ref_model=ref, loss_type='ipo'), rows)
    assert abs(m['margin']) > 1e-3

@pytest.mark.parametrize('lora', [False, True])
def test_simpo_matches_trl(rows, lora):
    policy, tok = lora_policy() if lora else tiny_model(seed=1)
    tr = trl_trainer('cpo', policy, tok, rows, loss_type='simpo', cpo_alpha=0.0, beta=2.0, simpo_gamma=0.8)
    b = collate_dpo(tok)(preference_dataset(rows, tok, 128, verbose=False)[0])
    res = compare_with_trl(tr, policy, trl_paired_batch(b), dpo_loss_fn(2.0, loss_type='simpo', gamma=0.8), b, TRL_DPO_METRICS)
    assert_matches_trl(res)
    assert abs(res['metrics']['margin'][0]) > 1e-4

@pytest.mark.parametrize('weights', [(1.0, 1.0), (1.0, 1.5)])
def test_kto_matches_trl(rows, weights):
    policy, tok = tiny_model(seed=1); ref, _ = tiny_model(seed=0)
    with torch.no_grad(): ref.model.norm.weight.mul_(10)    # a sharper reference: the KL estimate is positive, not clamped
    tr = trl_trainer('kto', policy, tok, rows, ref_model=ref, beta=0.2, desirable_weight=weights[0], undesirable_weight=weights[1])
    tb = tr.data_collator([tr.train_dataset[i] for i in range(len(tr.train_dataset))])
    ob = collate_kto(tok)(kto_examples(preference_dataset(rows, tok, 128, verbose=False)[0]))
    for k in ('input_ids', 'attention_mask'): assert torch.equal(tb[k], ob[k]) and torch.equal(tb[f'KL_{k}'], ob[f'kl_{k}'])
    assert torch.equal(tb['completion_mask'][:, 1:].bool(), ob['labels'][:, 1:] != -100) and torch.equal(tb['label'], ob['desirable'])
    res = compare_with_trl(tr, policy, tb, kto_loss_fn(0.2, ref, *weights), ob, TRL_KTO_METRICS)
    assert_matches_trl(res)
    assert res['metrics']['kl'][0] > 0.1

def test_kto_examples_and_errors(rows):
    m, tok = tiny_model()
    pairs = preference_dataset(rows, tok, 128, verbose=False)[0]
    exs = kto_examples(pairs)
    assert len(exs) == 16 and [e['desirable'] for e in exs] == [True] * 8 + [False] * 8
    # every KL sequence is a prompt with an answer written for another prompt (rotation by one)
    assert exs[1]['kl_input_ids'][len(exs[1]['kl_input_ids']) - (len(exs[0]['input_ids']) - exs[0]['labels'].count(-100)):] \
        == [t for t, l in zip(exs[0]['input_ids'], exs[0]['labels']) if l != -100]
    with pytest.raises(ValueError, match='two pairs'): kto_examples(pairs[:1])
    with pytest.raises(ValueError, match='ref_model'): train_kto(m, tok, rows)
    with pytest.raises(ValueError, match='loss_type'): dpo_loss_fn(0.1, loss_type='hinge')

@pytest.mark.parametrize('loss_type', ['ipo', 'simpo', 'kto'])
def test_family_trains(rows, loss_type):
    m, tok = tiny_model(); apply_lora(m, r=8, alpha=16, target_modules='all-linear')
    cfg = TrainConfig(steps=6, batch_size=4, lr=3e-3, warmup_steps=0, eval_every=0, progress=False, mixed_precision='no')
    if loss_type == 'kto': h = train_kto(m, tok, rows, cfg=cfg, verbose=False)
    else: h = train_dpo(m, tok, rows, cfg=cfg, loss_type=loss_type, beta=2.0 if loss_type == 'simpo' else 0.1, verbose=False)
    losses = [r['loss'] for r in h if 'loss' in r]
    assert losses[-1] < losses[0]
    if loss_type == 'ipo': assert abs(losses[0] - 25.0) < 1e-3        # (0 − 1/(2·0.1))² at the start

def test_pair_logps_caches_by_weights_batch_and_autocast(monkeypatch, tmp_path, rows):
    "A second pass of the same weights over the same batches reads the log-probs; any change computes them afresh."
    import ftcourse.dpo as dpo
    monkeypatch.setenv('FTCOURSE_CACHE', str(tmp_path))
    model, tok = tiny_model()
    first = pair_logps(model, tok, rows, ref=None, batch_size=3)
    assert len(list((tmp_path/'logps').glob('*.json'))) == 3          # one file per batch: 3 + 3 + 2 pairs
    assert torch.equal(first['chosen'], pair_logps(model, tok, rows, ref=None, batch_size=3, cache=False)['chosen'])
    def no_forward(*a, **k): raise AssertionError('computed again')
    monkeypatch.setattr(dpo, 'concatenated_logps', no_forward)
    again = pair_logps(model, tok, rows, ref=None, batch_size=3)
    assert all(torch.equal(first[k], again[k]) for k in first)
    for kw in (dict(batch_size=4), dict(cache=False)):
        with pytest.raises(AssertionError, match='computed again'): pair_logps(model, tok, rows, ref=None, **dict(dict(batch_size=3), **kw))
    with torch.autocast('cpu', dtype=torch.bfloat16), pytest.raises(AssertionError, match='computed again'):
        pair_logps(model, tok, rows, ref=None, batch_size=3)
    with torch.no_grad(): next(model.parameters()).view(-1)[0] += 1e-3    # one weight moved: another model
    with pytest.raises(AssertionError, match='computed again'): pair_logps(model, tok, rows, ref=None, batch_size=3)

def test_shared_prefix_gives_the_concatenated_losses_and_gradients(rows):
    "DPO and ORPO with each prompt computed once: the same losses and gradients as the 2B-row batch, in fp32."
    from ftcourse.dpo import shared_prefix_batch
    from ftcourse.orpo import orpo_loss_fn
    policy, tok = tiny_model()
    apply_lora(policy, r=4, alpha=8, target_modules='all-linear')
    for l in lora_layers(policy).values(): torch.nn.init.normal_(l.lora_B, std=0.02)   # adapters that do something
    exs = precompute_ref_logps(policy, preference_dataset(rows, tok, 128, verbose=False)[0], tok, adapters=False)
    batch = collate_dpo(tok)(exs)
    sb = shared_prefix_batch(batch)
    assert len(sb['input_ids']) == len(exs) and int(sb['attention_mask'][:, 0, :, 0].sum()) < int(batch['attention_mask'].sum())
    for make in (lambda s: dpo_loss_fn(0.1, shared_prefix=s), lambda s: dpo_loss_fn(0.1, loss_type='ipo', shared_prefix=s),
                 lambda s: orpo_loss_fn(0.1, shared_prefix=s)):
        out = {}
        for shared in (False, True):
            policy.zero_grad()
            loss, metrics = make(shared)(policy, batch)
            loss.backward()
            out[shared] = loss.detach(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        assert torch.allclose(out[False][0], out[True][0], rtol=1e-5, atol=1e-6)
        assert out[False][1].keys() == out[True][1].keys()
        for n, g in out[False][1].items():   # the two forwards add in other orders: relative to each tensor's norm
            assert (g - out[True][1][n]).norm() <= 1e-4 * g.norm() + 1e-12, n
    with pytest.raises(ValueError, match="nll_on='answer'"): orpo_loss_fn(0.1, nll_on='sequence', shared_prefix=True)
    empty = dict(batch, labels=batch['labels'].clone())
    empty['labels'][0] = -100                                   # pair 0's chosen answer has no tokens left
    with pytest.raises(ValueError, match='pair 0'): shared_prefix_batch(empty)

@pytest.mark.parametrize('shared_prefix', [False, True])
def test_precomputed_reference_scores_each_pair_in_its_training_batch(rows, shared_prefix):
    "The reference is scored on the micro-batches the loop runs, so the first step's log-ratios are 0 even under bf16."
    m, tok = tiny_model(); apply_lora(m, r=8, alpha=16, target_modules='all-linear')
    cfg = TrainConfig(steps=3, batch_size=4, micro_batch_size=2, lr=3e-3, warmup_steps=0, eval_every=0, progress=False,
                      mixed_precision='bf16')
    h = train_dpo(m, tok, rows, cfg=cfg, reference='precomputed', verbose=False, shared_prefix=shared_prefix)
    assert h[0]['loss'] == pytest.approx(0.6931472, abs=1e-6) and h[0]['margin'] == 0
