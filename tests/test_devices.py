"""Every chapter runs on its settings' device: a static check of the notebooks' code cells (issue 19).

A chapter asks `course_settings()` for its device (CPU on a laptop, CUDA on Colab). The failure this guards against is a
model that silently stays on the CPU on a GPU machine (or lands on another device than its inputs), because a cell
called `load_model()` without a device, or pinned a device by name. Rules, for every code cell of nbs/*.ipynb:

1. Every `load_model(...)` call passes `device=`, and its value follows the settings: an expression that mentions
   `course_settings`/`get_device`/`.device`, or a name assigned from one in the notebook (`s = course_settings()`,
   `dev = s.device`), or a parameter of the function it is in (library code: the caller decides).
2. A GPU named by a string (`device='cuda'`, `.to('mps')`, `device_map={'': 0}`) appears only in `#| gpu` cells, and
   in the settings' own GPU profile (`Settings(device='cuda')`). Results may be brought to the CPU (`.to('cpu')`,
   `.cpu()`), but a model is loaded on the CPU by name only on purpose, with a comment on the same line saying why
   (e.g. a comparison with a library's CPU kernels): `load_model(device='cpu')  # bitsandbytes' CPU kernels are the
   reference`.

`tiny_model()` is the unit tests' CPU fixture (a million random weights, no device argument) and is not checked.
"""
import ast, json, re
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p for p in (ROOT/'nbs').glob('*.ipynb') if not p.name.startswith(('_', '.')))
DEVICE_WORDS = re.compile(r'course_settings|get_device|\.device\b')
DEVICE_NAMES = re.compile(r'^(cpu|cuda|mps|xpu|meta)(:\d+)?$')
PLACEMENT_KWARGS = ('device', 'device_map')

def _src(c) -> str: return ''.join(c['source']) if isinstance(c['source'], list) else c['source']

def _flags(src:str) -> set[str]:
    return {m.group(1) for m in re.finditer(r'^\s*#\|\s*([\w-]+)', src, flags=re.M)}

def _parse(src:str):
    "The cell's syntax tree; IPython magics and shell lines are blanked out first."
    lines = ['' if l.lstrip().startswith(('%', '!')) else l for l in src.splitlines()]
    try: return ast.parse('\n'.join(lines))
    except SyntaxError: return None

def _settings_names(trees) -> set[str]:
    "Names assigned (anywhere in the notebook) from an expression that follows the settings' device, to a fixed point."
    names, assigns = set(), []
    for t in trees:
        for n in ast.walk(t):
            if isinstance(n, ast.Assign):
                targets = [e for tg in n.targets for e in ast.walk(tg) if isinstance(e, ast.Name)]
                assigns.append((targets, n.value))
    changed = True
    while changed:
        changed = False
        for targets, value in assigns:
            if _follows(value, names, set()) and any(t.id not in names for t in targets):
                names |= {t.id for t in targets}; changed = True
    return names

def _follows(expr, names:set, params:set) -> bool:
    "Does the device expression follow the settings (or a function parameter)?"
    if DEVICE_WORDS.search(ast.unparse(expr)): return True
    roots = {n.id for n in ast.walk(expr) if isinstance(n, ast.Name)}
    return bool(roots & (names | params))

def _literal_device(expr) -> str|None:
    "The device named by a string constant ('cuda', 'cpu', 'cuda:0'), or an int GPU index in a device_map dict."
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str) and DEVICE_NAMES.match(expr.value):
        return expr.value
    if isinstance(expr, ast.Call) and ast.unparse(expr.func) == 'torch.device' and expr.args:
        return _literal_device(expr.args[0])
    if isinstance(expr, ast.Dict) and expr.values:   # a device_map: {'': 0} puts everything on GPU 0
        v = expr.values[0]
        return f"cuda:{v.value}" if isinstance(v, ast.Constant) and type(v.value) is int else _literal_device(v)
    return None

