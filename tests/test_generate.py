"ftcourse.generate: filters equal transformers' warpers, samples follow the filtered distribution, decoding equals model.generate."
import os, pytest, torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper, TemperatureLogitsWarper
from ftcourse.core import tiny_model, load_model, set_seed
from ftcourse.generate import (top_k_filter, top_p_filter, next_token_probs, sample_next, generate,
                               layer_params, decode_step_flops, KVCache, forward_with_cache, greedy_with_cache,
                               rope_theta, cache_arg, output_cache)

# On an oversubscribed machine (a shared CI runner), one thread avoids threads spinning against each other.
if hasattr(os, 'getloadavg') and os.getloadavg()[0] > (os.cpu_count() or 1): torch.set_num_threads(1)

def random_logits(seed, rows=64, vocab=100):
    "Rows of different sharpness; a quarter of the rows are small integers, i.e. full of exact ties."
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * torch.rand(rows, 1, generator=g) * 5
    x[: rows // 4] = torch.randint(-3, 3, (rows // 4, vocab), generator=g).float()
    return x

@pytest.fixture(scope='module')
def tiny(): return tiny_model()

@pytest.fixture(scope='module')
def real():
    m, tok = load_model()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors='pt', return_dict=True)['input_ids']
    return m, tok, ids

# --- filters: exact equality with transformers ---------------------------------------------------------------

@pytest.mark.parametrize('seed', range(4))
@pytest.mark.parametrize('keep', [1, 2, 7])
def test_top_k_equals_warper(seed, keep):
    x = random_logits(seed)
    for k in [1, 2, 3, 10, 50, 99, 100, 1000]:
        assert torch.equal(top_k_filter(x, k, keep), TopKLogitsWarper(k, min_tokens_to_keep=keep)(None, x)), k

@pytest.mark.parametrize('seed', range(4))
@pytest.mark.parametrize('keep', [1, 2, 7])
def test_top_p_equals_warper(seed, keep):
    x = random_logits(seed)
    for p in [0.01, 0.1, 0.3, 0.5, 0.75, 0.9, 0.95, 0.999]:
        assert torch.equal(top_p_filter(x, p, keep), TopPLogitsWarper(p, min_tokens_to_keep=keep)(None, x)), p

def test_top_k_keeps_ties():
    x = torch.tensor([[3., 1., 3., 2., 3.]])
    assert torch.isfinite(top_k_filter(x, 1)).tolist() == [[True, False, True, False, True]]

def test_filters_off_and_1d():
    x = torch.randn(50)
    assert torch.equal(top_k_filter(x, 0), x) and torch.equal(top_p_filter(x, 1.0), x)
    assert torch.equal(top_k_filter(x, 5), TopKLogitsWarper(5)(None, x[None])[0])
    assert torch.equal(top_p_filter(x, 0.8), TopPLogitsWarper(0.8)(None, x[None])[0])

def test_nucleus_is_smallest_set_with_mass_p():
    x = torch.randn(512, 200) * 3
    for p in [0.2, 0.6, 0.95]:
        probs, keep = x.softmax(-1), torch.isfinite(top_p_filter(x, p))
        mass = (probs * keep).sum(-1)
        smallest = torch.where(keep, probs, torch.inf).min(-1).values
        assert (mass >= p - 1e-6).all() and (mass - smallest < p + 1e-6).all()

def test_next_token_probs_equals_warper_chain():
    x = random_logits(9)
    for t, k, p in [(0.7, 0, 1.0), (1.5, 10, 1.0), (0.9, 0, 0.8), (1.2, 20, 0.9)]:
        y = TemperatureLogitsWarper(t)(None, x)
        if k: y = TopKLogitsWarper(k)(None, y)
        if p < 1: y = TopPLogitsWarper(p)(None, y)
        assert torch.equal(next_token_probs(x, t, k, p), y.softmax(-1))

# --- sampling: frequencies follow the filtered distribution ---------------------------------------------------

