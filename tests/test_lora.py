"LoRA from scratch vs peft: layer outputs and gradients, model-level adaptation, merging, and parameter counts from configs."
import copy, math, os
import pytest, torch
from torch import nn
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config
from ftcourse.core import tiny_model, load_model
from ftcourse.lora import (LoRALinear, adapters_disabled, adapter_state_dict, save_adapters, load_adapters, apply_lora,
                           lora_layers, lora_state_dict, merge_lora, count_trainable, copy_lora_from_peft,
                           peft_lora_layer, lora_params, lora_param_count, model_param_count, peft_trainable_count, target_names,
                           meta_model, TARGETS, KNOWN_CONFIGS, SMOLLM2_135M, LLAMA2_7B, MISTRAL_7B, LLAMA3_8B)

TOL = 1e-6  # fp32; the two implementations run the same ops in the same order, so in practice the difference is 0

def _pair(d_in, d_out, r, alpha, bias=True, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias)
    ours = LoRALinear(copy.deepcopy(base), r, alpha, dropout)
    theirs = peft_lora_layer(copy.deepcopy(base), r, alpha, dropout)
    with torch.no_grad():
        ours.lora_B.normal_()
        theirs.lora_A['default'].weight.copy_(ours.lora_A); theirs.lora_B['default'].weight.copy_(ours.lora_B)
    return ours, theirs

def test_init_starts_at_base_and_freezes():
    torch.manual_seed(0)
    base = nn.Linear(48, 80)
    lin = LoRALinear(base, r=6, alpha=12)
    x = torch.randn(3, 48)
    assert torch.equal(lin(x), base(x))
    assert lin.lora_A.shape == (6, 48) and lin.lora_B.shape == (80, 6) and lin.scaling == 2.0
    assert [n for n, p in lin.named_parameters() if p.requires_grad] == ['lora_A', 'lora_B']
    assert lin.lora_A.abs().max() <= 1 / math.sqrt(48) and lin.lora_A.std() > 0  # kaiming_uniform(a=sqrt(5))
    assert count_trainable(lin) == lora_params(48, 80, 6) == 6 * (48 + 80)

@pytest.mark.parametrize('d_in,d_out,r,alpha,bias', [(576, 576, 8, 16, False), (576, 192, 4, 32, True), (64, 1536, 32, 8, False)])
def test_layer_equals_peft(d_in, d_out, r, alpha, bias):
    ours, theirs = _pair(d_in, d_out, r, alpha, bias)
    x1 = torch.randn(2, 37, d_in, requires_grad=True); x2 = x1.detach().clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    assert (y1 - y2).abs().max() <= TOL
    g = torch.randn_like(y1); y1.backward(g); y2.backward(g)
    assert (ours.lora_A.grad - theirs.lora_A['default'].weight.grad).abs().max() <= TOL
    assert (ours.lora_B.grad - theirs.lora_B['default'].weight.grad).abs().max() <= TOL
    assert (x1.grad - x2.grad).abs().max() <= TOL
    assert ours.base.weight.grad is None and theirs.base_layer.weight.grad is None

def test_dropout_equals_peft_with_same_seed():
    ours, theirs = _pair(32, 24, 4, 8, dropout=0.5)
    ours.train(); theirs.train()
    x = torch.randn(16, 32)
    torch.manual_seed(5); y1 = ours(x)
    torch.manual_seed(5); y2 = theirs(x)
    assert (y1 - y2).abs().max() <= TOL
    torch.manual_seed(6); assert not torch.allclose(ours(x), y1)
    ours.eval(); theirs.eval()
    assert (ours(x) - theirs(x)).abs().max() <= TOL

