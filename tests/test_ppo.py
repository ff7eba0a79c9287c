"""PPO pieces against hand-computed cases and plain reference loops on random inputs, and the behaviours the specification
(PPO paper, "The N Implementation Details of RLHF with PPO", trl's last PPOTrainer) requires: KL = 0 and ratio = 1 at the
first minibatch, padding after EOS inert, the reference = the base model; train_ppo on ftcourse.train equals a plain PPO
loop of those pieces, and resumes from its checkpoints to the uninterrupted result."""
import copy, math, shutil
import pytest, torch
from ftcourse.core import tiny_model, load_course_dataset
from ftcourse.lora import apply_lora, lora_layers, adapters_disabled
from ftcourse.ppo import (masked_mean, masked_var, masked_whiten, response_mask, kl_penalized_rewards, gae, policy_loss, value_loss,
                          entropy_from_logits, ValueHead, forward_policy, PPOConfig, judge_reward,
                          reward_model_reward, rollout, train_ppo, iteration_history)
from ftcourse.train import batch_indices, cosine_with_warmup

def rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale

def lengths_mask(lengths, T): return (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()

def test_whitening_matches_numpy_style_stats():
    x, m = rand(5, 7), lengths_mask([7, 3, 1, 5, 2], 7)
    v = x[m.bool()]
    assert torch.allclose(masked_mean(x, m), v.mean()) and torch.allclose(masked_var(x, m), v.var(unbiased=True))
    assert torch.allclose(masked_var(x, m, unbiased=False), v.var(unbiased=False))
    w = masked_whiten(x, m)
    assert torch.allclose(w[m.bool()], (v - v.mean()) / torch.sqrt(v.var() + 1e-8), atol=1e-6)
    assert torch.allclose(masked_whiten(x, m, shift_mean=False)[m.bool()], (v - v.mean()) / torch.sqrt(v.var() + 1e-8) + v.mean(), atol=1e-6)

def test_response_mask_includes_first_eos_only():
    r = torch.tensor([[4, 2, 4, 2], [2, 5, 5, 5], [4, 4, 4, 4]])
    assert response_mask(r, 2).tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert response_mask(r, [5, 2]).tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]

def gae_loop(rewards, values, lengths, gamma, lam):
    out = []
    for r, v, n in zip(rewards.tolist(), values.tolist(), lengths):
        a, last = [0.0] * len(r), 0.0
        for t in reversed(range(n)):
            last = r[t] + gamma * (v[t + 1] if t + 1 < n else 0.0) - v[t] + gamma * lam * last
            a[t] = last
        out.append(a)
    return torch.tensor(out)

@pytest.mark.parametrize('gamma,lam', [(1.0, 0.95), (0.99, 0.0), (0.9, 1.0)])
def test_gae_equals_reference_loop(gamma, lam):
    lengths = [10, 1, 4, 7, 10, 3]
    r, v, m = rand(6, 10, seed=1), rand(6, 10, seed=2), lengths_mask(lengths, 10)
    adv, ret = gae(r, v, m, gamma, lam)
    assert torch.allclose(adv, gae_loop(r, v, lengths, gamma, lam).float(), atol=1e-5)
    assert torch.allclose(ret, (adv + v) * m, atol=1e-6)

def test_gae_by_hand():
    adv, ret = gae(torch.tensor([[0., 0., 1.]]), torch.tensor([[.5, .5, .5]]), torch.ones(1, 3), 1.0, 1.0)
    assert torch.allclose(adv, torch.full((1, 3), .5)) and torch.allclose(ret, torch.ones(1, 3))
    adv, _ = gae(torch.tensor([[0., 0., 1.]]), torch.tensor([[.5, .5, .5]]), torch.ones(1, 3), 1.0, 0.0)
    assert torch.allclose(adv, torch.tensor([[0., 0., .5]]))
    adv, _ = gae(torch.tensor([[1., 1.]]), torch.zeros(1, 2), torch.ones(1, 2), 0.5, 1.0)   # discounting: 1 + 0.5*1
    assert torch.allclose(adv, torch.tensor([[1.5, 1.]]))