@pytest.mark.parametrize('kw', [dict(temperature=1.0), dict(temperature=0.6, top_k=8),
                                dict(temperature=1.4, top_p=0.7), dict(temperature=1.0, top_k=15, top_p=0.85)])
def test_sample_frequencies(kw):
    "20,000 draws, fixed seed: chi-square p-value > 1e-3 over kept tokens, |freq - prob| < 0.015 (about 4 standard errors), no filtered token."
    n, z = 20_000, torch.randn(40, generator=torch.Generator().manual_seed(3)) * 2
    draws = sample_next(z.expand(n, -1), generator=torch.Generator().manual_seed(0), **kw)
    freq = torch.bincount(draws, minlength=40).double()
    probs = next_token_probs(z, kw.get('temperature', 1.0), kw.get('top_k', 0), kw.get('top_p', 1.0)).double()
    kept = probs > 0
    stat = ((freq[kept] - n * probs[kept])**2 / (n * probs[kept])).sum()
    pval = torch.special.gammaincc((kept.sum() - 1) / 2, stat / 2).item()
    assert freq[~kept].sum() == 0
    assert pval > 1e-3, pval
    assert (freq / n - probs).abs().max() < 0.015

def test_sampler_detects_a_wrong_distribution():
    "The chi-square check has power: draws from the unfiltered softmax fail against the top-p distribution."
    n, z = 20_000, torch.randn(40, generator=torch.Generator().manual_seed(3)) * 2
    draws = sample_next(z.expand(n, -1), generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=40).double()
    assert freq[next_token_probs(z, top_p=0.7) == 0].sum() > 0

def test_greedy_and_generator():
    x = torch.randn(4, 30)
    assert torch.equal(sample_next(x, temperature=0), x.argmax(-1))
    a = sample_next(x, generator=torch.Generator().manual_seed(5))
    b = sample_next(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (4,)
    assert sample_next(x[0], temperature=0).shape == ()

@pytest.mark.parametrize('kw', [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2)])
def test_bad_sampling_args(kw):
    with pytest.raises(ValueError): sample_next(torch.randn(1, 10), **kw)

# --- generate: token for token equal to model.generate ---------------------------------------------------------

@pytest.mark.parametrize('use_cache', [True, False])
def test_greedy_equals_hf_tiny(tiny, use_cache):
    m, tok = tiny
    for seed in range(3):
        x = torch.randint(3, len(tok), (1, 5 + 3 * seed), generator=torch.Generator().manual_seed(seed))
        ref = m.generate(x, do_sample=False, max_new_tokens=20, use_cache=use_cache)
        assert torch.equal(generate(m, x, 20, use_cache=use_cache), ref)
        assert torch.equal(generate(m, x, 20, use_cache=not use_cache), ref)

@pytest.mark.parametrize('use_cache', [True, False])
def test_left_padded_batch_equals_hf_tiny(tiny, use_cache):
    m, tok = tiny
    tok.padding_side = 'left'
    b = tok(["a longer prompt, with padding for the others", "hi", "medium length"], return_tensors='pt', padding=True)
    assert (b['attention_mask'] == 0).any()
    ref = m.generate(**b, do_sample=False, max_new_tokens=16, use_cache=use_cache)
    mine = generate(m, b['input_ids'], 16, attention_mask=b['attention_mask'], use_cache=use_cache)
    assert torch.equal(mine, ref)
    # the padded row gets the same tokens as the same prompt alone
    alone = generate(m, tok(["hi"], return_tensors='pt')['input_ids'], 16)
    assert torch.equal(mine[1, -16:], alone[0, -16:])

