"Chapter 11: export to peft, to a merged transformers model and to GGUF, each loaded back by its reader (tiny model)."
import json, warnings
import numpy as np
import pytest, torch

peft = pytest.importorskip('peft')
gguf = pytest.importorskip('gguf')
from peft import PeftModel, LoraConfig, PrefixTuningConfig, get_peft_model, get_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer
from ftcourse.core import tiny_model, set_seed
from ftcourse.lora import apply_lora, lora_layers
from ftcourse.peft_methods import (apply_dora, apply_prompt_tuning, apply_p_tuning, apply_prefix_tuning, DoRALinear,
                                   PrefixTuning)
from ftcourse.export import (ExportError, GGUF_TYPES, save_peft, peft_adapter, load_peft_adapter, is_peft_adapter,
                             save_merged, merged_model, save_gguf, llama_permute, llama_unpermute, export_run)

X = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
MAKERS = dict(lora=lambda m: apply_lora(m, 4, 8, 'all-linear'), dora=lambda m: apply_dora(m, 4, 8, ('q_proj', 'v_proj')),
              prompt=lambda m: apply_prompt_tuning(m, 5), ptuning=lambda m: apply_p_tuning(m, 5),
              prefix=lambda m: apply_prefix_tuning(m, 5), prefix_table=lambda m: apply_prefix_tuning(m, 5, projection=False))

def perturbed(m, seed=1):
    "Every trainable tensor moved by noise, so that no adapter is the identity."
    set_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad: p.add_(torch.randn_like(p) * 0.05)
    return m

def logits(m):
    with torch.no_grad(): return m(input_ids=X, attention_mask=torch.ones_like(X)).logits

@pytest.mark.parametrize('kind', list(MAKERS))
def test_peft_export_loads_in_peft(kind, tmp_path):
    ours = perturbed(MAKERS[kind](tiny_model()[0]))
    folder = save_peft(ours, tmp_path/'a')
    assert is_peft_adapter(folder) and not is_peft_adapter(tmp_path)
    theirs = PeftModel.from_pretrained(tiny_model()[0], folder).eval()
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=0, atol=1e-6)
    back = load_peft_adapter(tiny_model()[0], folder)      # and our own reader gives the same model back
    torch.testing.assert_close(logits(back), logits(ours), rtol=0, atol=1e-6)