def test_gae_promotes_integer_inputs():
    "int64 rewards and values (as peers' tests pass them) give float advantages, not values truncated to integers."
    x = torch.tensor([[0, 0, 0, 1]])
    adv, ret = gae(x, x, torch.ones_like(x), gamma=0.9, lam=0.95)
    assert adv.dtype == ret.dtype == torch.float32
    # by hand: delta = (0, 0, gamma, 0), so A = (gamma^3 lam^2, gamma^2 lam, gamma, 0) and G = A + V
    torch.testing.assert_close(adv, torch.tensor([[0.9**3 * 0.95**2, 0.9**2 * 0.95, 0.9, 0.0]]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ret, torch.tensor([[0.6579225, 0.7695, 0.9, 1.0]]), rtol=1e-6, atol=1e-7)
    a64, _ = gae(x.double(), x.double(), torch.ones_like(x), gamma=0.9, lam=0.95)
    assert a64.dtype == torch.float64                                          # float64 stays float64

def test_kl_penalized_rewards_by_hand_and_loop():
    scores, lp, rlp = rand(5, seed=3), rand(5, 6, seed=4), rand(5, 6, seed=5)
    lengths = [6, 2, 1, 4, 5]; m = lengths_mask(lengths, 6)
    rw, kl = kl_penalized_rewards(scores, lp, rlp, m, 0.1)
    for b, n in enumerate(lengths):
        for t in range(6):
            want = (-0.1 * (lp[b, t] - rlp[b, t]) + (scores[b] if t == n - 1 else 0)) if t < n else 0.0
            assert abs(rw[b, t] - want) < 1e-6
    assert torch.allclose(kl.sum(1), ((lp - rlp) * m).sum(1))

def loop_losses(new, old, A, v, vo, G, m, eps=0.2, epsv=0.2):
    pl = vl = 0.0; n = 0
    for b in range(new.shape[0]):
        for t in range(new.shape[1]):
            if not m[b, t]: continue
            rho = math.exp(new[b, t] - old[b, t]); a = A[b, t].item()
            pl += max(-a * rho, -a * min(max(rho, 1 - eps), 1 + eps))
            vc = vo[b, t].item() + min(max(v[b, t].item() - vo[b, t].item(), -epsv), epsv)
            vl += 0.5 * max((v[b, t].item() - G[b, t].item()) ** 2, (vc - G[b, t].item()) ** 2); n += 1
    return pl / n, vl / n

@pytest.mark.parametrize('seed', [0, 1, 2])
def test_policy_and_value_loss_equal_loop(seed):
    new, old = rand(4, 8, seed=seed, scale=.4), rand(4, 8, seed=seed + 10, scale=.4)
    A, v, vo, G = rand(4, 8, seed=seed + 20), rand(4, 8, seed=seed + 30), rand(4, 8, seed=seed + 40), rand(4, 8, seed=seed + 50)
    m = lengths_mask([8, 5, 1, 3], 8)
    pl, vl = loop_losses(new, old, A, v, vo, G, m)
    p, ps = policy_loss(new, old, A, m); q, qs = value_loss(v, vo, G, m)
    assert abs(p.item() - pl) < 1e-5 and abs(q.item() - vl) < 1e-5
    assert 0 < ps['clipfrac'] < 1 and 0 < qs['vf_clipfrac'] < 1             # both branches exercised

def test_policy_loss_by_hand_and_gradient_zero_when_clipped():
    new = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]])).requires_grad_()
    A = torch.tensor([[1., -1., 1., -1.]])
    for i, (want, clipped) in enumerate([(-1.2, True), (1.5, False), (-0.5, False), (0.8, True)]):
        mi = torch.zeros(1, 4); mi[0, i] = 1
        loss, st = policy_loss(new, torch.zeros(1, 4), A, mi, 0.2)
        g, = torch.autograd.grad(loss, new)
        assert abs(loss.item() - want) < 1e-6 and (g[0, i] == 0) == clipped and st['clipfrac'] == float(clipped)

def test_ratio_one_and_kl_zero_at_equal_policies():
    lp = rand(3, 5); A = rand(3, 5, seed=1); m = lengths_mask([5, 2, 4], 5)
    _, st = policy_loss(lp, lp.clone(), A, m)
    assert st['ratio'] == 1.0 and st['approx_kl'] == 0.0 and st['clipfrac'] == 0.0

