"GRPO: advantages and the four losses by hand, padding, the trainer's filtering and shaping, and proofs against trl's GRPOTrainer."
import logging, math, tempfile, warnings
import pytest, torch
from ftcourse.core import tiny_model
from ftcourse.ppo import forward_policy, masked_mean
from ftcourse.grpo import (LOSS_TYPES, group_advantages, reward_stats, grpo_loss, shaped_rewards, group_batch, GRPOConfig,
                           train_grpo, trl_grpo_trainer, trl_compute_loss, compare_runs)

logging.getLogger('trl').setLevel(logging.ERROR)
warnings.filterwarnings('ignore', module='trl')
ROWS = [dict(prompt=[dict(role='user', content=f'Say {i} and {j}.')], answer=str(i + j)) for i in range(4) for j in range(2)]
char_reward = lambda rows, texts: torch.tensor([(sum(map(ord, t)) % 5) / 4 for t in texts])

@pytest.fixture(scope='module')
def tiny_dir():
    m, tok = tiny_model()
    d = tempfile.mkdtemp(); m.save_pretrained(d); tok.save_pretrained(d)
    return d

def load(d):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32), AutoTokenizer.from_pretrained(d)

def test_group_advantages_by_hand():
    r = torch.tensor([1., 0., 0., 0., 1., 1., 1., 1.])
    assert torch.allclose(group_advantages(r, 4)[:4], torch.tensor([.75, -.25, -.25, -.25]) / (0.5 + 1e-4))
    assert (group_advantages(r, 4)[4:] == 0).all()
    assert torch.allclose(group_advantages(r, 4, 'none'), torch.tensor([.75, -.25, -.25, -.25, 0, 0, 0, 0]))
    assert torch.allclose(group_advantages(r, 4, 'batch'), (r - torch.tensor([.25] * 4 + [1.] * 4)) / (r.std() + 1e-4))
    assert group_advantages(torch.tensor([1, 0]), 2).dtype == torch.float32       # integer rewards become floats
    assert reward_stats(r, 4)['frac_reward_zero_std'] == 0.5 and reward_stats(r, 4, 'batch')['frac_reward_zero_std'] == 0

@pytest.mark.parametrize('bad, msg', [(lambda: group_advantages(torch.ones(6), 4), 'groups of 4'),
                                      (lambda: group_advantages(torch.ones(4), 1), 'at least 2'),
                                      (lambda: group_advantages(torch.ones(2, 2), 2), 'flat'),
                                      (lambda: group_advantages(torch.ones(4), 2, 'std'), 'scale'),
                                      (lambda: grpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2), 'ppo'), 'loss_type'),
                                      (lambda: grpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2), beta=.1), 'ref_logps'),
                                      (lambda: grpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2), 'dr_grpo'), 'max_completion_length'),
                                      (lambda: GRPOConfig(num_generations=1), 'at least 2'),
                                      (lambda: GRPOConfig(scale_rewards='std'), 'scale_rewards')])
def test_bad_input(bad, msg):
    with pytest.raises(ValueError, match=msg): bad()

def test_aggregations_by_hand():
    lp = torch.zeros(2, 3); mk = torch.tensor([[1., 1, 1], [1, 0, 0]]); adv = torch.tensor([1., -2.])
    by_hand = dict(grpo=(-1 + 2) / 2, bnpo=(-3 + 2) / 4, dr_grpo=(-3 + 2) / (2 * 5), dapo=(-3 + 2) / 10)
    for lt, v in by_hand.items():
        loss, _ = grpo_loss(lp, lp, adv, mk, lt, max_completion_length=5, num_items=10 if lt == 'dapo' else None)
        assert abs(loss.item() - v) < 1e-7, lt

def test_dapo_num_items_splits_like_the_whole():
    "Two micro-batches, each divided by the whole batch's token count, sum to the loss of the whole batch."
    g = torch.Generator().manual_seed(0)
    lp, old = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    mk = (torch.arange(5)[None] < torch.randint(1, 6, (6, 1), generator=g)).float(); adv = torch.randn(6, generator=g)
    whole, _ = grpo_loss(lp, old, adv, mk)
    parts = sum(grpo_loss(lp[s], old[s], adv[s], mk[s], num_items=mk.sum())[0] for s in (slice(0, 2), slice(2, 6)))
    torch.testing.assert_close(parts, whole)

