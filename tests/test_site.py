"""The documentation site as a reader sees it: `python tools/site.py` builds it (the Quarto-free route), a local HTTP
server serves it, headless Chromium opens every page. Every page loads without console errors, its plots are images
that loaded, its math is typeset by the KaTeX the site serves, and every internal link (and #anchor) resolves.
Screenshots of two pages go to test-artifacts/. Chromium and ChromeDriver come from Debian (tools/setup installs them):
if they are missing this test fails, it does not skip."""
import functools, http.server, json, os, re, shutil, subprocess, sys, threading, time
from pathlib import Path
from urllib.parse import urljoin, urlsplit, unquote
import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT/'test-artifacts'
# Debian's chromium here; $CHROMIUM / $CHROMEDRIVER name another build (e.g. the GitHub runner's Chrome)
CHROMIUM = os.environ.get('CHROMIUM') or shutil.which('chromium') or '/usr/bin/chromium'
CHROMEDRIVER = os.environ.get('CHROMEDRIVER') or shutil.which('chromedriver') or '/usr/bin/chromedriver'
FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--window-size=1280,1000']
import importlib.util
_spec = importlib.util.spec_from_file_location('ftcourse_site', ROOT/'tools'/'site.py')
site = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(site)

@pytest.fixture(scope='module')
def built(tmp_path_factory):
    "The site built by the one command, into a temporary folder: (folder, seconds it took)."
    out = tmp_path_factory.mktemp('site')/'_site'
    t = time.time()
    r = subprocess.run([sys.executable, str(ROOT/'tools'/'site.py'), '--out', str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=3000, env={**os.environ, 'MPLBACKEND': 'Agg'})
    print(r.stdout[-3000:])
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
    return out, time.time() - t

@pytest.fixture(scope='module')
def server(built):
    out, _ = built
    handler = functools.partial(_QuietHandler, directory=str(out))
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a): pass

@pytest.fixture(scope='module')
def browser(tmp_path_factory):
    for exe in (CHROMIUM, CHROMEDRIVER):
        assert Path(exe).exists(), f"{exe} is missing: run `bash tools/setup` (it installs Debian's chromium and chromium-driver)"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for f in FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]: opts.add_argument(f)
    opts.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    d.set_page_load_timeout(60)
    yield d
    d.quit()

def _pages():
    "(notebook, page file) for every notebook the site has, in the sidebar's order."
    from nbdev.config import nbpath2html
    return [(nb.name, nbpath2html(nb.name).name) for nb in site.notebooks()]

def _open(browser, url):
    "Load `url`, wait until KaTeX has run, and return the console's error entries."
    browser.get_log('browser')   # empty the log
    browser.get(url)
    t = time.time()
    while browser.execute_script("return document.readyState !== 'complete' || !document.body || document.body.dataset.math !== 'done'"):
        assert time.time() - t < 30, f"{url}: page did not finish (math typesetting never ran)"
        time.sleep(0.1)
    return [e for e in browser.get_log('browser') if e['level'] == 'SEVERE']

def _math_spans(nb_name):
    "Math spans ($...$, $$...$$) in the markdown of the processed notebook."
    nb = json.loads((ROOT/'_proc'/nb_name).read_text())
    md = '\n'.join(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'markdown')
    md = re.sub(r'```.*?```|`[^`\n]*`', '', md, flags=re.S)
    return len(re.findall(r'\$\$.+?\$\$|\$[^$\n]+?\$', md, flags=re.S))

def _png_outputs(nb_name):
    "Plots the page must show: image outputs of the processed notebook's cells, except cells Quarto leaves out."
    nb = json.loads((ROOT/'_proc'/nb_name).read_text())
    shown = [c for c in nb['cells'] if c['cell_type'] == 'code' and not re.search(r'^#\|\s*(include|output):\s*false', ''.join(c.get('source', '')), re.M)]
    return sum('image/png' in o.get('data', {}) for c in shown for o in c.get('outputs', []))

_ANSI = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')
def _norm(t:str) -> str: return '\n'.join(l.rstrip() for l in _ANSI.sub('', t).strip().splitlines())

def _printed(nb_name):
    "What the cells of the processed notebook printed (stream outputs, one string each), except cells Quarto leaves out."
    nb = json.loads((ROOT/'_proc'/nb_name).read_text())
    def hidden(c):   # left out by Quarto, or shown as markdown (`output: asis`: show_doc)
        return re.search(r'^#\|\s*((include|output):\s*false|output:\s*asis)', ''.join(c.get('source', '')), re.M)
    shown = [c for c in nb['cells'] if c['cell_type'] == 'code' and not hidden(c)]
    texts = [o.get('text', '') for c in shown for o in c.get('outputs', []) if o.get('output_type') == 'stream']
    texts = [''.join(t) if isinstance(t, list) else t for t in texts]
    return [_norm(t) for t in texts if t.strip() and '\r' not in t]   # progress bars redraw with \r: not plain text