def test_entropy():
    z = rand(4, 11)
    assert torch.allclose(entropy_from_logits(z), torch.distributions.Categorical(logits=z).entropy(), atol=1e-6)

def test_padding_after_eos_is_inert():
    resp = torch.tensor([[7, 8, 2, 5, 5, 5], [7, 2, 9, 9, 9, 9], [7, 7, 7, 7, 7, 7]]); m = response_mask(resp, 2)
    lp, rlp, vals = rand(3, 6, seed=1), rand(3, 6, seed=2), rand(3, 6, seed=3)
    noise = rand(3, 6, seed=4, scale=50) * (1 - m)
    def run(lp, rlp, vals):
        rw, _ = kl_penalized_rewards(torch.tensor([1., -1., .5]), lp * m, rlp * m, m, 0.05)
        adv, ret = gae(rw, vals, m); adv = masked_whiten(adv, m) * m
        return adv, ret, policy_loss(lp, lp.detach() - .1, adv, m)[0], value_loss(vals, vals + .1, ret, m)[0]
    for a, b in zip(run(lp, rlp, vals), run(lp + noise, rlp - noise, vals + noise)): assert torch.allclose(a, b)

def test_adapters_disabled_is_the_base_model():
    model, tok = tiny_model(); base = copy.deepcopy(model)
    apply_lora(model, r=4, alpha=8, target_modules='all-linear')
    for l in lora_layers(model).values(): torch.nn.init.normal_(l.lora_B, std=0.05)
    ids = torch.tensor([tok.encode('some text')])
    with torch.no_grad():
        # a deep copy holds the weights in other memory, where kernels may round differently: a tolerance
        with adapters_disabled(model):
            torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=1e-5)
        assert not torch.allclose(model(ids).logits, base(ids).logits, atol=1e-4)
    with pytest.raises(ValueError): 
        with adapters_disabled(base): pass

def test_forward_policy_logprobs_equal_full_logits():
    "Log-probs from the one-pass forward equal log_softmax of the model's own logits at the response positions (left-padded prompts)."
    model, tok = tiny_model(); vh = ValueHead(model.config.hidden_size)
    rows = list(load_course_dataset('sft', 'train').select(range(3)))
    ro = rollout(model, tok, rows, PPOConfig(max_new_tokens=5, temperature=1.0), torch.Generator().manual_seed(0))
    ids, mask, P = ro['ids'], ro['mask'], ro['n_prompt']
    with torch.no_grad():
        out = forward_policy(model, vh, ids, mask, P, temperature=0.7)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(ids, attention_mask=mask, position_ids=pos).logits[:, P - 1:-1] / 0.7
        want = logits.log_softmax(-1).gather(-1, ids[:, P:, None]).squeeze(-1)
    assert torch.allclose(out['logprobs'], want, atol=1e-5) and out['values'].shape == want.shape
    pm = ro['mask'][:, :P]
    assert (pm[:, -1] == 1).all() and torch.equal(pm.cummax(-1).values, pm) and (pm == 0).any()   # left-padded prompts

def test_forward_policy_applies_the_models_final_transforms():
    "Gemma-2 caps its final logits (tanh softcapping): PPO's log-probs are the model's forward's, as generation's are."
    from transformers import Gemma2Config, Gemma2ForCausalLM
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                       final_logit_softcapping=2.0, initializer_range=0.5, pad_token_id=0)   # large logits, capped
    model = Gemma2ForCausalLM(cfg).eval(); vh = ValueHead(cfg.hidden_size)
    torch.nn.init.normal_(vh.v.weight)                               # non-zero values: the comparison means something
    P, R = 5, 4
    ids = torch.randint(1, 96, (3, P + R), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids); mask[0, :2] = 0; mask[1, :1] = 0; ids[mask == 0] = 0        # left-padded prompts
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = forward_policy(model, vh, ids, mask, P, temperature=0.7, entropy=True)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, P - 1:-1].float() / 0.7
        want = logits.log_softmax(-1).gather(-1, ids[:, P:, None]).squeeze(-1)
        h = model.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state[:, P - 1:-1]
        head_only = (model.lm_head(h).float() / 0.7).log_softmax(-1).gather(-1, ids[:, P:, None]).squeeze(-1)
    assert logits.abs().max() <= 2.0 / 0.7 + 1e-5                    # the forward's logits are capped at ±2
    torch.testing.assert_close(out['logprobs'], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out['entropy'], entropy_from_logits(logits), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out['values'], vh(h), rtol=1e-5, atol=1e-5)
    assert (head_only - want).abs().max() > 0.1                      # the head alone (no softcapping) is another policy