def test_peft_key_names_are_peft_own():
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ref = get_peft_model(tiny_model()[0], LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj'], use_dora=True))
    cfg, tensors = peft_adapter(apply_dora(tiny_model()[0], 4, 8, ('q_proj', 'v_proj')))
    assert set(tensors) == set(get_peft_model_state_dict(ref))
    assert sorted(cfg['target_modules']) == ['q_proj', 'v_proj'] and cfg['use_dora'] and cfg['r'] == 4

def test_peft_targets_full_names_when_suffix_overselects(tmp_path):
    m = tiny_model()[0]
    apply_lora(m, 2, 4, ['model.layers.0.self_attn.q_proj'])          # one q_proj of four
    cfg, _ = peft_adapter(perturbed(m))
    assert list(cfg['target_modules']) == ['model.layers.0.self_attn.q_proj']
    theirs = PeftModel.from_pretrained(tiny_model()[0], save_peft(m, tmp_path/'a')).eval()
    torch.testing.assert_close(logits(m), logits(theirs), rtol=0, atol=1e-6)

@pytest.mark.parametrize('name', ['lora', 'rslora', 'dora', 'prefix'])
def test_load_adapter_made_by_peft(name, tmp_path):
    cfg = dict(lora=LoraConfig(r=4, lora_alpha=8, target_modules='all-linear', init_lora_weights=False),
               rslora=LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj', 'k_proj'], use_rslora=True, init_lora_weights=False),
               dora=LoraConfig(r=4, lora_alpha=8, target_modules=['v_proj', 'down_proj'], use_dora=True, init_lora_weights=False),
               prefix=PrefixTuningConfig(task_type='CAUSAL_LM', num_virtual_tokens=4, prefix_projection=True))[name]
    set_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        theirs = get_peft_model(tiny_model()[0], cfg)
    if name == 'prefix': perturbed(theirs)
    theirs.save_pretrained(tmp_path/'a')
    ours = load_peft_adapter(tiny_model()[0], tmp_path/'a')
    assert isinstance(ours, PrefixTuning) if name == 'prefix' else lora_layers(ours)
    if name == 'dora': assert all(isinstance(l, DoRALinear) for l in lora_layers(ours).values())
    torch.testing.assert_close(logits(ours), logits(theirs.eval()), rtol=0, atol=1e-5)

def test_load_adapter_refuses_what_it_cannot_express(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        theirs = get_peft_model(tiny_model()[0], LoraConfig(r=4, target_modules=['q_proj'], bias='lora_only'))
    theirs.save_pretrained(tmp_path/'bias')
    with pytest.raises(ExportError, match='bias'): load_peft_adapter(tiny_model()[0], tmp_path/'bias')
    with pytest.raises(ExportError, match='not a peft adapter'): load_peft_adapter(tiny_model()[0], tmp_path)
    (tmp_path/'bias'/'adapter_model.safetensors').rename(tmp_path/'bias'/'adapter_model.bin')
    with pytest.raises(ExportError, match='pickled'): load_peft_adapter(tiny_model()[0], tmp_path/'bias')

def test_peft_export_errors(tmp_path):
    with pytest.raises(ExportError, match='full fine-tune'): save_peft(tiny_model()[0], tmp_path/'a')
    m = tiny_model()[0]
    apply_lora(m, 2, 4, ['q_proj'])
    apply_lora(m, 4, 4, ['v_proj'])
    with pytest.raises(ExportError, match='differ'): save_peft(m, tmp_path/'a')
    (tmp_path/'b').mkdir()
    with pytest.raises(ExportError, match='already exists'): save_peft(apply_lora(tiny_model()[0]), tmp_path/'b')
    save_peft(apply_lora(tiny_model()[0]), tmp_path/'b', overwrite=True)
    assert is_peft_adapter(tmp_path/'b')

def test_merged_export(tmp_path):
    model, tok = tiny_model()
    perturbed(apply_dora(model, 4, 8, 'all-linear'))
    folder = save_merged(model, tok, tmp_path/'m')
    assert {'model.safetensors', 'config.json', 'generation_config.json', 'tokenizer.json'} <= {p.name for p in folder.iterdir()}
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=1e-5)
    assert AutoTokenizer.from_pretrained(folder).chat_template == tok.chat_template
    g1 = model.generate(X[:1], max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    g2 = loaded.generate(X[:1], max_new_tokens=10, do_sample=False)
    assert torch.equal(g1, g2)
    assert lora_layers(model)      # the model it came from keeps its adapters
    with pytest.raises(ExportError, match='virtual tokens'): merged_model(apply_prompt_tuning(tiny_model()[0], 3))

def test_permutation_is_what_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    w = np.random.default_rng(0).standard_normal((2 * 32, 16)).astype(np.float32)
    undo = LlamaTensorProcessor(config=dict(num_attention_heads=4, num_key_value_heads=2))._reverse_permute_weights
    assert np.array_equal(undo(llama_permute(w, 2), 4, 2), w)
    assert np.array_equal(llama_unpermute(llama_permute(w, 2), 2), w)
    assert not np.array_equal(llama_permute(w, 2), w)

@pytest.mark.parametrize('tie', [True, False])
def test_gguf_round_trip(tie, tmp_path):
    model, tok = tiny_model(tie_word_embeddings=tie)
    perturbed(apply_lora(model, 4, 8, 'all-linear'))
    ref = logits(merged_model(model))
    text = "Hi <|im_start|>user\nwhat's 2+2?<|im_end|>"
    sizes = {}
    for t in GGUF_TYPES:
        f = save_gguf(model, tok, tmp_path/f'{t}.gguf', t)
        sizes[t] = f.stat().st_size
        g = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f.name, dtype=torch.float32).eval()
        assert g.config.tie_word_embeddings == tie
        err = (logits(g) - ref).abs().max().item()
        assert err <= dict(f32=0.0, f16=1e-2, q8_0=0.1)[t], (t, err)
        gtok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=f.name)
        assert gtok(text)['input_ids'] == tok(text)['input_ids'] and gtok.chat_template == tok.chat_template
        assert (gtok.eos_token, gtok.bos_token, gtok.pad_token) == (tok.eos_token, tok.bos_token, tok.pad_token)
    assert sizes['q8_0'] < sizes['f16'] < sizes['f32']
    r = gguf.GGUFReader(str(tmp_path/'q8_0.gguf'))
    kinds = {t.name: t.tensor_type.name for t in r.tensors}
    assert kinds['blk.0.attn_q.weight'] == 'Q8_0' and kinds['blk.0.attn_norm.weight'] == 'F32'

