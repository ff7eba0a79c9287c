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
