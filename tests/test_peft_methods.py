"Chapter 3a: DoRA, prompt tuning, P-tuning and prefix tuning against peft on the tiny model (counts, logits, loss, gradients, generation)."
import copy, warnings
import pytest, torch
from torch import nn

peft = pytest.importorskip('peft')
from peft import LoraConfig, get_peft_model, PromptTuningConfig, PromptEncoderConfig, PrefixTuningConfig
from peft.tuners.lora import Linear as PeftLoraLinear
from ftcourse.core import tiny_model
from ftcourse.lora import (count_trainable, lora_layers, merge_lora, LoRALinear, adapters_disabled, adapter_state_dict,
                           save_adapters, load_adapters)
from ftcourse.sft import sft_loss, collate_sft, IGNORE_INDEX
from ftcourse.peft_methods import (DoRALinear, apply_dora, apply_prompt_tuning, apply_p_tuning, apply_prefix_tuning,
                                   copy_from_peft, copy_dora_from_peft, peft_name, virtual_labels, virtual_sft_loss_fn,
                                   PrefixTuning, kv_dims)

N = 5

def _configs():
    return dict(dora=LoraConfig(r=4, lora_alpha=8, target_modules='all-linear', use_dora=True),
                prompt=PromptTuningConfig(task_type='CAUSAL_LM', num_virtual_tokens=N, prompt_tuning_init='SAMPLE_VOCAB'),
                ptuning=PromptEncoderConfig(task_type='CAUSAL_LM', num_virtual_tokens=N),
                prefix=PrefixTuningConfig(task_type='CAUSAL_LM', num_virtual_tokens=N, prefix_projection=False),
                prefix_mlp=PrefixTuningConfig(task_type='CAUSAL_LM', num_virtual_tokens=N, prefix_projection=True))

def _ours(method, m, tok):
    return dict(dora=lambda: apply_dora(m, 4, 8, 'all-linear'), prompt=lambda: apply_prompt_tuning(m, N),
                ptuning=lambda: apply_p_tuning(m, N), prefix=lambda: apply_prefix_tuning(m, N, projection=False),
                prefix_mlp=lambda: apply_prefix_tuning(m, N))[method]()

def _pair(method, seed=0):
    m, tok = tiny_model(seed=seed)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore'); theirs = get_peft_model(copy.deepcopy(m), _configs()[method])
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad and ('lora_B' in n or 'prefix' in method): p.normal_(std=0.1)
            if 'magnitude' in n: p.mul_(1.1)
    return theirs, copy_from_peft(_ours(method, m, tok), theirs), tok

def _batch(tok):
    msgs = [[dict(role='user', content='What is 2+3?'), dict(role='assistant', content='5')],
            [dict(role='user', content='Spell cat backwards, please.'), dict(role='assistant', content='tac')]]
    from ftcourse.sft import build_sft_example
    return collate_sft(tok)([build_sft_example(tok, ms, 128) for ms in msgs])

