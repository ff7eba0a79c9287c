"Equivalence of ftcourse.quant with bitsandbytes' CPU kernels (bit-exact), and the memory arithmetic."
import pytest, torch
bnb = pytest.importorskip('bitsandbytes')
import bitsandbytes.functional as bnbF
from ftcourse.quant import (NF4_CODE, DYNAMIC_CODE, nf4_from_scratch, quantize_nf4, dequantize_nf4, nearest_code,
    pack_nibbles, unpack_nibbles, quantize_blockwise8, NF4Linear, nf4_bits_per_param, nf4_nbytes,
    estimate_training_memory, llama_param_counts, LLAMA_LINEARS, int4_absmax_roundtrip)
from ftcourse.lora import lora_param_count

torch._dynamo.config.disable = True   # bnb compiles its odd-shape dequantization fallback; eager is the same arithmetic

def assert_bitexact(w, cs, blocksize=64):
    q, s = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type='nf4', compress_statistics=cs)
    p, st = quantize_nf4(w, blocksize, cs)
    assert p.dtype == torch.uint8 and torch.equal(p, q)
    assert torch.equal(st.absmax, s.absmax)
    if cs:
        assert torch.equal(st.offset, s.offset) and torch.equal(st.nested_absmax, s.state2.absmax)
        assert torch.equal(s.state2.code, DYNAMIC_CODE) and s.state2.blocksize == 256
    ours, theirs = dequantize_nf4(p, st), bnbF.dequantize_4bit(q, s)
    if w.ndim > 1 and w.shape[-1] % 2 == 0 and w.shape[-1] % blocksize:
        # bnb 0.50.2's CPU C kernel applies wrong scales for these shapes; compare with bnb's own torch reference
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
        am = bnbF.dequantize_blockwise(s.absmax, s.state2) + s.offset if s.nested else s.absmax
        theirs = _dequantize_4bit_compute(q.reshape(-1), am, NF4_CODE, blocksize, w.shape, w.dtype)
    assert ours.dtype == theirs.dtype == w.dtype and torch.equal(ours, theirs.reshape(ours.shape))

def test_tables():
    assert torch.equal(NF4_CODE, bnbF.get_4bit_type('nf4', device='cpu'))
    assert torch.equal(nf4_from_scratch(), NF4_CODE)   # the construction reproduces the table bit for bit
    assert torch.equal(DYNAMIC_CODE, bnbF.create_dynamic_map())
    assert (NF4_CODE > 0).sum() == 8 and (NF4_CODE < 0).sum() == 7 and (NF4_CODE == 0).sum() == 1

def test_ties_and_packing():
    mid = (NF4_CODE[3] + NF4_CODE[4]) / 2
    assert nearest_code(mid[None], NF4_CODE).item() == 3
    q = torch.randint(0, 16, (101,))
    p = pack_nibbles(q)
    assert p.shape == (51, 1) and (p[-1, 0] & 0xF) == 7 and torch.equal(unpack_nibbles(p, 101), q)

@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize('shape', [(4096,), (1000,), (4097,), (7, 9), (300, 129), (96, 160), (128, 256)])
@pytest.mark.parametrize('cs', [False, True])
def test_random_bitexact(shape, dtype, cs):
    torch.manual_seed(hash((shape, str(dtype), cs)) % 1000)
    assert_bitexact((torch.randn(shape) * 0.02).to(dtype), cs)

def test_heavy_tails_and_many_blocks():
    torch.manual_seed(0)
    w = torch.randn(700, 1000) * torch.rand(700, 1000) ** 4   # 10937.5 blocks, > 256 nested blocks, wide range of scales
    w[3, 5] = 40.0; w.view(-1)[640:704] = 0.0; w.view(-1)[-50:] = 0.0   # an outlier, an all-zero block, an all-zero last partial block
    assert_bitexact(w, False); assert_bitexact(w, True)

def test_large_tensor_takes_the_chunked_path_bitexact():
    "Tensors above 16 chunks are dequantized a chunk at a time on a CPU: still bit-exact, partial last block included."
    from ftcourse.quant import _CHUNK
    torch.manual_seed(4)
    for shape, dtype in [((16 * _CHUNK + 37,), torch.float32), ((2049, 2051), torch.bfloat16)]:
        w = (torch.randn(shape) * 0.02).to(dtype)
        assert w.numel() > 16 * _CHUNK and w.numel() % 64   # more than one step, and a last block that is partial
        assert_bitexact(w, True)

def test_blocksizes():
    torch.manual_seed(1)
    w = torch.randn(96, 160)
    for bs in [32, 128, 256]: assert_bitexact(w, True, bs)

def test_quantize_blockwise8_matches_bnb():
    torch.manual_seed(2)
    x = torch.randn(256 * 300 + 17) * torch.rand(256 * 300 + 17) ** 3
    ref, st = bnbF.quantize_blockwise(x, blocksize=256)
    q, am = quantize_blockwise8(x, 256)
    assert torch.equal(q, ref) and torch.equal(am, st.absmax)

@pytest.fixture(scope='module')
def real_model():
    from ftcourse.core import load_model
    try: return load_model()[0]
    except Exception as e: pytest.skip(f'real model unavailable: {e}')