@pytest.fixture(scope='module')
def run():
    model, tok = tiny_model(); apply_lora(model, r=4, alpha=8, target_modules='all-linear')
    rows = list(load_course_dataset('sft', 'train').select(range(12)))
    reward = lambda rows, responses: torch.tensor([len(a) / 10 for a in responses])
    cfg = PPOConfig(iterations=3, batch_size=4, mini_batch_size=2, ppo_epochs=2, max_new_tokens=6, lr=1e-2, progress=False)
    return model, tok, rows, train_ppo(model, tok, rows, reward, cfg)

def test_train_ppo_kl_zero_ratio_one_then_moves(run):
    model, tok, rows, result = run
    h = result.history
    # KL exactly 0: the same weights on the same batch for policy and reference, and B = 0 adds an exact 0
    assert len(h) == 3 and h[0]['kl'] == 0.0
    # the first minibatch recomputes the rollout's log-probs on a sub-batch (other matmul shapes): 1 to float rounding
    assert all(abs(r['first_ratio'] - 1.0) < 1e-6 and r['first_approx_kl'] < 1e-12 for r in h)
    assert h[-1]['kl'] != 0.0 and any(r['ratio'] != 1.0 for r in h)
    assert {'reward', 'kl', 'response_len', 'pg_loss', 'vf_loss', 'entropy', 'clipfrac', 'approx_kl', 'seconds'} <= set(h[0])
    assert len(result.rollouts) == 3 and len(result.rollouts[0]['responses']) == 4
    # the loop's rows: one per update (2 epochs x 2 minibatches), each with the rollout's metrics
    assert len(result.steps) == 3 * 4 and [r['step'] for r in result.steps] == list(range(1, 13))
    assert [r['kl'] for r in result.steps[::4]] == [r['kl'] for r in h]
    assert h[1]['pg_loss'] == sum(r['pg_loss'] for r in result.steps[4:8]) / 4
    assert result.value_head.v.weight.abs().sum() > 0                               # the critic learned
    assert not model.training                                                         # PPO runs without dropout
    assert all(l.adapters_enabled for l in lora_layers(model).values())              # adapters back on

def test_full_finetune_uses_frozen_copy_and_bad_config():
    model, tok = tiny_model()
    rows = list(load_course_dataset('sft', 'train').select(range(4)))
    h = train_ppo(model, tok, rows, judge_reward, PPOConfig(iterations=1, batch_size=2, mini_batch_size=1, max_new_tokens=3,
                                                            progress=False)).history
    # a frozen copy holds the same weights in other memory, and the kernels' rounding may depend on the thread count and
    # on memory layout: equal to float rounding, not bit for bit
    assert abs(h[0]['kl']) < 1e-5
    with pytest.raises(ValueError): train_ppo(model, tok, rows, judge_reward, PPOConfig(batch_size=3, mini_batch_size=2))

def test_reward_fns():
    from ftcourse.reward import RewardModel
    rows = list(load_course_dataset('sft', 'train').select(range(3)))
    assert judge_reward(rows, [rows[0]['answer'], 'no', rows[2]['messages'][-1]['content']]).tolist() == [1.0, 0.0, 1.0]
    model, tok = tiny_model(); rm = RewardModel.from_causal_lm(model)
    s = reward_model_reward(rm, tok, batch_size=2)(rows, ['a', 'bb', 'ccc'])
    assert s.shape == (3,) and torch.isfinite(s).all()

def test_rollout_restores_each_mode():
    "rollout samples in evaluation mode and gives the model back in the mode it came in."
    model, tok = tiny_model()
    rows = list(load_course_dataset('sft', 'train').select(range(2)))
    for training in (True, False):
        model.train(training)
        rollout(model, tok, rows, PPOConfig(max_new_tokens=3), torch.Generator().manual_seed(0))
        assert model.training == training