_LIST_REPR = re.compile(r"""^\[(['"]).*\\n\1,""", re.S)   # ['line 1\n', 'line 2\n', ...]: lines shown as a Python list

def _check_printed(browser, page, nb):
    "Every printed output reads on the page as the text that was printed, and no output shows a Python list of lines."
    outs = browser.execute_script(
        "return [...document.querySelectorAll('#content .output_subarea, #content .jp-OutputArea-output')]"
        ".map(e => e.innerText)")
    lists = [o[:80] for o in outs if _LIST_REPR.match(o.strip())]
    assert not lists, f"{page}: outputs shown as a list of lines: {lists}"
    shown = '\n'.join(_norm(o) for o in outs)
    missing = [t[:120] for t in _printed(nb) if t not in shown]
    assert not missing, f"{page}: printed text not on the page as printed: {missing}"
    return len(_printed(nb))

def test_printed_output_check_catches_lists():
    "What the renderer did before nbformat normalised the notebooks: a list of lines, shown as its repr."
    assert _LIST_REPR.match(str(['max |scratch - bnb| = 0.0 | bit-identical: True\n', ' 0 -1.0000000000\n']))
    assert not _LIST_REPR.match('max |scratch - bnb| = 0.0 | bit-identical: True\n 0 -1.0000000000')
    assert not _LIST_REPR.match("['a', 'b']")   # a printed list of words is not a list of lines

def test_build(built):
    out, secs = built
    print(f"site built in {secs:.0f} s")
    for _, page in _pages(): assert (out/page).exists(), page
    assert (out/'search.html').exists() and (out/'_static'/'katex'/'katex.min.js').exists()
    for f in out.rglob('*.html'):   # nothing is fetched from outside: no CDN scripts, styles or images
        for u in re.findall(r'<(?:script|link|img)[^>]+(?:src|href)="(https?://[^"]+)"', f.read_text()):
            pytest.fail(f"{f.name} loads {u} from outside the site")

def test_every_page(built, server, browser):
    """Loads without console errors; plots are loaded images; math is typeset; printed text reads as printed; the
    sidebar is as nbs/sidebar.yml says."""
    pages = _pages()
    from nbdev.config import nbpath2html
    want_nav = [nbpath2html(f).name for _, fs in site.sidebar() for f in fs]
    printed = 0
    for nb, page in pages:
        errors = _open(browser, server + page)
        assert not errors, f"{page}: console errors: {errors}"
        imgs = browser.execute_script("return [...document.images].map(i => [i.src.slice(0, 60), i.complete, i.naturalWidth])")
        bad = [i for i in imgs if not (i[1] and i[2] > 0)]
        assert not bad, f"{page}: images that did not load: {bad}"
        plots = browser.execute_script("return document.querySelectorAll('#content img[src^=\"data:image/png\"]').length")
        assert plots == _png_outputs(nb), f"{page}: {plots} plots shown, the executed notebook has {_png_outputs(nb)}"
        n_math = _math_spans(nb)
        katex = browser.execute_script("return document.querySelectorAll('#content .katex').length")
        errs = browser.execute_script("return document.querySelectorAll('#content .katex-error').length")
        text = browser.execute_script(
            "const m = document.getElementById('content').cloneNode(true); m.querySelectorAll('pre, code, .katex').forEach(e => e.remove()); return m.innerText")
        assert errs == 0, f"{page}: {errs} formulas KaTeX could not typeset"
        assert katex >= n_math, f"{page}: {katex} typeset formulas, the markdown has {n_math}"
        assert '$$' not in text and '\\frac' not in text, f"{page}: raw TeX left in the page"
        nav = browser.execute_script("return [...document.querySelectorAll('nav.sidebar a')].map(a => a.getAttribute('href'))")
        assert nav == want_nav, f"{page}: sidebar {nav}, nbs/sidebar.yml says {want_nav}"
        heading = browser.execute_script("return document.querySelector('h1.title').innerText")
        assert heading.strip(), page
        printed += _check_printed(browser, page, nb)
    assert printed > 10, f"only {printed} printed outputs on the whole site"
    print(f"{len(pages)} pages checked, {printed} printed outputs read as printed")