def test_real_weights_bitexact(real_model):
    W = dict(real_model.named_parameters())
    for n in ['model.layers.2.self_attn.v_proj.weight', 'model.layers.29.mlp.gate_proj.weight', 'model.embed_tokens.weight']:
        assert_bitexact(W[n].detach(), True)
    assert_bitexact(W['model.layers.7.self_attn.o_proj.weight'].detach().bfloat16(), False)

def test_nf4linear_matches_linear4bit():
    torch.manual_seed(3)
    lin = torch.nn.Linear(192, 96)
    ours = NF4Linear.from_linear(lin, compress_statistics=True)
    ref = bnb.nn.Linear4bit(192, 96, compute_dtype=torch.float32, quant_type='nf4', compress_statistics=True)
    ref.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type='nf4', compress_statistics=True, blocksize=64)
    ref.bias = torch.nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    ref = ref.to('cpu').train()
    x = torch.randn(5, 192, requires_grad=True)
    assert torch.equal(ours(x), ref(x))   # training-mode route: dequantize + F.linear, exact
    ours(x).sum().backward(); assert x.grad.shape == x.shape and ours.packed.grad is None

def test_int4_baseline():
    w = torch.tensor([[-1.0, -0.5, 0.0, 0.5, 1.0] + [0.1] * 59])
    r = int4_absmax_roundtrip(w)
    assert torch.allclose(r[0, :5], torch.tensor([-1.0, -4 / 7, 0.0, 4 / 7, 1.0]))

def test_bits_per_param():
    assert nf4_bits_per_param(64) == 4.5
    assert abs(nf4_bits_per_param(64, True) - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-12
    w = torch.randn(1024, 1024)
    for dq in [False, True]:
        p, st = quantize_nf4(w, 64, dq)
        assert abs(8 * nf4_nbytes(p, st) / w.numel() - nf4_bits_per_param(64, dq)) < 1e-4

def small_cfg(tie=False):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=300, tie_word_embeddings=tie)

@pytest.mark.parametrize('tie', [False, True])
def test_memory_estimate_exact_parts(tie):
    from transformers import LlamaForCausalLM
    cfg = small_cfg(tie); torch.manual_seed(0)
    m = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(m.parameters())
    ids = torch.randint(0, 300, (2, 8)); m(ids, labels=ids).loss.backward(); opt.step()
    e = estimate_training_memory(cfg, 'full')
    assert e['params'] == sum(p.numel() for p in m.parameters()) == sum(llama_param_counts(cfg).values())
    assert e['weights'] == sum(p.numel() * p.element_size() for p in m.parameters())
    assert e['gradients'] == sum(p.grad.numel() * p.grad.element_size() for p in m.parameters())
    assert e['optimizer'] == sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k != 'step')

def test_lora_count_matches_peft():
    from transformers import LlamaForCausalLM
    from peft import LoraConfig, get_peft_model
    cfg = small_cfg()
    for r, targets in [(8, list(LLAMA_LINEARS)), (4, ['q_proj', 'v_proj'])]:
        pm = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=r, target_modules=targets))
        assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == lora_param_count(cfg, r, targets)

def test_qlora_paper_claims():
    from transformers import LlamaConfig
    c65 = LlamaConfig(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=64, vocab_size=32000, tie_word_embeddings=False)
    q = estimate_training_memory(c65, 'qlora', lora_r=64, dtype=torch.bfloat16, grad_checkpointing=True)
    f = estimate_training_memory(c65, 'full', dtype=torch.bfloat16)
    assert q['total'] < 48e9 < f['total'] and f['weights'] + f['gradients'] + f['optimizer'] > 780e9
    assert estimate_training_memory(small_cfg(), 'lora')['weights'] > estimate_training_memory(small_cfg(), 'qlora')['weights']

# --- the 4-bit matmul in training: gradients, and what autograd keeps for backward ---
from ftcourse.quant import NF4MatMul
from ftcourse.checkpoint import SavedTensors
from ftcourse.lora import LoRALinear

# our backward is grad_out @ W (torch.matmul), nn.Linear's is an mm on flattened rows: equal up to float32 rounding
GRAD_TOL = dict(rtol=1e-5, atol=1e-6)

def dequantized_linear(q:NF4Linear, bias=None) -> torch.nn.Linear:
    "A plain frozen nn.Linear holding the NF4 layer's dequantized weight."
    lin = torch.nn.Linear(q.in_features, q.out_features, bias=bias is not None)
    lin.weight.data = dequantize_nf4(q.packed, q.state, torch.float32)
    if bias is not None: lin.bias.data = bias.detach().clone()
    return lin.requires_grad_(False)

def linear4bit(lin:torch.nn.Linear, dtype=torch.float32, cs=True):
    "bitsandbytes' Linear4bit holding `lin`'s weight (and bias), in training mode, on CPU."
    ref = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=dtype,
                            quant_type='nf4', compress_statistics=cs)
    ref.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type='nf4',
                                   compress_statistics=cs, blocksize=64)
    if lin.bias is not None: ref.bias = torch.nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return ref.to('cpu').train()