def test_train_ppo_under_bf16_autocast_and_bad_precision():
    "mixed_precision='bf16' runs rollouts, forwards and backwards under autocast; the first KL is still that of equal models."
    model, tok = tiny_model(); apply_lora(model, r=4, alpha=8, target_modules='all-linear')
    rows = list(load_course_dataset('sft', 'train').select(range(4)))
    cfg = PPOConfig(iterations=2, batch_size=4, mini_batch_size=2, max_new_tokens=4, lr=1e-2, mixed_precision='bf16', progress=False)
    h = train_ppo(model, tok, rows, lambda rows, responses: torch.tensor([len(a) / 10 for a in responses]), cfg).history
    assert h[0]['kl'] == 0.0                                   # the adapters add an exact 0, in bf16 too
    assert all(math.isfinite(r['pg_loss']) and math.isfinite(r['vf_loss']) for r in h)
    assert all(p.dtype == torch.float32 for p in model.parameters())   # autocast: the weights stay fp32
    with pytest.raises(ValueError, match='precision'):
        train_ppo(model, tok, rows, judge_reward, PPOConfig(iterations=1, batch_size=2, mini_batch_size=1, mixed_precision='fp8'))

def plain_ppo(policy, tok, rows, reward_fn, cfg:PPOConfig) -> tuple[list, ValueHead]:
    "The PPO loop written out with the chapter's pieces and a plain AdamW: one row per iteration (LoRA policies only)."
    value_head = ValueHead(policy.config.get_text_config().hidden_size)
    torch.manual_seed(cfg.seed)                     # sampling draws from torch's global generator, as in train_ppo
    params = [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, eps=cfg.adam_eps, weight_decay=0.01)
    updates = cfg.ppo_epochs * (cfg.batch_size // cfg.mini_batch_size)
    total = cfg.iterations * updates
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_with_warmup(step, 0, total))
    policy.eval()
    history = []
    for iteration in range(cfg.iterations):
        batch = [rows[i] for i in batch_indices(iteration, cfg.batch_size, len(rows), cfg.seed)]
        with torch.no_grad():
            ro = rollout(policy, tok, batch, cfg)
            ids, mask, rm, P = ro['ids'], ro['mask'], ro['response_mask'], ro['n_prompt']
            old = forward_policy(policy, value_head, ids, mask, P, cfg.temperature)
            with adapters_disabled(policy): ref_logprobs = forward_policy(policy, None, ids, mask, P, cfg.temperature)['logprobs']
            scores = reward_fn(batch, ro['texts']).float()
            rewards, kl = kl_penalized_rewards(scores, old['logprobs'] * rm, ref_logprobs * rm, rm, cfg.kl_coef)
            advantages, returns = gae(rewards, old['values'], rm, cfg.gamma, cfg.lam)
            advantages = masked_whiten(advantages, rm) * rm
        stats = []
        for epoch in range(cfg.ppo_epochs):
            generator = torch.Generator().manual_seed(cfg.seed * 1000 + iteration * 10 + epoch)
            order = torch.randperm(cfg.batch_size, generator=generator)
            for start in range(0, cfg.batch_size, cfg.mini_batch_size):
                i = order[start:start + cfg.mini_batch_size]
                new = forward_policy(policy, value_head, ids[i], mask[i], P, cfg.temperature, entropy=True)
                pg_loss, pg_stats = policy_loss(new['logprobs'], old['logprobs'][i], advantages[i], rm[i], cfg.clip_range)
                vf_loss, vf_stats = value_loss(new['values'], old['values'][i], returns[i], rm[i], cfg.clip_range_value)
                (pg_loss + cfg.vf_coef * vf_loss).backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                stats.append(dict(pg_loss=pg_loss.item(), vf_loss=vf_loss.item(), **pg_stats, **vf_stats))
        row = dict(reward=scores.mean().item(), kl=kl.sum(1).mean().item())
        history.append(dict(row, **{k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}))
    return history, value_head