@pytest.mark.parametrize('targets', [('q_proj', 'v_proj'), ('q_proj', 'k_proj', 'v_proj', 'o_proj'), 'all-linear', r'.*\.mlp\.(up|down)_proj'])
def test_same_layers_as_peft(targets):
    m1, _ = tiny_model(); m2, _ = tiny_model()
    apply_lora(m1, r=4, alpha=8, target_modules=targets)
    p2 = get_peft_model(m2, LoraConfig(r=4, lora_alpha=8, target_modules=targets if isinstance(targets, str) else list(targets)))
    peft_names = {n.removeprefix('base_model.model.') for n, m in p2.named_modules() if type(m).__name__ == 'Linear' and hasattr(m, 'lora_A')}
    assert set(lora_layers(m1)) == peft_names
    assert count_trainable(m1) == p2.get_nb_trainable_parameters()[0]

def test_model_outputs_and_grads_equal_peft():
    m1, tok = tiny_model(); m2, _ = tiny_model()
    apply_lora(m1, r=4, alpha=8, target_modules='all-linear')
    p2 = get_peft_model(m2, LoraConfig(r=4, lora_alpha=8, target_modules='all-linear'))
    for n, p in p2.named_parameters():
        if 'lora_B' in n: nn.init.normal_(p, std=0.02)
    copy_lora_from_peft(m1, p2)
    batch = tok(["<|im_start|>user\nWhat is 7*6?<|im_end|>", "a shorter one"], return_tensors='pt', padding=True)
    o1 = m1(**batch, labels=batch['input_ids']); o2 = p2(**batch, labels=batch['input_ids'])
    assert (o1.logits - o2.logits).abs().max() <= 1e-5
    o1.loss.backward(); o2.loss.backward()
    g2 = {n.removeprefix('base_model.model.').replace('.default.weight', ''): p.grad for n, p in p2.named_parameters() if p.requires_grad}
    g1 = {n: p.grad for n, p in m1.named_parameters() if p.requires_grad}
    assert g1.keys() == g2.keys() and len(g1) == 2 * 7 * 4
    assert max((g1[k] - g2[k]).abs().max().item() for k in g1) <= TOL

def test_training_step_changes_only_adapters():
    m, tok = tiny_model()
    frozen = {k: v.clone() for k, v in m.state_dict().items()}
    apply_lora(m, r=4, alpha=8)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    batch = tok(["hello world"], return_tensors='pt')
    m(**batch, labels=batch['input_ids']).loss.backward(); opt.step()
    merged_names = {k.replace('.base.', '.'): v for k, v in m.state_dict().items() if 'lora_' not in k}
    assert merged_names.keys() == frozen.keys() and all(torch.equal(merged_names[k], frozen[k]) for k in frozen)
    assert all(v.abs().max() > 0 for k, v in lora_state_dict(m).items() if k.endswith('lora_B'))

def test_merge_unmerge_roundtrip():
    torch.manual_seed(0)
    lin = LoRALinear(nn.Linear(256, 128), r=8, alpha=16)
    with torch.no_grad(): lin.lora_B.normal_(std=0.05)
    W0 = lin.base.weight.detach().clone(); D = lin.delta_weight().detach()
    x = torch.randn(10, 256)
    with torch.no_grad(): y = lin(x); lin.merge(); ym = lin(x)
    assert lin.merged and torch.allclose(ym, y, atol=1e-5, rtol=1e-5)
    assert torch.allclose(lin.base.weight, W0 + D, atol=0, rtol=0)  # merge is exactly fl(W0 + D)
    lin.merge(); assert torch.allclose(lin.base.weight, W0 + D, atol=0, rtol=0)  # merging twice is a no-op
    lin.unmerge()
    # fl(fl(w+d)-d) = w + e with |e| <= u(|w+d| + |w|) <= 2u(|w|+|d|), u = eps/2: float rounding, not an error in the code
    assert not lin.merged and ((lin.base.weight - W0).abs() <= torch.finfo(torch.float32).eps * (W0.abs() + D.abs())).all()
    with torch.no_grad(): assert torch.allclose(lin(x), y, atol=1e-5, rtol=1e-5)

