"Checkpointing: exact saved-tensor accounting, bit-identical gradients, and the same saved bytes as transformers' checkpointing."
import pytest, torch
from torch import nn
from ftcourse.core import tiny_model, load_model
from ftcourse.checkpoint import (SavedTensors, saved_tensor_bytes, checkpoint_layers, checkpoint_segments, decoder_layers,
                                 hf_checkpointing, loss_and_grads, grads_equal)

def fwd(m, ids): return m(ids, labels=ids, use_cache=False)

@pytest.fixture(scope='module', autouse=True)
def one_thread():
    "These models are small: one thread avoids OpenMP spin-waiting when the machine is oversubscribed (results are the same)."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

@pytest.fixture(scope='module')
def tiny():
    m, tok = tiny_model(num_hidden_layers=6)
    ids = torch.randint(0, len(tok), (2, 33), generator=torch.Generator().manual_seed(0))
    return m.train(), ids

@pytest.fixture(scope='module')
def real():
    m, _ = load_model()
    ids = torch.randint(0, m.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    return m.train(), ids

def test_accounting_views_and_repeats():
    x = torch.randn(50, 8, requires_grad=True)
    s = saved_tensor_bytes(lambda x: x * x, x)                     # the same tensor saved twice
    assert s == dict(n=2, unique=1600, naive=3200, excluded=0)
    s = saved_tensor_bytes(lambda x: x.view(400).sin() * x.flatten().cos(), x)   # two views of x, plus sin/cos outputs
    assert s['unique'] == 3 * 1600 and s['naive'] == 4 * 1600
    assert saved_tensor_bytes(lambda x: x + 1, x)['n'] == 0

def test_accounting_excludes_parameters():
    lin = nn.Linear(8, 16)
    x = torch.randn(5, 8, requires_grad=True)
    assert saved_tensor_bytes(lin, x, exclude=lin) == dict(n=2, unique=5*8*4, naive=5*8*4, excluded=16*8*4)
    assert saved_tensor_bytes(lin, x)['unique'] == 5*8*4 + 16*8*4

@pytest.mark.parametrize('how', [dict(every=1), dict(every=2), dict(every=7), dict(layers=[0, 5]), dict(k=2), dict(k=4), dict(k=6)])
def test_tiny_grads_bit_identical(tiny, how):
    m, ids = tiny
    l0, g0 = loss_and_grads(m, ids)
    ctx = checkpoint_segments(m, how['k']) if 'k' in how else checkpoint_layers(m, **how)
    with ctx:
        l1, g1 = loss_and_grads(m, ids)
        s = saved_tensor_bytes(fwd, m, ids, exclude=m)
    assert torch.equal(l0, l1) and grads_equal(g0, g1) and len(g0) == len(list(m.parameters()))
    assert s['unique'] < saved_tensor_bytes(fwd, m, ids, exclude=m)['unique']
    assert all('forward' not in vars(l) for l in decoder_layers(m))

def test_dropout_rng_restored():
    m, tok = tiny_model(num_hidden_layers=3, attention_dropout=0.5)
    m.train()
    ids = torch.randint(0, len(tok), (2, 17), generator=torch.Generator().manual_seed(3))
    l0, g0 = loss_and_grads(m, ids, seed=5)
    assert not torch.equal(l0, loss_and_grads(m, ids, seed=6)[0])          # dropout is really active
    with checkpoint_layers(m): l1, g1 = loss_and_grads(m, ids, seed=5)
    assert torch.equal(l0, l1) and grads_equal(g0, g1)
    with checkpoint_layers(m, preserve_rng_state=False): l2, g2 = loss_and_grads(m, ids, seed=5)
    assert torch.equal(l0, l2) and not grads_equal(g0, g2)

@pytest.mark.parametrize('every', [1, 2, 3])
def test_tiny_same_bytes_as_transformers(tiny, every):
    m, ids = tiny
    with checkpoint_layers(m, every=every): ours = saved_tensor_bytes(fwd, m, ids, exclude=m)
    with hf_checkpointing(m, every=every): theirs = saved_tensor_bytes(fwd, m, ids, exclude=m)
    assert ours == theirs
    assert saved_tensor_bytes(fwd, m, ids, exclude=m)['unique'] > ours['unique']   # hf_checkpointing was switched off

def test_segments_keep_one_input_per_segment(tiny):
    m, ids = tiny
    h = m.config.hidden_size * ids.numel() * 4
    s = {}
    for k in (1, 2, 3, 6):
        with checkpoint_segments(m, k): s[k] = saved_tensor_bytes(fwd, m, ids, exclude=m)['unique']
    assert s[1] - s[6] == 5 * h and s[2] - s[6] == 2 * h and s[3] - s[6] == h

def test_no_grad_and_cache_pass_through(tiny):
    m, ids = tiny
    m.eval()
    try:
        with torch.no_grad():
            ref = m(ids, use_cache=True)
            with checkpoint_layers(m): out = m(ids, use_cache=True)
        assert torch.equal(ref.logits, out.logits) and out.past_key_values.get_seq_length() == ids.shape[1]
        with checkpoint_layers(m): out = m(ids, use_cache=True)   # with grad: the cache is dropped, like transformers does
        assert torch.equal(ref.logits, out.logits)
    finally: m.train()

def test_bad_input(tiny):
    m, _ = tiny
    with pytest.raises(ValueError): checkpoint_layers(m, every=0)
    with pytest.raises(ValueError): checkpoint_layers(m, layers=[6])
    with pytest.raises(ValueError): checkpoint_segments(m, 0)
    with checkpoint_layers(m, layers=[1]):
        with pytest.raises(ValueError): checkpoint_layers(m)
    with pytest.raises(ValueError): decoder_layers(nn.Linear(2, 2))

def test_real_model_grads_and_bytes(real):
    m, ids = real
    l0, g0 = loss_and_grads(m, ids)
    with checkpoint_layers(m): l1, g1 = loss_and_grads(m, ids)
    assert torch.equal(l0, l1) and grads_equal(g0, g1)
    with checkpoint_layers(m): ours = saved_tensor_bytes(fwd, m, ids, exclude=m)
    with hf_checkpointing(m): theirs = saved_tensor_bytes(fwd, m, ids, exclude=m)
    assert ours == theirs
    c = m.config
    assert ours['unique'] >= c.num_hidden_layers * ids.numel() * c.hidden_size * 4

# --- the chunked output head -------------------------------------------------------------------------------------
import transformers
from ftcourse.checkpoint import chunked_logps, chunked_token_logps, head_transform
from ftcourse.dpo import token_logps
from ftcourse.lora import apply_lora

def _plain_logps(h, W, y, scale=1.0, softcap=None, temperature=1.0):
    z = (h @ W.T) * scale
    if softcap: z = softcap * torch.tanh(z / softcap)
    return (z / temperature).log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)