@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('cs', [False, True])
def test_nf4linear_grads_equal_linear4bit_and_dequantized_linear(dtype, cs):
    torch.manual_seed(4)
    lin = torch.nn.Linear(192, 96)
    ours = NF4Linear.from_linear(lin, compress_statistics=cs, compute_dtype=dtype)
    ref = linear4bit(lin, dtype, cs)
    x = torch.randn(3, 5, 192)
    g = torch.randn(3, 5, 96)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    y_ours, y_bnb = ours(xs[0]), ref(xs[1])
    y_ours.backward(g)
    y_bnb.backward(g)
    # against bitsandbytes: the same dequantized bits and the same torch ops, so identical by construction
    assert torch.equal(y_ours, y_bnb) and torch.equal(xs[0].grad, xs[1].grad)
    if dtype == torch.float32:   # against a plain layer holding the dequantized weight
        x3 = x.clone().requires_grad_()
        plain = dequantized_linear(ours, lin.bias)
        y3 = plain(x3)
        y3.backward(g)
        assert torch.equal(y_ours, y3)   # forward: the very same F.linear
        torch.testing.assert_close(xs[0].grad, x3.grad, **GRAD_TOL)

def test_nf4matmul_bias_grad_over_every_leading_dim():
    torch.manual_seed(5)
    q = NF4Linear.from_linear(torch.nn.Linear(128, 64, bias=False))
    w = dequantize_nf4(q.packed, q.state, torch.float32)
    bias = torch.randn(64, requires_grad=True)
    x = torch.randn(2, 3, 128, requires_grad=True)
    g = torch.randn(2, 3, 64)
    NF4MatMul.apply(x, q.packed, q.state, bias).backward(g)
    b2, x2 = bias.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    torch.nn.functional.linear(x2, w, b2).backward(g)
    torch.testing.assert_close(bias.grad, b2.grad, **GRAD_TOL)
    torch.testing.assert_close(x.grad, x2.grad, **GRAD_TOL)
    # bitsandbytes' Linear4bit with a trainable bias (its MatMul4Bit sums dim 0; autograd sums the rest to the bias' shape)
    lin = torch.nn.Linear(128, 64, bias=True)
    ref, ours = linear4bit(lin), NF4Linear.from_linear(lin)
    ref.bias.requires_grad_(True)
    ours.bias.requires_grad_(True)
    ref(x.detach()).backward(g)
    ours(x.detach()).backward(g)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, **GRAD_TOL)   # the same sum in another order

def test_nf4linear_saves_codes_not_the_dequantized_weight():
    "The bug this replaces: dequantize + F.linear saved the 4 MiB fp32 weight of a 1024x1024 layer for backward."
    torch.manual_seed(6)
    base = torch.nn.Linear(1024, 1024, bias=False).requires_grad_(False)
    q = NF4Linear.from_linear(base)   # double quantization
    packed, absmax, nested, offset, levels = 1024 * 1024 // 2, 1024 * 1024 // 64, 4 * (1024 * 1024 // 64 // 256), 4, 4 * 16
    codes_and_state = packed + absmax + nested + offset + levels   # 540,996 bytes, all of them kept by the layer anyway
    x = torch.randn(8, 1024, requires_grad=True)
    with SavedTensors() as st: y = q(x)
    assert st.unique == codes_and_state < 4 * 2**20 // 7
    assert not any(r[2] >= 2**20 for r in st.records)   # no saved tensor as large as a quarter of the fp32 weight
    y.sum().backward()
    assert x.grad is not None and q.packed.grad is None
    # with LoRA on top: the input (for A's gradient), x @ A.T (for B's), A and B, and the codes and state
    torch.manual_seed(7)
    layer = LoRALinear(torch.nn.Linear(1024, 1024, bias=False), r=8, alpha=16)
    layer.base = NF4Linear.from_linear(layer.base)
    x = torch.randn(8, 1024, requires_grad=True)
    with SavedTensors() as st: y = layer(x)
    a_and_b = 2 * 4 * 8 * 1024
    assert st.unique == 8 * 1024 * 4 + 8 * 8 * 4 + a_and_b + codes_and_state
    # a frozen fp32 nn.Linear saves its 4 MiB weight (which it holds anyway); the input needs no saving for grad_input
    with SavedTensors() as st: base(x)
    assert st.unique == 4 * 2**20
    # no gradient needed for the input: nothing saved at all (as F.linear)
    with SavedTensors() as st: q(torch.randn(8, 1024))
    assert st.records == []

def test_nf4linear_keeps_float32_state_when_the_model_is_cast():
    q = NF4Linear.from_linear(torch.nn.Linear(256, 64), compress_statistics=True)
    w = dequantize_nf4(q.packed, q.state, torch.float32)
    q.to(torch.bfloat16)
    assert q.nested_absmax.dtype == q.offset.dtype == q.code.dtype == torch.float32 and q.absmax.dtype == torch.uint8
    assert torch.equal(dequantize_nf4(q.packed, q.state, torch.float32), w)
    assert {n for n, _ in q.named_buffers()} == {'packed', 'absmax', 'offset', 'nested_absmax', 'code'}