def test_train_ppo_on_the_loop_equals_a_plain_ppo_loop():
    "One loop step per minibatch update, a rollout at each iteration's first step: the same numbers as the loop written out."
    rows = list(load_course_dataset('sft', 'train').select(range(12)))
    reward = lambda rows, responses: torch.tensor([len(a) / 10 for a in responses])
    cfg = PPOConfig(iterations=3, batch_size=4, mini_batch_size=2, ppo_epochs=2, max_new_tokens=6, lr=1e-2, progress=False)
    models = []
    for _ in range(2):
        model, tok = tiny_model()
        apply_lora(model, r=4, alpha=8, target_modules='all-linear')
        models.append(model)
    want, want_head = plain_ppo(models[0], tok, rows, reward, cfg)
    result = train_ppo(models[1], tok, rows, reward, cfg)
    # the same operations on the same tensors in one process: equal bit for bit, whatever the thread count
    assert [{k: r[k] for k in w} for r, w in zip(result.history, want)] == want and len(result.history) == len(want)
    assert want[-1]['kl'] != 0.0
    trained = lambda m: {n: p for n, p in m.named_parameters() if p.requires_grad}
    assert all(torch.equal(p, trained(models[0])[n]) for n, p in trained(models[1]).items())
    assert torch.equal(result.value_head.v.weight, want_head.v.weight)

def test_train_ppo_resumes_from_an_iterations_checkpoint(tmp_path):
    "save_every counts iterations; a run resumed from a checkpoint ends with the uninterrupted run's metrics and weights."
    rows = list(load_course_dataset('sft', 'train').select(range(12)))
    reward = lambda rows, responses: torch.tensor([len(a) / 10 for a in responses])
    def run(out, resume=False):
        model, tok = tiny_model()
        apply_lora(model, r=4, alpha=8, target_modules='all-linear')
        cfg = PPOConfig(iterations=3, batch_size=4, mini_batch_size=2, ppo_epochs=2, max_new_tokens=6, lr=1e-2,
                        progress=False, out_dir=str(out), save_every=1, keep_checkpoints=5, resume=resume)
        return model, train_ppo(model, tok, rows, reward, cfg)
    whole_model, whole = run(tmp_path/'whole')
    # one checkpoint per iteration, each at its last update (4 updates an iteration)
    assert sorted(p.name for p in (tmp_path/'whole').glob('checkpoint-*')) == [f'checkpoint-{s:06d}' for s in (4, 8, 12)]
    (tmp_path/'cut').mkdir()                           # as if stopped after the first iteration's checkpoint
    shutil.copytree(tmp_path/'whole'/'checkpoint-000004', tmp_path/'cut'/'checkpoint-000004')
    model, resumed = run(tmp_path/'cut', resume=True)
    assert len(resumed.rollouts) == 2                  # it sampled iterations 2 and 3 only
    without_time = lambda rows: [{k: v for k, v in r.items() if k != 'seconds'} for r in rows]
    assert without_time(resumed.steps) == without_time(whole.steps)
    assert without_time(resumed.history) == without_time(whole.history)
    trained = lambda m: {n: p for n, p in m.named_parameters() if p.requires_grad}
    assert all(torch.equal(p, trained(whole_model)[n]) for n, p in trained(model).items())
    assert torch.equal(resumed.value_head.v.weight, whole.value_head.v.weight)

def test_iteration_history_sums_up_each_iterations_updates():
    steps = [dict(step=s + 1, loss=0.0, lr=0.1 * s, seconds=1.0, grad_norm=float(s), reward=float(s // 2), kl=0.0,
                  non_score_reward=0.0, response_len=3.0, ended=1.0, pg_loss=float(s), vf_loss=0.0, entropy=1.0,
                  clipfrac=0.0, approx_kl=0.0, ratio=1.0 + s, vf_clipfrac=0.0) for s in range(4)]
    rows = iteration_history(steps, updates=2)
    assert [r['step'] for r in rows] == [1, 2] and [r['reward'] for r in rows] == [0.0, 1.0]
    assert [r['pg_loss'] for r in rows] == [0.5, 2.5] and [r['first_ratio'] for r in rows] == [1.0, 3.0]
    assert [r['lr'] for r in rows] == [0.1, 0.30000000000000004] and [r['seconds'] for r in rows] == [2.0, 2.0]