def _rel(a, b): return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()

@pytest.mark.parametrize('train_w', [True, False])
@pytest.mark.parametrize('tf', [{}, dict(softcap=3.0), dict(scale=0.0625), dict(softcap=5.0, temperature=0.7)])
@pytest.mark.parametrize('chunk', [1, 8, 100])
def test_chunked_logps_equals_plain(train_w, tf, chunk):
    torch.manual_seed(0)
    h, W = torch.randn(37, 16, requires_grad=True), (2 * torch.randn(100, 16)).requires_grad_(train_w)
    y, g = torch.randint(0, 100, (37,)), torch.randn(37)
    wrt = [h, W] if train_w else [h]
    ref, ours = _plain_logps(h, W, y, **tf), chunked_logps(h, W, y, chunk, **tf)
    assert (ours - ref).abs().max() <= 1e-5
    for a, b in zip(torch.autograd.grad((ours * g).sum(), wrt), torch.autograd.grad((ref * g).sum(), wrt)):
        assert _rel(a, b) <= 1e-5

def test_chunked_logps_saves_no_logits():
    h, W, y = torch.randn(64, 16, requires_grad=True), torch.randn(1000, 16, requires_grad=True), torch.randint(0, 1000, (64,))
    with SavedTensors(exclude=[W]) as plain: _plain_logps(h, W, y)
    with SavedTensors(exclude=[W]) as ours: chunked_logps(h, W, y, 16)
    assert plain.unique >= 64 * 1000 * 4 and ours.unique < 64 * 1000 * 4 / 10

def test_chunked_logps_bad_input():
    h, W = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match='labelled positions'): chunked_logps(h, W, torch.tensor([0, 1, -100, 2]))
    with pytest.raises(ValueError, match='chunk_size'): chunked_logps(h, W, torch.tensor([0, 1, 2, 3]), 0)
    with pytest.raises(ValueError, match=r'\(N, d\)'): chunked_logps(h[None], W, torch.tensor([0, 1, 2, 3]))

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)

def _models():
    torch.manual_seed(0)
    lora, _ = tiny_model()
    apply_lora(lora, r=4, alpha=8, target_modules='all-linear')
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if 'lora_B' in n: p.normal_(0, 0.02)   # non-zero adapters: every gradient is tested
    return {'llama': tiny_model()[0], 'llama-lora': lora,
            'gemma2': transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**SMALL, head_dim=16, final_logit_softcapping=2.0)),
            'cohere': transformers.CohereForCausalLM(transformers.CohereConfig(**SMALL, logit_scale=0.5)),
            'granite': transformers.GraniteForCausalLM(transformers.GraniteConfig(**SMALL, logits_scaling=4.0))}

@pytest.mark.parametrize('name', ['llama', 'llama-lora', 'gemma2', 'cohere', 'granite'])
def test_chunked_token_logps_equals_model_logits(name):
    model = _models()[name].train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 20), generator=gen)
    am = torch.ones_like(ids)
    am[1, 15:] = 0
    labels = ids.masked_fill(am == 0, -100)
    labels[:, :6] = -100
    g = torch.randn(3, 19, generator=gen)
    def run(fn):
        model.zero_grad(set_to_none=True)
        lp, mask = fn()
        (lp * g).sum().backward()
        return lp.detach(), mask, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    ref, ref_mask, ref_g = run(lambda: token_logps(model(input_ids=ids, attention_mask=am).logits, labels))
    ours, mask, our_g = run(lambda: chunked_token_logps(model, ids, am, labels, chunk_size=7))
    assert torch.equal(mask, ref_mask) and our_g.keys() == ref_g.keys()
    assert (ours - ref).abs().max() <= 1e-5
    assert all(_rel(our_g[k], ref_g[k]) <= 1e-5 for k in ref_g)

def test_chunked_head_refuses_unknown_transforms_and_adapted_heads():
    assert head_transform(transformers.Gemma2Config(**SMALL, head_dim=16, final_logit_softcapping=2.0)) == dict(scale=1.0, softcap=2.0)
    with pytest.raises(ValueError, match='logit_bias_scale'): head_transform(transformers.LlamaConfig(**SMALL, logit_bias_scale=3.0))
    m, _ = tiny_model()
    apply_lora(m, r=4, alpha=8, target_modules=['lm_head'])
    ids = torch.randint(0, 100, (1, 8))
    with pytest.raises(ValueError, match='no adapter on lm_head'): chunked_token_logps(m, ids, None, ids)