def _params_around(tree) -> dict:
    "For each node inside a function: the names of that function's parameters (and of enclosing ones)."
    out = {}
    def visit(node, params):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = node.args
            named = a.posonlyargs + a.args + a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x]
            params = params | {x.arg for x in named}
        out[id(node)] = params
        for ch in ast.iter_child_nodes(node): visit(ch, params)
    visit(tree, frozenset())
    return out

def device_problems(nb:dict) -> list[str]:
    "Every placement in the notebook's code cells that does not follow the settings' device (see the module's rules)."
    cells = [(i, _src(c)) for i, c in enumerate(nb['cells']) if c['cell_type'] == 'code']
    parsed = [(i, s, _parse(s)) for i, s in cells]
    names = _settings_names([t for _, _, t in parsed if t is not None])
    out = []
    for i, src, tree in parsed:
        if tree is None: continue
        gpu, lines, params = 'gpu' in _flags(src), src.splitlines(), _params_around(tree)
        for n in ast.walk(tree):
            if not isinstance(n, ast.Call): continue
            line = lines[n.lineno - 1].strip()
            fname = n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, 'id', '')
            kw = {k.arg: k.value for k in n.keywords if k.arg}
            if fname == 'load_model':
                dev = kw.get('device')
                if dev is None: out.append(f"cell {i}: load_model without device= (stays on the CPU): {line[:100]!r}")
                elif _literal_device(dev) not in (None, 'cpu') or (
                        _literal_device(dev) is None and not _follows(dev, names, params[id(n)])):
                    out.append(f"cell {i}: load_model's device does not follow course_settings(): {line[:100]!r}")
                elif _literal_device(dev) == 'cpu' and '#' not in lines[n.end_lineno - 1]:
                    out.append(f"cell {i}: load_model on the CPU by name, without a comment saying why: {line[:100]!r}")
            if gpu or fname == 'Settings': continue
            placed = [kw[k] for k in PLACEMENT_KWARGS if k in kw] + ([n.args[0]] if fname == 'to' and n.args else [])
            for lit in filter(None, map(_literal_device, placed)):
                if lit not in ('cpu', 'meta'):     # 'meta' holds shapes only, on every machine
                    out.append(f"cell {i}: device {lit!r} named by hand outside a `#| gpu` cell: {line[:100]!r}")
    return out

def _cells(*srcs): return dict(cells=[dict(cell_type='code', source=s) for s in srcs])

def test_checker_catches_what_it_should():
    bad = ["model, tok = load_model()", "m = load_model(s.model)", "m, t = load_model(device='cuda')",
           "m, t = load_model(device=None)", "x = torch.zeros(3, device='cuda')", "y = x.to('mps')",
           "m = load_model(device=torch.device('cuda'))", "m = load_model(device='cpu')",
           "ids = ids.to(torch.device('cuda:0'))", "dev = 'cuda'\nm, t = load_model(device=dev)",
           "q = AutoModelForCausalLM.from_pretrained(n, device_map={'': 0})"]
    for src in bad: assert device_problems(_cells(src)), src
    good = ["s = course_settings()\nmodel, tok = load_model(s.model, device=s.device)",
            "s = course_settings()", "dev = s.device\nm = load_model(device=dev)[0]",   # `s` comes from the first cell
            "m, t = load_model(device=course_settings().device)", "x = torch.zeros(3, device=model.device)",
            "def base_model(name, device='cpu'):\n    return load_model(name, device=device)",
            "m = load_model(device='cpu')   # bitsandbytes' CPU kernels are the reference here",
            "y = x.to(torch.bfloat16)",
            "#| gpu\nx = torch.zeros(3, device='cuda')", "tm, tt = tiny_model()", "%time x = 1", "r = ref.to('cpu')",
            "GPU = Settings(model='m', device='cuda')", "x = torch.zeros(4, 8, device='meta')"]
    assert device_problems(_cells(*good)) == [], device_problems(_cells(*good))

@pytest.mark.parametrize('nb', NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_follows_its_device(nb):
    problems = device_problems(json.loads(nb.read_text()))
    assert problems == [], f"{nb.name}:\n  " + '\n  '.join(problems)