def test_math_is_typeset(built, server, browser):
    "KaTeX from the site's own _static/ typesets display and inline math (a page made from the site's template)."
    out, _ = built
    page = (out/'index.html').read_text()
    body = '<p>Inline $\\alpha = \\frac{r}{\\sqrt{d}}$ and display:</p><p>$$W = W_0 + \\frac{\\alpha}{r} BA$$</p>'
    (out/'_mathcheck.html').write_text(re.sub(r'(<main id="content">)', r'\1' + body.replace('\\', '\\\\'), page, count=1))
    assert not _open(browser, server + '_mathcheck.html')
    assert browser.execute_script("return document.querySelectorAll('#content .katex-display').length") == 1
    assert browser.execute_script("return document.querySelectorAll('#content .katex').length") >= 2
    assert browser.execute_script("return document.querySelectorAll('#content .katex-error').length") == 0
    fonts = browser.execute_script("return document.fonts.check('12px KaTeX_Main')")
    assert fonts, "KaTeX's fonts did not load from _static/katex/fonts"
    (out/'_mathcheck.html').unlink()

def test_links_resolve(built, server, browser):
    "Every link to a page of the site points at a page that exists, and at an element that exists on it."
    out, _ = built
    ids, checked = {}, 0
    def ids_of(path):
        if path not in ids: ids[path] = set(re.findall(r'\bid="([^"]+)"', (out/path).read_text()))
        return ids[path]
    for _, page in _pages() + [(None, 'search.html')]:
        _open(browser, server + page)
        hrefs = browser.execute_script("return [...document.querySelectorAll('a[href]')].map(a => a.href)")
        for h in hrefs:
            u = urlsplit(h)
            if not h.startswith(server): continue
            path = unquote(u.path).lstrip('/') or 'index.html'
            assert (out/path).is_file(), f"{page}: link to {h}: no such file"
            if u.fragment and path.endswith('.html'):
                assert unquote(u.fragment) in ids_of(path), f"{page}: link to {h}: no element with that id"
            checked += 1
    assert checked > 10
    print(f"{checked} internal links resolve")

def test_search(server, browser):
    "The search page finds an exported function and links to its documentation; the API index lists it."
    assert not _open(browser, server + 'search.html?q=load_model')
    hits = browser.execute_script("return [...document.querySelectorAll('#results .hit a')].map(a => a.getAttribute('href'))")
    assert hits and hits[0] == 'core.html#load_model', hits
    api = browser.execute_script("return [...document.querySelectorAll('ul.api a')].map(a => a.innerText)")
    assert 'load_model' in api and 'set_seed' in api

def test_screenshots(server, browser):
    "Two pages as a reader sees them, kept in test-artifacts/ (gitignored)."
    ARTIFACTS.mkdir(exist_ok=True)
    pages = [p for _, p in _pages()]
    plotted = [p for nb, p in _pages() if _png_outputs(nb)]
    for name, page in [('site-index.png', 'index.html'), ('site-chapter.png', (plotted or pages[1:] or pages)[0])]:
        _open(browser, server + page)
        if page != 'index.html':   # scroll to the first plot, if any, so the screenshot shows one
            browser.execute_script("const i = document.querySelector('#content img[src^=\"data:\"]'); if (i) i.scrollIntoView()")
        assert browser.save_screenshot(str(ARTIFACTS/name))
        assert (ARTIFACTS/name).stat().st_size > 10_000

def test_every_linked_method_or_private_name_has_a_doc_entry():
    "nbdev links a backticked `Class.method` or `_private` name in prose to its doc entry: that entry must exist (fast, no site)."
    from ftcourse._modidx import d
    root = Path(__file__).resolve().parent.parent
    pages = {}
    for nb in (root/'nbs').glob('*.ipynb'):
        cells = json.loads(nb.read_text())['cells']
        prose = ''.join(''.join(c['source']) for c in cells if c['cell_type'] == 'markdown')
        code = ''.join(''.join(c['source']) for c in cells if c['cell_type'] == 'code')
        pages[re.sub(r'^\d+[a-z]*_', '', nb.stem) + '.html'] = (prose, code)
    missing = []
    for mod, entries in d['syms'].items():
        for full, (loc, _) in entries.items():
            name = full[len(mod) + 1:]
            if not (name.startswith('_') or '.' in name): continue      # public functions and classes are documented by nbdev
            linked = [p for p, (prose, _) in pages.items() if re.search(r'`' + re.escape(name) + r'(\(\))?`', prose)]
            code = pages[loc.split('#')[0]][1]
            if linked and f'show_doc({name})' not in code and f'show_doc({name},' not in code:
                missing.append(f"{name} (linked from {', '.join(linked)})")
    assert not missing, f"prose links to names with no show_doc on their page: {missing}"