def test_clipping_and_padding():
    new = torch.log(torch.tensor([[1.5, 0.5]])).requires_grad_()
    loss, st = grpo_loss(new, torch.zeros(1, 2), torch.tensor([[1., -1.]]), torch.ones(1, 2), 'bnpo')
    assert abs(loss.item() - (-1.2 + 0.8) / 2) < 1e-6 and st['clip_ratio/region_mean'] == 1.0
    assert torch.autograd.grad(loss, new)[0].abs().sum() == 0                 # both clipped: no gradient
    loss, st = grpo_loss(new, torch.zeros(1, 2), torch.tensor([[1., -1.]]), torch.ones(1, 2), 'bnpo', epsilon_high=0.6)
    assert st['clip_ratio/high_mean'] == 0.0 and st['clip_ratio/low_mean'] == 0.5
    g = torch.Generator().manual_seed(1)
    lp, old, ref = (torch.randn(3, 4, generator=g) for _ in range(3))
    mk = torch.tensor([[1., 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]); adv = torch.randn(3, generator=g)
    for lt in LOSS_TYPES:
        a, ma = grpo_loss(lp, old, adv, mk, lt, beta=.1, ref_logps=ref, max_completion_length=4)
        junk = torch.randn(3, 4, generator=g) * 10 * (1 - mk)
        b, mb = grpo_loss(lp + junk, old - junk, adv, mk, lt, beta=.1, ref_logps=ref + junk, max_completion_length=4)
        assert torch.allclose(a, b) and all(math.isclose(ma[k], mb[k], rel_tol=1e-6) for k in ma)

def test_shaping_and_group_batch():
    rw, sc = shaped_rewards([dict(answer='7', task='add')] * 3, ['7', '8', '7 and'], torch.tensor([True, True, False]), eos_bonus=.1)
    assert sc.tolist() == [1, 0, 0] and torch.allclose(rw, torch.tensor([1.1, .1, 0.]))
    class Tok: pad_token_id, eos_token_id = 0, 2
    b = group_batch(Tok(), [([5, 6], [7, 2]), ([5], [8, 9, 9])])
    assert b['ids'].tolist() == [[5, 6, 7, 2, 0], [0, 5, 8, 9, 9]] and b['ended'].tolist() == [True, False]

def test_no_signal_is_no_step():
    "Equal rewards in every group: frac_reward_zero_std is 1, every advantage 0, and the first step leaves the weights."
    m, tok = tiny_model(); before = {k: v.clone() for k, v in m.state_dict().items()}
    cfg = GRPOConfig(steps=1, prompts_per_step=2, num_generations=3, max_new_tokens=4, mixed_precision='no', progress=False)
    h = train_grpo(m, tok, ROWS, lambda rows, texts: torch.zeros(len(texts)), cfg)
    assert h[-1]['frac_reward_zero_std'] == 1.0 and h[-1]['groups_kept'] == 1.0 and h[-1]['loss'] == 0.0
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())

def test_filter_keeps_only_mixed_groups():
    m, tok = tiny_model()
    cfg = GRPOConfig(steps=1, prompts_per_step=4, num_generations=4, max_new_tokens=4, mixed_precision='no', progress=False, shuffle=False)
    first_two = lambda rows, texts: torch.tensor([float(r['answer'] == '0') * (i % 2) for i, r in enumerate(rows)])  # signal in prompt 0 only
    h = train_grpo(m, tok, ROWS, first_two, cfg)
    assert h[-1]['groups_kept'] == 0.25 and h[-1]['frac_reward_zero_std'] == 0.75

