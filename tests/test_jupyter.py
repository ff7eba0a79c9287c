"""Run All in a real Jupyter kernel on a machine without a GPU (issue 19).

Jupyter knows no nbdev flags: a learner's Run All executes `#| gpu` cells too, so each must skip itself with one printed
line where there is no GPU. `tools/site.py --execute` (which tools/test runs in place of nbdev-test) executes every
notebook that holds `#| gpu` cells in a Jupyter kernel (nbclient + ipykernel), leaving out only nbdev's other skipped
cells (`slow`, `notest`, `eval: false`). These tests check that route on a small notebook, and statically that every
GPU cell in nbs/ has its skip, so that a missing one is named here before the notebooks run."""
import ast, importlib.util, json, os, re, textwrap
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location('ftcourse_site_j', ROOT/'tools'/'site.py')
site = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(site)
NOTEBOOKS = sorted(p for p in (ROOT/'nbs').glob('*.ipynb') if not p.name.startswith(('_', '.')))

def _src(c) -> str: return ''.join(c['source']) if isinstance(c['source'], list) else c['source']

def _nb(*cells) -> dict:
    kernel = dict(name='python3', display_name='Python 3', language='python')
    code = [dict(cell_type='code', id=f'c{i}', metadata={}, execution_count=None, outputs=[],
                 source=textwrap.dedent(s).strip()) for i, s in enumerate(cells)]
    return dict(nbformat=4, nbformat_minor=5, metadata=dict(kernelspec=kernel), cells=code)

SKIPS = """#| gpu
import torch
if not torch.cuda.is_available(): print('No GPU: skipped.')
else: x = torch.zeros(1, device='cuda')"""

@pytest.fixture
def project(tmp_path):
    "A folder with the nbdev settings of this project (tst_flags, cell_timeout), where notebooks can be executed."
    import tomllib
    nbdev = tomllib.loads((ROOT/'pyproject.toml').read_text())['tool']['nbdev']
    (tmp_path/'pyproject.toml').write_text('[project]\nname = "scratch"\nversion = "0.0.1"\n\n[tool.nbdev]\n' + ''.join(
        f'{k} = {json.dumps(v)}\n' for k, v in nbdev.items()) + 'lib_path = "scratch"\nnbs_path = "."\n')
    return tmp_path

def _run(project, nb, name='t.ipynb'):
    src, dst = project/name, project/('out_' + name)
    src.write_text(json.dumps(nb))
    assert site.needs_kernel(src) == any('#| gpu' in _src(c) for c in nb['cells'])
    ok, secs, err = site._execute(str(src), str(dst))
    return ok, err, (json.loads(dst.read_text()) if ok else None)

@pytest.mark.skipif(__import__('torch').cuda.is_available(), reason='checks the CPU-only Run All')
def test_kernel_route_runs_gpu_cells_and_leaves_out_slow(project):
    "GPU cells run (and skip themselves), slow/notest cells do not, printed text comes back as one string per output."
    nb = _nb("import os\nprint(os.environ['IN_TEST'], os.path.basename(os.getcwd()))", SKIPS,
             "#| slow\nraise RuntimeError('a slow cell ran')", "#| notest\nraise RuntimeError('a notest cell ran')",
             "print('a\\nb')")
    ok, err, out = _run(project, nb)
    assert ok, err
    texts = [''.join(o.get('text', '')) for c in out['cells'] for o in c['outputs']]
    assert texts == [f"1 {project.name}\n", 'No GPU: skipped.\n', 'a\nb\n'], texts

@pytest.mark.skipif(__import__('torch').cuda.is_available(), reason='checks the CPU-only Run All')
def test_kernel_route_fails_on_a_gpu_cell_without_its_skip(project):
    "What Run All on a laptop would hit: the route fails and names the error."
    ok, err, _ = _run(project, _nb("import torch", "#| gpu\nx = torch.zeros(1).cuda()"))
    assert not ok and 'Torch not compiled with CUDA enabled' in err and 't.ipynb' in err, err

def _skips_itself(src:str) -> bool:
    """Does the cell print one line and do nothing else when there is no GPU? Its top level must be imports,
    definitions, and `if`/`else` whose test checks for CUDA (`torch.cuda.is_available()`, `.device.type`), one branch
    of which prints; nothing else runs before the check."""
    try: tree = ast.parse(src)
    except SyntaxError: return False
    def checks_cuda(n):
        return isinstance(n, ast.If) and re.search(r'cuda\.is_available|device\.type', ast.unparse(n.test))
    checks = [n for n in tree.body if checks_cuda(n)]
    if not checks: return False
    first = tree.body.index(checks[0])
    quiet = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)   # what may come before the check
    before_ok = all(isinstance(n, quiet) for n in tree.body[:first])
    firsts = [b[0] for b in (checks[0].body, checks[0].orelse) if b]   # the first statement of each branch
    def is_print(n): return isinstance(n, ast.Call) and getattr(n.func, 'id', '') == 'print'
    prints = any(is_print(n) for st in firsts for n in ast.walk(st))
    return before_ok and prints and tree.body[first:] == [checks[0]]

def test_skip_checker():
    assert _skips_itself(SKIPS.split('\n', 1)[1])
    assert _skips_itself("def f(): return torch.cuda.max_memory_allocated()\n"
                         "if model.device.type != 'cuda': print('skip')\nelse: f()")
    for bad in ["x = torch.zeros(1).cuda()", "y = 1\nif not torch.cuda.is_available(): print('no')\nelse: pass",
                "if not torch.cuda.is_available(): pass\nelse: x = 1",
                "if not torch.cuda.is_available(): print('no')\nz = torch.cuda.mem_get_info()"]:
        assert not _skips_itself(bad), bad

@pytest.mark.parametrize('nb', NOTEBOOKS, ids=lambda p: p.name)
def test_every_gpu_cell_skips_itself(nb):
    cells = json.loads(nb.read_text())['cells']
    def gpu_cell(c): return c['cell_type'] == 'code' and re.search(r'^\s*#\|\s*gpu\b', _src(c), re.M)
    gpu = [(i, _src(c)) for i, c in enumerate(cells) if gpu_cell(c)]
    bad = [i for i, s in gpu if not _skips_itself(s)]
    assert not bad, f"{nb.name}: `#| gpu` cells {bad} do not skip themselves without a GPU (Run All would fail there)"
    assert site.needs_kernel(nb) == bool(gpu)   # and tools/site.py --execute runs this notebook in a Jupyter kernel