def test_stops_at_eos_and_pads_tiny(tiny):
    m, tok = tiny
    tok.padding_side = 'left'
    b = tok(["first prompt here", "second"], return_tensors='pt', padding=True)
    free = generate(m, b['input_ids'], 12, attention_mask=b['attention_mask'], eos_token_id=[])
    T = b['input_ids'].shape[1]
    eos = int(free[0, T + 2])                      # a token row 0 produces at step 3: call it EOS
    ref = m.generate(**b, do_sample=False, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    mine = generate(m, b['input_ids'], 12, attention_mask=b['attention_mask'], eos_token_id=eos, pad_token_id=0)
    assert torch.equal(mine, ref)
    first = (mine[0, T:] == eos).nonzero()[0, 0]
    assert (mine[0, T + first + 1:] == 0).all()

def test_sampling_equals_hf_with_same_seed_tiny(tiny):
    "transformers draws torch.multinomial once per step from the warped softmax; with the same global seed, so do we."
    m, tok = tiny
    x = torch.randint(3, len(tok), (2, 6), generator=torch.Generator().manual_seed(1))
    for t, k, p in [(1.0, 0, 1.0), (0.8, 0, 0.9), (1.3, 25, 1.0), (0.7, 40, 0.8)]:
        for uc in [True, False]:
            set_seed(11); ref = m.generate(x, do_sample=True, temperature=t, top_k=k, top_p=p, max_new_tokens=15, use_cache=uc)
            set_seed(11); mine = generate(m, x, 15, temperature=t, top_k=k, top_p=p, use_cache=uc)
            assert torch.equal(mine, ref), (t, k, p, uc)

def test_generator_reproducible_tiny(tiny):
    m, tok = tiny
    x = torch.randint(3, len(tok), (1, 6))
    a = generate(m, x, 10, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = generate(m, x, 10, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)

def test_bad_generate_args(tiny):
    with pytest.raises(ValueError): generate(tiny[0], torch.tensor([[5, 6]]), -1)
    assert generate(tiny[0], torch.tensor([[5, 6]]), 0).tolist() == [[5, 6]]

@pytest.mark.slow
def test_greedy_equals_hf_real(real):
    m, tok, ids = real
    ref = m.generate(ids, do_sample=False, max_new_tokens=10)
    assert torch.equal(generate(m, ids, 10, use_cache=True), ref)
    assert torch.equal(generate(m, ids, 10, use_cache=False), ref)
    assert 'Paris' in tok.decode(ref[0, ids.shape[1]:])

@pytest.mark.slow
def test_sampling_equals_hf_real(real):
    m, tok, ids = real
    set_seed(4); ref = m.generate(ids, do_sample=True, temperature=0.9, top_k=30, top_p=0.9, max_new_tokens=8)
    set_seed(4); mine = generate(m, ids, 8, temperature=0.9, top_k=30, top_p=0.9)
    assert torch.equal(mine, ref)

# --- the from-scratch KV cache: logits and tokens equal the model's ---------------------------------------------

@pytest.mark.parametrize('seed', range(3))
def test_forward_with_cache_equals_model_tiny(tiny, seed):
    "Prefill in one or several chunks, then decode steps: the logits equal a full forward pass (fp32, 1e-5)."
    m, tok = tiny
    x = torch.randint(3, len(tok), (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(): ref = m(x).logits
    for chunks in [(12,), (5, 4, 3), (7,) + (1,) * 5]:
        cache, out, start = KVCache(m.config.num_hidden_layers), [], 0
        for n in chunks:
            out.append(forward_with_cache(m, x[:, start:start + n], cache))
            start += n
        assert len(cache) == 12 and cache.keys[0].shape == (2, m.config.num_key_value_heads, 12, m.config.head_dim)
        assert torch.allclose(torch.cat(out, 1), ref, atol=1e-5), chunks

def test_cache_holds_the_models_keys_tiny(tiny):
    m, tok = tiny
    x = torch.randint(3, len(tok), (1, 9), generator=torch.Generator().manual_seed(4))
    cache = KVCache(m.config.num_hidden_layers)
    forward_with_cache(m, x, cache)
    with torch.no_grad(): hf = output_cache(m(x, use_cache=True))
    for layer, theirs in enumerate(hf.layers):
        assert torch.allclose(cache.keys[layer], theirs.keys, atol=1e-5)
        assert torch.allclose(cache.values[layer], theirs.values, atol=1e-5)

def test_greedy_with_cache_equals_hf_tiny(tiny):
    m, tok = tiny
    for seed in range(3):
        x = torch.randint(3, len(tok), (2, 4 + 3 * seed), generator=torch.Generator().manual_seed(seed))
        ref = m.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=20)
        assert torch.equal(greedy_with_cache(m, x, 20), ref)

def test_greedy_with_cache_stops_at_eos_tiny(tiny):
    m, tok = tiny
    x = torch.randint(3, len(tok), (2, 6), generator=torch.Generator().manual_seed(7))
    free = greedy_with_cache(m, x, 12, eos_token_id=[])
    eos = int(free[0, 6 + 2])                       # a token row 0 produces at step 3: call it EOS
    ref = m.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=12, eos_token_id=eos,
                     pad_token_id=m.generation_config.pad_token_id)
    assert torch.equal(greedy_with_cache(m, x, 12, eos_token_id=eos), ref)
    assert greedy_with_cache(m, x, 0).shape == x.shape

def test_cache_bytes_formula_tiny(tiny):
    "The cache grows by 2 * layers * kv_heads * head_dim * bytes per token, in fp32 and in bf16."
    m, tok = tiny
    c = m.config
    x = torch.randint(3, len(tok), (3, 5), generator=torch.Generator().manual_seed(0))
    for dtype in [torch.float32, torch.bfloat16]:
        cache = KVCache(c.num_hidden_layers)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            forward_with_cache(m, x, cache)
            for step in range(3):
                forward_with_cache(m, x[:, :1], cache)
                per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * cache.keys[0].element_size()
                assert cache.keys[0].dtype == dtype and cache.nbytes() == 3 * (6 + step) * per_token

def test_kv_cache_bad_input(tiny):
    m, tok = tiny
    with pytest.raises(ValueError): greedy_with_cache(m, torch.tensor([[5, 6]]), -1)
    with pytest.raises(ValueError): greedy_with_cache(m, torch.tensor([5, 6]), 3)
    scaled = {'rope_type': 'linear', 'factor': 2.0, 'rope_theta': 1e4}
    cfg = m.config.__class__.from_dict({**m.config.to_dict(), 'rope_parameters': scaled})
    with pytest.raises(ValueError, match='rope_type'): rope_theta(cfg)
    assert rope_theta(m.config) == m.config.rope_parameters['rope_theta'] and len(KVCache(2)) == 0

def test_cache_arg_names_the_forward_argument(tiny):
    import inspect
    assert cache_arg(tiny[0]) in inspect.signature(tiny[0].forward).parameters

@pytest.mark.slow
def test_greedy_with_cache_equals_hf_real(real):
    m, tok, ids = real
    assert torch.equal(greedy_with_cache(m, ids, 10), m.generate(ids, do_sample=False, max_new_tokens=10))

# --- FLOP count ------------------------------------------------------------------------------------------------

def test_layer_params_match_weights(tiny):
    m = tiny[0]
    n = sum(p.numel() for name, p in m.named_parameters() if '.layers.' in name and 'norm' not in name)
    assert layer_params(m.config) == n

def test_decode_flops_shape(tiny):
    cfg = tiny[0].config
    a = [decode_step_flops(cfg, L) for L in range(1, 50)]
    b = [decode_step_flops(cfg, L, use_cache=False) for L in range(1, 50)]
    assert b[0] == a[0]                                  # one token: the same work either way
    assert all(y > x for x, y in zip(a, b[1:]))
    d2 = [b[i + 1] - 2 * b[i] + b[i - 1] for i in range(1, 48)]
    assert all(v > 0 for v in d2)                        # without cache: quadratic (attention) in the length
    assert len({a[i + 1] - a[i] for i in range(48)}) == 1  # with cache: linear