def test_merge_lora_unload_equals_peft_merge_and_unload():
    m1, tok = tiny_model(); m2, _ = tiny_model()
    apply_lora(m1, r=4, alpha=8, target_modules=('q_proj', 'v_proj', 'down_proj'))
    p2 = get_peft_model(m2, LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj', 'down_proj']))
    for n, p in p2.named_parameters():
        if 'lora_B' in n: nn.init.normal_(p, std=0.02)
    copy_lora_from_peft(m1, p2)
    batch = tok(["hello there"], return_tensors='pt')
    with torch.no_grad(): before = m1(**batch).logits
    merge_lora(m1, unload=True); merged = p2.merge_and_unload()
    with torch.no_grad(): assert torch.allclose(m1(**batch).logits, before, atol=1e-5)
    assert not lora_layers(m1)
    s1, s2 = m1.state_dict(), merged.state_dict()
    assert s1.keys() == s2.keys() and max((s1[k] - s2[k]).abs().max().item() for k in s1) <= TOL

def test_adapters_save_load_roundtrip(tmp_path):
    m, tok = tiny_model(); apply_lora(m, r=2, alpha=4)
    with torch.no_grad():
        for l in lora_layers(m).values(): l.lora_B.normal_()   # as if trained
    sd = adapter_state_dict(m)
    assert len(sd) == 2 * 2 * 4 and all(k.endswith(('lora_A', 'lora_B')) for k in sd)
    assert lora_state_dict is adapter_state_dict   # one function under the older name
    f = save_adapters(m, tmp_path / 'a.safetensors')
    m2, _ = tiny_model(); apply_lora(m2, r=2, alpha=4)
    load_adapters(m2, f)
    assert all(torch.equal(adapter_state_dict(m2)[k], sd[k]) for k in sd)
    ids = tok(['hello there'], return_tensors='pt')['input_ids']
    with torch.no_grad(): assert torch.equal(m2(ids).logits, m(ids).logits)
    # a file that does not fit the model is refused with the reason, not loaded in part
    m3, _ = tiny_model(); apply_lora(m3, r=4, alpha=8)
    with pytest.raises(ValueError, match='shape mismatch'): load_adapters(m3, f)
    m4, _ = tiny_model(); apply_lora(m4, r=2, alpha=4, target_modules=('q_proj',))
    with pytest.raises(ValueError, match='unexpected'): load_adapters(m4, f)
    with pytest.raises(ValueError, match='no adapters'): save_adapters(tiny_model()[0], tmp_path / 'b.safetensors')

def test_bf16_base_keeps_fp32_adapters_like_peft():
    "peft 0.21 upcasts the adapters over a bf16 base (autocast_adapter_dtype=True): dtypes, logits, gradients equal."
    m, tok = tiny_model(); m = m.to(torch.bfloat16)
    p2 = get_peft_model(copy.deepcopy(m), LoraConfig(r=4, lora_alpha=8, target_modules='all-linear'))
    for n, p in p2.named_parameters():
        if 'lora_B' in n: nn.init.normal_(p, std=0.05)
    m1 = copy_lora_from_peft(apply_lora(copy.deepcopy(m), r=4, alpha=8, target_modules='all-linear'), p2)
    assert {p.dtype for p in p2.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in m1.parameters() if p.requires_grad} == {torch.float32}
    assert all(l.base.weight.dtype == torch.bfloat16 for l in lora_layers(m1).values())
    assert apply_lora(copy.deepcopy(m), autocast_adapter_dtype=False).model.layers[0].self_attn.q_proj.lora_A.dtype == torch.bfloat16
    b = tok(["hello there friend", "what is 2+3?"], return_tensors='pt', padding=True)
    o, t = m1(**b, labels=b['input_ids']), p2(**b, labels=b['input_ids'])
    assert o.logits.dtype == t.logits.dtype == torch.bfloat16
    # the same operations in the same dtypes: bit-exact here; the bound is one bf16 rounding (2^-8) of the largest logit
    assert (o.logits.float() - t.logits.float()).abs().max() <= 2 ** -8 * t.logits.float().abs().max()
    o.loss.backward(); t.loss.backward()
    gt = {n.removeprefix('base_model.model.').replace('.default.weight', ''): p.grad for n, p in p2.named_parameters() if p.requires_grad}
    for n, p in m1.named_parameters():
        if p.requires_grad:
            assert p.grad.dtype == torch.float32
            assert (p.grad - gt[n]).abs().max() <= 1e-3 * gt[n].abs().max(), n   # fp32 gradients through a bf16 model

def test_bf16_merge_equals_peft():
    "Merging into a bf16 weight rounds W + (alpha/r)BA once, computed in fp32, as peft's merge does."
    torch.manual_seed(0)
    base = nn.Linear(64, 48).to(torch.bfloat16)
    ours = LoRALinear(copy.deepcopy(base), 4, 8)
    theirs = get_peft_model(nn.Sequential(copy.deepcopy(base)), LoraConfig(r=4, lora_alpha=8, target_modules=['0'])).base_model.model[0]
    with torch.no_grad():
        ours.lora_B.normal_()
        theirs.lora_A['default'].weight.copy_(ours.lora_A); theirs.lora_B['default'].weight.copy_(ours.lora_B)
    assert ours.lora_A.dtype == theirs.lora_A['default'].weight.dtype == torch.float32
    ours.merge(); theirs.merge()
    assert ours.base.weight.dtype == torch.bfloat16 and torch.equal(ours.base.weight, theirs.base_layer.weight)

def test_merge_lora_on_a_layer_and_an_nf4_base():
    "merge_lora asks each layer: a bare layer gives its merged nn.Linear; a 4-bit base is dequantized, never merged in place."
    from ftcourse.quant import quantize_lora_bases, dequantize_nf4
    torch.manual_seed(0)
    lin = LoRALinear(nn.Linear(64, 32), 4, 8)
    with torch.no_grad(): lin.lora_B.normal_()
    x = torch.randn(3, 64)
    plain = merge_lora(lin, unload=True)
    assert type(plain) is nn.Linear and torch.allclose(plain(x), lin(x), atol=1e-5)
    m, tok = tiny_model(); apply_lora(m, r=4, alpha=8)
    for l in lora_layers(m).values(): nn.init.normal_(l.lora_B, std=0.05)
    quantize_lora_bases(m)
    ids = tok(['hello there'], return_tensors='pt')['input_ids']
    q = m.model.layers[0].self_attn.q_proj
    expected = dequantize_nf4(q.base.packed, q.base.state, torch.float32) + q.delta_weight()
    with torch.no_grad(): before = m(ids).logits
    with pytest.raises(TypeError, match='unload=True'): merge_lora(m)
    merge_lora(m, unload=True)
    assert not lora_layers(m) and torch.equal(m.model.layers[0].self_attn.q_proj.weight, expected)
    with torch.no_grad(): assert (m(ids).logits - before).abs().max() <= 1e-4

def _trained_pair(targets='all-linear'):
    "The tiny model adapted by us and by peft with the same random, non-zero factors (as after training)."
    m1, tok = tiny_model(); m2, _ = tiny_model()
    apply_lora(m1, r=4, alpha=8, target_modules=targets)
    p2 = get_peft_model(m2, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    for n, p in p2.named_parameters():
        if 'lora_B' in n: nn.init.normal_(p, std=0.05)
    return copy_lora_from_peft(m1, p2), p2, tok

def test_adapters_disabled_equals_peft_disable_adapter():
    m1, p2, tok = _trained_pair()
    base, _ = tiny_model()
    b = tok(["hello there", "what is 2+3?"], return_tensors='pt', padding=True)
    with torch.no_grad():
        on = m1(**b).logits
        with adapters_disabled(m1) as m: off = m(**b).logits
        with p2.disable_adapter(): off_peft = p2(**b).logits
        ref = base(**b).logits
        assert (on - ref).abs().max() > 1e-3  # the adapters change the output, so "off" is tested
        assert (off - off_peft).abs().max() <= 1e-5 and (off - ref).abs().max() <= 1e-5
        assert torch.equal(m1(**b).logits, on)  # back on after the block
        with pytest.raises(RuntimeError):
            with adapters_disabled(m1): raise RuntimeError
        assert all(l.adapters_enabled for l in lora_layers(m1).values())  # restored after an exception
        assert torch.equal(m1(**b).logits, on)

def test_adapters_disabled_refuses_no_adapters_and_merged():
    with pytest.raises(ValueError, match='no adapters'):
        with adapters_disabled(tiny_model()[0]): pass
    m1, _, _ = _trained_pair(('q_proj',))
    merge_lora(m1)
    with pytest.raises(ValueError, match='unmerge'):
        with adapters_disabled(m1): pass
    assert all(l.adapters_enabled for l in lora_layers(m1).values())

def test_gpt2_c_attn_example():
    g = meta_model(GPT2Config())
    assert lora_params(768, 2304, 16) == 49_152
    assert lora_param_count(g, 16, ('c_attn',)) == 12 * 49_152
    assert target_names(g, ('c_attn',)) == [f'transformer.h.{i}.attn.c_attn' for i in range(12)]

def test_known_config_totals():
    "The embedded configs reproduce the published model sizes (6.74B, 7.24B, 8.03B)."
    assert model_param_count(LLAMA2_7B) == 6_738_415_616
    assert model_param_count(MISTRAL_7B) == 7_241_732_096
    assert model_param_count(LLAMA3_8B) == 8_030_261_248

CASES = [('Llama-2-7B', LLAMA2_7B), ('Mistral-7B-v0.1', MISTRAL_7B), ('Llama-3-8B', LLAMA3_8B), ('SmolLM2-135M', SMOLLM2_135M)]

KNOWN = [(n, c, t) for n, c in CASES for t in ('all-linear',)] + [('Mistral-7B-v0.1', MISTRAL_7B, 'q,v'), ('SmolLM2-135M', SMOLLM2_135M, 'attention')]

@pytest.mark.parametrize('name,cfg,tname', KNOWN, ids=[f"{n}-{t}" for n, _, t in KNOWN])
def test_count_equals_peft_known_configs(name, cfg, tname):
    "Full-size configs on the meta device. 'all-linear' covers every projection type; the notebook checks all three target sets."
    m = meta_model(cfg)
    r = 16  # the count is linear in r (tested on the tiny model below), so one rank per config is enough here
    ours = lora_param_count(m, r, TARGETS[tname])  # first: peft then modifies `m` in place
    assert ours == peft_trainable_count(m, r, TARGETS[tname]) > 0

@pytest.mark.parametrize('targets', [('c_attn',), ('c_attn', 'c_fc'), 'all-linear'])
def test_count_equals_peft_gpt2(targets):
    assert lora_param_count(GPT2Config(), 16, targets) == peft_trainable_count(GPT2Config(), 16, targets)

def test_count_equals_peft_tiny_and_default():
    tiny_cfg = tiny_model()[0].config
    for r in (1, 8, 64):
        for t in TARGETS.values():
            assert lora_param_count(tiny_cfg, r, t) == peft_trainable_count(tiny_cfg, r, t) == r * lora_param_count(tiny_cfg, 1, t)
    # the real default model's config (weights loaded from the course cache): same numbers as the embedded copy
    cfg = load_model()[0].config
    for t in TARGETS.values():
        assert lora_param_count(cfg, 8, t) == peft_trainable_count(cfg, 8, t) == lora_param_count(SMOLLM2_135M, 8, t)

def test_count_equals_instance_count():
    "Counting on the meta device gives the same number as adapting a real model and counting its trainable parameters."
    m, _ = tiny_model()
    n = lora_param_count(m.config, 8, 'all-linear')
    assert count_trainable(apply_lora(m, r=8, alpha=16, target_modules='all-linear')) == n

def test_bad_input():
    with pytest.raises(ValueError): LoRALinear(nn.Linear(4, 4), r=0, alpha=1)
    with pytest.raises(ValueError, match='matches no linear layer'): apply_lora(tiny_model()[0], target_modules=('nope',))
    from transformers import GPT2LMHeadModel
    with pytest.raises(TypeError, match='nn.Linear only'):
        apply_lora(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)), target_modules=('c_attn',))