@pytest.mark.parametrize('method', ['dora', 'prompt', 'ptuning', 'prefix', 'prefix_mlp'])
def test_same_as_peft(method):
    theirs, ours, tok = _pair(method)
    assert count_trainable(ours) == theirs.get_nb_trainable_parameters()[0]
    b = _batch(tok)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore'); t = theirs(**b)
    o = ours(input_ids=b['input_ids'], attention_mask=b['attention_mask']).logits
    assert o.shape == t.logits.shape
    assert (o - t.logits).abs().max() <= 1e-5   # bit-exact on the machines we ran on; 1e-5 allows another BLAS
    lo = sft_loss(o, virtual_labels(o, b['labels']))
    assert abs(lo.item() - t.loss.item()) <= 1e-5
    with torch.no_grad(): assert abs(ours(**b).loss.item() - t.loss.item()) <= 1e-6   # labels= works like peft's
    lo.backward(); t.loss.backward()
    gt = {peft_name(n, ours): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for n, p in ours.named_parameters():
        if p.requires_grad: assert torch.allclose(p.grad, gt[n], rtol=1e-4, atol=1e-6), n

@pytest.mark.parametrize('method', ['dora', 'prompt', 'ptuning', 'prefix', 'prefix_mlp'])
def test_adapters_disabled_is_the_base_model_like_peft(method):
    "Adapters off gives the base model, as peft's disable_adapter() does; for DoRA with trained magnitudes too."
    theirs, ours, tok = _pair(method)
    base, _ = tiny_model()
    b = _batch(tok)
    ids, mask = b['input_ids'], b['attention_mask']
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        on = ours(input_ids=ids, attention_mask=mask).logits
        with adapters_disabled(ours): off = ours(input_ids=ids, attention_mask=mask).logits
        with theirs.disable_adapter(): off_peft = theirs(input_ids=ids, attention_mask=mask).logits
        ref = base(input_ids=ids, attention_mask=mask).logits
        assert (on[:, -ids.shape[1]:] - ref).abs().max() > 1e-3   # the adapters matter
        assert off.shape == off_peft.shape == ref.shape
        assert (off - off_peft).abs().max() <= 1e-5 and (off - ref).abs().max() <= 1e-5
        assert torch.equal(ours(input_ids=ids, attention_mask=mask).logits, on)   # back on after the block
    if method != 'dora':  # generation with the wrapper switched off is the base model's
        kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
        x = ids[:1, :5]
        with adapters_disabled(ours): out = ours.generate(x, **kw)
        assert torch.equal(out, base.generate(x, attention_mask=torch.ones_like(x), **kw))

def test_dora_off_is_not_scaling_zero():
    "With trained magnitudes, setting the LoRA scaling to 0 leaves (m/‖W‖)·W x: not the base layer. Switching off must."
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    dora = DoRALinear(copy.deepcopy(base), 2, 4)
    with torch.no_grad(): dora.lora_magnitude.mul_(1.3)
    x = torch.randn(3, 16)
    with torch.no_grad():
        dora.scaling = 0.0
        assert (dora(x) - base(x)).abs().max() > 1e-2
        dora.scaling = 2.0
        with adapters_disabled(dora): assert torch.equal(dora(x), base(x))

def test_dora_merge_and_unload_equals_unmerged_and_peft():
    "merge_lora(unload=True) on DoRA: W' = m (W + sBA)/||W + sBA|| per row; logits equal the unmerged model and peft's merge_and_unload()."
    theirs, ours, tok = _pair('dora')
    b = _batch(tok)
    ids, mask = b['input_ids'], b['attention_mask']
    with torch.no_grad():
        before = ours(input_ids=ids, attention_mask=mask).logits
        layer = lora_layers(ours)['model.layers.0.self_attn.q_proj']
        W, delta, m = layer.base.weight.clone(), layer.delta_weight(), layer.lora_magnitude
        expected_q = m.view(-1, 1) * (W + delta) / torch.linalg.norm(W + delta, dim=1, keepdim=True)
        merge_lora(ours, unload=True)
        merged_peft = theirs.merge_and_unload()
        after = ours(input_ids=ids, attention_mask=mask).logits
        after_peft = merged_peft(input_ids=ids, attention_mask=mask).logits
    assert not lora_layers(ours) and type(ours.model.layers[0].self_attn.q_proj) is nn.Linear
    assert (ours.model.layers[0].self_attn.q_proj.weight - expected_q).abs().max() <= 1e-6
    s1, s2 = ours.state_dict(), merged_peft.state_dict()
    assert s1.keys() == s2.keys() and max((s1[k] - s2[k]).abs().max().item() for k in s1) <= 1e-6
    assert (after - before).abs().max() <= 1e-4 and (after - after_peft).abs().max() <= 1e-5

def test_dora_save_load_keeps_magnitudes(tmp_path):
    _, ours, tok = _pair('dora')   # magnitudes scaled by 1.1: not the initial norms
    sd = adapter_state_dict(ours)
    mags = {k for k in sd if k.endswith('lora_magnitude')}
    assert len(mags) == len(lora_layers(ours)) == 7 * 4
    f = save_adapters(ours, tmp_path / 'dora.safetensors')
    fresh, _ = tiny_model(); apply_dora(fresh, 4, 8, 'all-linear')
    assert not all(torch.equal(adapter_state_dict(fresh)[k], sd[k]) for k in mags)
    load_adapters(fresh, f)
    assert all(torch.equal(adapter_state_dict(fresh)[k], sd[k]) for k in sd)
    b = _batch(tok)
    with torch.no_grad(): assert torch.equal(fresh(**b).logits, ours(**b).logits)

@pytest.mark.parametrize('method', ['prompt', 'ptuning', 'prefix_mlp'])
def test_virtual_tokens_save_load_and_no_merge(method, tmp_path):
    _, ours, tok = _pair(method)
    with torch.no_grad():
        for t in adapter_state_dict(ours).values(): t.add_(0.1)   # as if trained
    f = save_adapters(ours, tmp_path / 'a.safetensors')
    fresh = load_adapters(_ours(method, tiny_model()[0], tok), f)
    assert adapter_state_dict(fresh).keys() == adapter_state_dict(ours).keys()
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == set(adapter_state_dict(ours))
    b = _batch(tok)
    with torch.no_grad(): assert torch.equal(fresh(input_ids=b['input_ids']).logits, ours(input_ids=b['input_ids']).logits)
    with pytest.raises(TypeError, match='no weight to merge'): merge_lora(ours)

def test_dora_bf16_base_keeps_fp32_adapters_like_peft():
    "Over a bf16 model peft keeps A, B and the magnitudes in fp32; so do we: dtypes, logits and gradients equal."
    m, tok = tiny_model(); m = m.to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore'); theirs = get_peft_model(copy.deepcopy(m), _configs()['dora'])
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if 'lora_B' in n: p.normal_(std=0.1)
            if 'magnitude' in n: p.mul_(1.1)
    ours = copy_from_peft(apply_dora(copy.deepcopy(m), 4, 8, 'all-linear'), theirs)
    assert {p.dtype for p in theirs.parameters() if p.requires_grad} == {torch.float32}
    assert {n.rsplit('.', 1)[-1]: p.dtype for n, p in ours.named_parameters() if p.requires_grad} == \
        dict(lora_A=torch.float32, lora_B=torch.float32, lora_magnitude=torch.float32)
    b = _batch(tok)
    o, t = ours(**b), theirs(**b)
    assert o.logits.dtype == t.logits.dtype == torch.bfloat16
    # the same operations in the same dtypes: bit-exact here; the bound is one bf16 rounding (2^-8) of the largest logit
    assert (o.logits.float() - t.logits.float()).abs().max() <= 2 ** -8 * t.logits.float().abs().max()
    o.loss.backward(); t.loss.backward()
    gt = {peft_name(n, ours): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for n, p in ours.named_parameters():
        if p.requires_grad: assert (p.grad - gt[n]).abs().max() <= 1e-3 * gt[n].abs().max(), n

@pytest.mark.parametrize('dropout', [0.0, 0.2])
def test_dora_layer_bit_exact_with_bias_and_dropout(dropout):
    torch.manual_seed(0)
    base = nn.Linear(48, 24)
    ours = DoRALinear(copy.deepcopy(base), 4, 8, dropout).train()
    theirs = PeftLoraLinear(copy.deepcopy(base).requires_grad_(False), 'default', config=LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, use_dora=True),
                            r=4, lora_alpha=8, lora_dropout=dropout, use_dora=True).train()
    with torch.no_grad():
        ours.lora_B.normal_(); ours.lora_magnitude.mul_(1.2)
        theirs.lora_A['default'].weight.copy_(ours.lora_A); theirs.lora_B['default'].weight.copy_(ours.lora_B)
        theirs.lora_magnitude_vector['default'].weight.copy_(ours.lora_magnitude)
    x = torch.randn(3, 7, 48)
    torch.manual_seed(1); y1 = ours(x)
    torch.manual_seed(1); y2 = theirs(x)
    assert (y1 - y2).abs().max() <= 1e-6
    g = torch.randn_like(y1); y1.backward(g); y2.backward(g)
    for a, b in ((ours.lora_A, theirs.lora_A['default'].weight), (ours.lora_B, theirs.lora_B['default'].weight),
                 (ours.lora_magnitude, theirs.lora_magnitude_vector['default'].weight)):
        assert (a.grad - b.grad).abs().max() <= 1e-6

def test_dora_starts_at_base_merges_like_peft_and_detaches_norm():
    m, tok = tiny_model(); ref = copy.deepcopy(m)
    apply_dora(m, 4, 8, ('q_proj', 'v_proj'))
    assert all(isinstance(l, DoRALinear) and isinstance(l, LoRALinear) for l in lora_layers(m).values())
    ids = tok('hello world', return_tensors='pt')['input_ids']
    with torch.no_grad(): assert torch.allclose(m(ids).logits, ref(ids).logits, atol=1e-5)
    theirs, ours, _ = _pair('dora')
    with torch.no_grad():
        before = ours(ids).logits
        merge_lora(ours); theirs.merge_adapter()
    for n, l in lora_layers(ours).items():
        assert (l.base.weight - theirs.get_submodule('base_model.model.' + n).base_layer.weight).abs().max() <= 1e-6
    with torch.no_grad(): assert torch.allclose(ours(ids).logits, before, atol=1e-4)
    # the norm is a constant: the magnitude's gradient is (W'x/m)·grad, nothing flows through the norm into B
    layer = DoRALinear(nn.Linear(8, 4), 2, 4)
    assert not layer.weight_norm().requires_grad

def test_copy_dora_from_peft_matches_copy_from_peft():
    theirs, ours, _ = _pair('dora')
    m2, _ = tiny_model(); apply_dora(m2, 4, 8, 'all-linear'); copy_dora_from_peft(m2, theirs)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), m2.state_dict().values()))

