"`ftcourse.lora.sft_model`: chapter 3's SFT model, trained once, cached, and safe when two callers ask at once."
import torch
import ftcourse.core
from ftcourse.core import tiny_model, course_settings
from ftcourse.lora import sft_model, lora_layers

def _tiny(monkeypatch, tmp_path):
    monkeypatch.setenv('FTCOURSE_CACHE', str(tmp_path))
    monkeypatch.setattr(ftcourse.core, 'load_model', lambda name=None, device=None, **kw: tiny_model(seed=0))
    return course_settings('cpu', steps=3, batch_size=2, micro_batch_size=2, max_len=48, eval_every=3)

def test_trains_once_then_loads_the_same_model(monkeypatch, tmp_path):
    s = _tiny(monkeypatch, tmp_path)
    m1, _, h1 = sft_model(s, verbose=False)
    assert not lora_layers(m1)                                   # merged and unloaded: a plain model
    assert all(p.requires_grad for p in m1.parameters()) and not m1.training
    assert len(list((tmp_path/'sft').glob('*/adapters.safetensors'))) == 1
    m2, _, h2 = sft_model(s, verbose=False)
    assert list(h1) == list(h2)
    sd1, sd2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)          # loaded adapters merge to the same weights
    base = tiny_model(seed=0)[0].state_dict()
    assert any(not torch.equal(sd1[k], base[k]) for k in sd1)     # and training moved them
    m3, _, _ = sft_model(s, seed=1, verbose=False)                  # another seed is another model
    assert len(list((tmp_path/'sft').glob('*/adapters.safetensors'))) == 2

_CHILD = """
import sys, torch, ftcourse.core
from ftcourse.core import tiny_model, course_settings
from ftcourse.lora import sft_model
ftcourse.core.load_model = lambda name=None, device=None, **kw: tiny_model(seed=0)
s = course_settings('cpu', steps=3, batch_size=2, micro_batch_size=2, max_len=48, eval_every=3)
model, _, hist = sft_model(s, verbose=False)
torch.save(dict(state=model.state_dict(), hist=list(hist)), sys.argv[1])
"""

def test_two_processes_at_once_train_once(tmp_path):
    "Two notebooks asking at the same moment: one trains, the other waits on the lock and loads the same model."
    # Two fresh interpreters, as two notebooks are (a fork of this process could deadlock in OpenMP's thread pool)
    import os, subprocess, sys
    env = dict(os.environ, FTCOURSE_CACHE=str(tmp_path), OMP_NUM_THREADS='1')
    procs = [subprocess.Popen([sys.executable, '-c', _CHILD, str(tmp_path/f'out{i}.pt')], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try: outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs: p.kill()                   # never leave a child behind, whatever failed
    assert [p.returncode for p in procs] == [0, 0], outs
    a, b = (torch.load(tmp_path/f'out{i}.pt', weights_only=True) for i in range(2))
    assert a['hist'] == b['hist']
    assert all(torch.equal(a['state'][k], b['state'][k]) for k in a['state'])
    assert len(list((tmp_path/'sft').glob('*/adapters.safetensors'))) == 1
    assert not list((tmp_path/'sft').glob('*.tmp*'))