def test_gguf_errors(tmp_path):
    model, tok = tiny_model()
    with pytest.raises(ExportError, match='gguf_type'): save_gguf(model, tok, tmp_path/'a.gguf', 'q4_k')
    with pytest.raises(ExportError, match='virtual tokens'): save_gguf(apply_prefix_tuning(model, 2), tok, tmp_path/'a.gguf')
    (tmp_path/'b.gguf').write_text('x')
    with pytest.raises(ExportError, match='already exists'): save_gguf(tiny_model()[0], tok, tmp_path/'b.gguf')
    assert (tmp_path/'b.gguf').read_text() == 'x'      # a refused export leaves the file alone

def _run_folder(tmp_path, adapter='lora', base_run=None, method='sft'):
    from ftcourse.runs import RunConfig, config_yaml, build_model, save_trainable
    cfg = RunConfig(method=method, model='tiny', adapter=adapter, lora_target_modules='q_proj,v_proj', base_run=base_run)
    d = tmp_path/f'{method}-{adapter}'
    d.mkdir()
    (d/'config.yaml').write_text(config_yaml(cfg))
    model = perturbed(build_model(cfg)[0])
    save_trainable(model, d/'trainable.safetensors')
    return d, model

def test_export_run_every_format(tmp_path):
    from ftcourse.runs import load_run
    run, trained = _run_folder(tmp_path)
    ref = logits(trained)
    p = export_run(run, 'peft', tmp_path/'peft')
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_model()[0], p).eval()), ref, rtol=0, atol=1e-6)
    m = export_run(run, 'merged', tmp_path/'merged')
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(m).eval()), ref, rtol=0, atol=1e-5)
    g = export_run(run, 'gguf', tmp_path/'f32.gguf', 'f32')
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=g.name, dtype=torch.float32).eval()
    assert torch.equal(logits(loaded), logits(load_run(run)[0]))
    with pytest.raises(ExportError, match='already exists'): export_run(run, 'merged', tmp_path/'merged')
    export_run(run, 'merged', tmp_path/'merged', overwrite=True)

def test_export_run_errors(tmp_path):
    full, _ = _run_folder(tmp_path, adapter='full')
    with pytest.raises(ExportError, match='full fine-tune.*--format merged'): export_run(full, 'peft', tmp_path/'x')
    with pytest.raises(ExportError, match='not a run folder'): export_run(tmp_path, 'merged', tmp_path/'x')
    with pytest.raises(ExportError, match='format must be'): export_run(full, 'onnx', tmp_path/'x')
    with pytest.raises(ExportError, match='gguf_type'): export_run(full, 'gguf', tmp_path/'x', 'q2')
    assert export_run(full, 'merged', tmp_path/'full-merged').is_dir()
    save_peft(apply_lora(tiny_model()[0]), tmp_path/'adapter')
    with pytest.raises(ExportError, match='peft adapter folder'): export_run(tmp_path/'adapter', 'gguf', tmp_path/'x')
    stacked, _ = _run_folder(tmp_path, base_run=str(full), method='dpo')
    with pytest.raises(ExportError, match='base_run'): export_run(stacked, 'peft', tmp_path/'x')
    reward, _ = _run_folder(tmp_path, method='reward')
    with pytest.raises(ExportError, match='reward model'): export_run(reward, 'merged', tmp_path/'x')
    assert not (tmp_path/'x').exists()
    assert issubclass(ExportError, ValueError)

def test_export_qlora_run_merges_into_the_dequantized_base(tmp_path):
    run, trained = _run_folder(tmp_path, adapter='qlora')
    m = export_run(run, 'merged', tmp_path/'merged')
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(m).eval()), logits(trained), rtol=0, atol=1e-4)
    cfg = json.loads((export_run(run, 'peft', tmp_path/'peft')/'adapter_config.json').read_text())
    assert cfg['peft_type'] == 'LORA' and sorted(cfg['target_modules']) == ['q_proj', 'v_proj']

def test_peft_export_of_fp32_adapters_over_a_bf16_base(tmp_path):
    ours = perturbed(apply_dora(tiny_model()[0].to(torch.bfloat16), 4, 8, ('q_proj', 'v_proj')))
    assert next(iter(lora_layers(ours).values())).lora_A.dtype == torch.float32     # peft's autocast_adapter_dtype
    theirs = PeftModel.from_pretrained(tiny_model()[0].to(torch.bfloat16), save_peft(ours, tmp_path/'a')).eval()
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=0, atol=1e-6)
