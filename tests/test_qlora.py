"QLoRA from scratch: LoRA adapters on a frozen NF4 base train, and the base is exactly the NF4 round trip of the weights."
import copy, pytest, torch
from ftcourse.core import tiny_model
from ftcourse.lora import apply_lora, lora_layers, count_trainable
from ftcourse.quant import quantize_lora_bases, NF4Linear, quantize_nf4, dequantize_nf4, nf4_nbytes

def test_qlora_bases_are_nf4_and_only_adapters_train():
    m, tok = tiny_model(hidden_size=128, intermediate_size=256)
    ref = {n: l.weight.detach().clone() for n, l in m.named_modules() if isinstance(l, torch.nn.Linear) and 'lm_head' not in n}
    apply_lora(m, r=4, alpha=8, target_modules='all-linear')
    n = quantize_lora_bases(m)
    layers = lora_layers(m)
    assert n == len(layers) == 7 * m.config.num_hidden_layers
    for name, l in layers.items():
        assert isinstance(l.base, NF4Linear)
        w = dequantize_nf4(l.base.packed, l.base.state, torch.float32)
        packed, st = quantize_nf4(ref[name], 64, True)
        assert torch.equal(w, dequantize_nf4(packed, st, torch.float32))        # the base is the NF4 round trip, bit for bit
    assert count_trainable(m) == sum(l.lora_A.numel() + l.lora_B.numel() for l in layers.values())
    x = tok(["hello there"], return_tensors='pt')
    out = m(**x, labels=x['input_ids']); out.loss.backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if 'lora_' in n)
    assert all(not p.requires_grad for n, p in m.named_parameters() if 'lora_' not in n)

def test_qlora_needs_lora_first():
    m, _ = tiny_model()
    with pytest.raises(ValueError, match='apply_lora first'): quantize_lora_bases(m)

def _grads(m, emb, ids):
    "Loss, and the gradients of the input embeddings and of every LoRA factor, from one backward."
    m.zero_grad(set_to_none=True)
    e = emb.clone().requires_grad_()
    loss = m(inputs_embeds=e, labels=ids).loss
    loss.backward()
    return loss.detach(), e.grad, {n: p.grad.clone() for n, p in m.named_parameters() if 'lora_' in n}

def test_qlora_grads_equal_dequantized_model_and_bitsandbytes():
    "LoRA over NF4Linear = LoRA over nn.Linear(dequantized) (float32 tolerance) = LoRA over bnb's Linear4bit (exact)."
    bnb = pytest.importorskip('bitsandbytes')
    m, tok = tiny_model(hidden_size=128, intermediate_size=256)
    orig = {n: l for n, l in m.named_modules() if isinstance(l, torch.nn.Linear) and 'lm_head' not in n}
    orig = {n: copy.deepcopy(l) for n, l in orig.items()}
    apply_lora(m, r=4, alpha=8, target_modules='all-linear')
    torch.manual_seed(1)
    for n, p in m.named_parameters():
        if 'lora_B' in n: torch.nn.init.normal_(p, std=0.02)   # B = 0 at init would leave A without gradient
    quantize_lora_bases(m)
    plain, with_bnb = copy.deepcopy(m), copy.deepcopy(m)
    for name, l in lora_layers(plain).items():
        lin = torch.nn.Linear(l.base.in_features, l.base.out_features, bias=False)
        lin.weight.data = dequantize_nf4(l.base.packed, l.base.state, torch.float32)
        l.base = lin.requires_grad_(False)
    for name, l in lora_layers(with_bnb).items():
        ref = bnb.nn.Linear4bit(l.base.in_features, l.base.out_features, bias=False, compute_dtype=torch.float32,
                                quant_type='nf4', compress_statistics=True)
        ref.weight = bnb.nn.Params4bit(orig[name].weight.detach().clone(), requires_grad=False, quant_type='nf4',
                                       compress_statistics=True, blocksize=64)
        l.base = ref.to('cpu')
        assert torch.equal(l.base.weight.data, lora_layers(m)[name].base.packed)
    for model in (m, plain, with_bnb): model.train()
    torch.manual_seed(2)
    ids = torch.randint(3, len(tok), (2, 12))
    emb = m.get_input_embeddings()(ids).detach()
    loss, g_in, g = _grads(m, emb, ids)
    loss_p, g_in_p, g_p = _grads(plain, emb, ids)
    loss_b, g_in_b, g_b = _grads(with_bnb, emb, ids)
    assert len(g) == 2 * 7 * m.config.num_hidden_layers and all(v.abs().sum() > 0 for v in g.values())
    # bitsandbytes: the same dequantized bits through the same torch ops, identical by construction
    assert torch.equal(loss, loss_b) and torch.equal(g_in, g_in_b) and all(torch.equal(g[k], g_b[k]) for k in g)
    # the plain model: forward identical (same F.linear); backward's grad_input is a different matmul call: fp32 tolerance
    assert torch.equal(loss, loss_p)
    torch.testing.assert_close(g_in, g_in_p, rtol=1e-5, atol=1e-7)
    for k in g: torch.testing.assert_close(g[k], g_p[k], rtol=1e-5, atol=1e-7)

def test_qlora_model_saves_no_dequantized_weight():
    "On the tiny model, a QLoRA forward saves exactly LoRA's activations plus the NF4 codes in place of the fp32 weights."
    from ftcourse.checkpoint import SavedTensors
    m, tok = tiny_model(hidden_size=128, intermediate_size=256)
    apply_lora(m, r=4, alpha=8, target_modules='all-linear')
    q = copy.deepcopy(m)
    quantize_lora_bases(q)
    ids = torch.randint(3, len(tok), (2, 16))
    with SavedTensors(exclude=m) as s_lora: m(ids, labels=ids).loss
    with SavedTensors(exclude=q) as s_qlora: q(ids, labels=ids).loss
    assert s_lora.unique == s_qlora.unique   # the same activations, nothing dequantized kept
    # what differs: the weights backward needs (all base layers but the first q, k, v, whose input needs no gradient)
    skip = {f'model.layers.0.self_attn.{p}_proj' for p in 'qkv'}
    fp32 = sum(l.base.weight.numel() * 4 for n, l in lora_layers(m).items() if n not in skip)
    nf4 = sum(nf4_nbytes(l.base.packed, l.base.state) for n, l in lora_layers(q).items() if n not in skip) + 16 * 4
    assert s_lora.excluded - s_qlora.excluded == fp32 - nf4