@pytest.mark.parametrize('method', ['prompt', 'ptuning', 'prefix'])
def test_generate_equals_greedy_forward_and_left_padding(method):
    _, ours, tok = _pair(method)
    msgs = [[dict(role='user', content='What is 2+3?')], [dict(role='user', content='Spell cat backwards, please.')]]
    def ids(ms):
        return torch.tensor([tok.apply_chat_template(ms, add_generation_prompt=True, tokenize=True, return_dict=True)['input_ids']])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    alone = []
    for ms in msgs:
        x = ids(ms)
        out = ours.generate(x, **kw)
        ref = x
        with torch.no_grad():
            for _ in range(6):
                ref = torch.cat([ref, ours(input_ids=ref, attention_mask=torch.ones_like(ref)).logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(out, ref)
        alone.append(out[0, x.shape[1]:])
    # a left-padded batch gives each sequence's tokens alone
    xs = [ids(ms)[0] for ms in msgs]; T = max(len(x) for x in xs)
    x = torch.stack([torch.cat([torch.full((T - len(s),), tok.pad_token_id), s]) for s in xs])
    mask = torch.stack([torch.cat([torch.zeros(T - len(s), dtype=torch.long), torch.ones(len(s), dtype=torch.long)]) for s in xs])
    out = ours.generate(x, attention_mask=mask, **kw)
    for i in range(2): assert torch.equal(out[i, T:], alone[i])

def test_loss_fn_masks_virtual_positions_and_trains_only_the_prompt():
    m, tok = tiny_model()
    ref = copy.deepcopy(m)
    pt = apply_prompt_tuning(m, N)
    b = _batch(tok)
    loss, met = virtual_sft_loss_fn(pt, b)
    assert met['n_items'] == int((b['labels'][:, 1:] != IGNORE_INDEX).sum())
    lab = virtual_labels(torch.zeros(2, b['labels'].shape[1] + N, 3), b['labels'])
    assert (lab[:, :N] == IGNORE_INDEX).all() and torch.equal(lab[:, N:], b['labels'])
    loss.backward()
    assert pt.prompt.grad is not None and all(p.grad is None for p in pt.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(pt.model.state_dict().values(), ref.state_dict().values()))
    with pytest.raises(ValueError): virtual_labels(torch.zeros(1, 2, 3), torch.zeros(1, 4, dtype=torch.long))

def test_prompt_init_and_bad_input():
    m, tok = tiny_model()
    E = m.get_input_embeddings().weight
    pt = apply_prompt_tuning(copy.deepcopy(m), 7, 'text', tok, 'abc')
    ids = tok('abc')['input_ids']
    assert torch.equal(pt.prompt, E[torch.tensor((ids * 3)[:7])].detach())
    with pytest.raises(ValueError): apply_prompt_tuning(copy.deepcopy(m), 4, 'nonsense')
    with pytest.raises(ValueError): apply_prompt_tuning(copy.deepcopy(m), 4, 'text')
    with pytest.raises(ValueError): apply_p_tuning(copy.deepcopy(m), 0)

def test_prefix_bake_keeps_outputs_and_shapes():
    m, tok = tiny_model()
    px = apply_prefix_tuning(m, N)
    L, h, d = kv_dims(m.config)
    with torch.no_grad():
        for p in px.mlp[-1].parameters(): p.normal_(std=0.1)
    ids = tok('hello', return_tensors='pt')['input_ids']
    assert px.prefix(3).shape == (2 * L, 3, h, N, d)
    with torch.no_grad():
        before = px(ids).logits; px.bake(); after = px(ids).logits
    assert count_trainable(px) == L * 2 * N * h * d and torch.allclose(before, after, atol=1e-5)

@pytest.mark.parametrize('method', ['dora', 'prompt', 'ptuning', 'prefix_mlp'])
def test_trains_with_the_course_loop_and_judges(method):
    from ftcourse.train import TrainConfig, train
    from ftcourse.sft import build_sft_example
    from ftcourse.evaluate import judge_eval
    m, tok = tiny_model()
    model = _ours(method, m, tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    msgs = [[dict(role='user', content=f'What is {i}+1?'), dict(role='assistant', content=str(i + 1))] for i in range(4)]
    ex = [build_sft_example(tok, ms, 64) for ms in msgs]
    h = train(model, virtual_sft_loss_fn, ex, TrainConfig(steps=2, batch_size=2, lr=1e-2, warmup_steps=0, eval_every=0, progress=False), collate_fn=collate_sft(tok))
    assert len(h.series('loss')[1]) == 2
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable   # the frozen model is untouched (LoRA's A may still be at rest: B starts at 0)
    rows = [dict(messages=ms, task='add', answer=ms[1]['content']) for ms in msgs[:2]]
    out = judge_eval(model, tok, rows, max_new_tokens=3, cache=False)
    assert len(out.responses) == 2 and 0 <= out.score <= 1