def test_compute_loss_matches_trl(tiny_dir):
    pytest.importorskip('trl')
    g = torch.Generator().manual_seed(0)
    B, P, T = 8, 10, 8
    pids, cids = torch.randint(3, 200, (B, P), generator=g), torch.randint(3, 200, (B, T), generator=g)
    cmask = (torch.arange(T)[None] < torch.randint(1, T + 1, (B, 1), generator=g)).long()
    adv = group_advantages(torch.randint(0, 2, (B,), generator=g).float(), 4)
    ids, attn = torch.cat([pids, cids], 1), torch.cat([torch.ones_like(pids), cmask], 1)
    for lt in LOSS_TYPES:
        for beta in (0.0, 0.04):
            model, tok = load(tiny_dir)
            tr = trl_grpo_trainer(model, tok, ROWS, cfg=GRPOConfig(loss_type=lt, beta=beta, num_generations=4, prompts_per_step=2, max_new_tokens=T))
            with torch.no_grad(): now = forward_policy(tr.model, None, ids, attn, P)['logprobs']
            old, ref = now + 0.3 * torch.randn(B, T, generator=g), now + 0.3 * torch.randn(B, T, generator=g)
            inputs = dict(prompt_ids=pids, prompt_mask=torch.ones_like(pids), completion_ids=cids, completion_mask=cmask,
                          advantages=adv, num_items_in_batch=cmask.sum(), old_per_token_logps=old, ref_per_token_logps=ref)
            lt_trl, m_trl = trl_compute_loss(tr, tr.model, inputs)
            g_trl = torch.autograd.grad(lt_trl, list(tr.model.parameters()))
            out = forward_policy(tr.model, None, ids, attn, P, entropy=True)
            loss, m = grpo_loss(out['logprobs'], old, adv, cmask, lt, beta=beta, ref_logps=ref, max_completion_length=T)
            m['entropy'] = masked_mean(out['entropy'], cmask).item()
            g_ours = torch.autograd.grad(loss, list(tr.model.parameters()))
            torch.testing.assert_close(loss, lt_trl, rtol=1e-5, atol=1e-7)
            assert m['clip_ratio/region_mean'] > 0 and (beta == 0) == ('kl' not in m)
            for k in m: assert math.isclose(m[k], m_trl[k], rel_tol=1e-5, abs_tol=1e-6), (lt, beta, k)
            for a, b in zip(g_ours, g_trl): assert (a - b).abs().max() <= 1e-5 * b.abs().max(), (lt, beta)

@pytest.mark.parametrize('scale', ['group', 'batch', 'none'])
def test_advantages_match_trl(tiny_dir, scale):
    pytest.importorskip('trl')
    model, tok = load(tiny_dir)
    cfg = GRPOConfig(steps=1, prompts_per_step=2, num_generations=4, max_new_tokens=6, scale_rewards=scale, shuffle=False)
    tr = trl_grpo_trainer(model, tok, ROWS, char_reward, cfg); tr.train()
    rewards = torch.tensor(list(tr._logs['rewards']['reward']))
    torch.testing.assert_close(torch.tensor(list(tr._logs['advantages'])), group_advantages(rewards, 4, scale), rtol=1e-6, atol=1e-6)
    logged = next(l for l in tr.state.log_history if 'reward' in l)
    for k, v in reward_stats(rewards, 4, scale).items(): assert math.isclose(v, logged[k], abs_tol=1e-6), k

@pytest.mark.parametrize('loss_type, beta', [('dapo', 0.0), ('grpo', 0.04), ('dr_grpo', 0.04)])
def test_training_steps_match_trl(tiny_dir, loss_type, beta):
    pytest.importorskip('trl')
    cfg = GRPOConfig(steps=2, prompts_per_step=2, num_generations=4, lr=1e-3, max_new_tokens=6, loss_type=loss_type, beta=beta,
                     filter_zero_std=False, mixed_precision='no', shuffle=False, progress=False)
    model, tok = load(tiny_dir)
    tr = trl_grpo_trainer(model, tok, ROWS, char_reward, cfg); tr.train()
    ours, _ = load(tiny_dir)
    hist = train_grpo(ours, tok, ROWS, char_reward, cfg)
    rows = compare_runs(hist, tr.state.log_history)
    assert len(rows) == 2 and {'loss', 'grad_norm', 'reward', 'entropy', 'completions/mean_length'} <= rows[0].keys()
    for row in rows:
        for k, (a, b) in row.items(): assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6), (k, a, b)
