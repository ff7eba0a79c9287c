"""Make README.md from nbs/index.ipynb without Quarto: markdown cells as they are, the title block as
a heading and a quote. `--check` exits 1 if README.md differs from what it would write."""
import json, re, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
HEADER = "<!-- Made from nbs/index.ipynb by tools/readme.py: edit the notebook, not this file. -->\n\n"

def render(nb_path=root/'nbs'/'index.ipynb') -> str:
    cells = json.loads(Path(nb_path).read_text())['cells']
    parts = []
    for c in cells:
        src = ''.join(c['source']).strip()
        if not src: continue
        if c['cell_type'] == 'markdown': parts.append(src)
        elif not re.match(r'\s*#\|\s*(hide|export)', src): parts.append(f"```python\n{src}\n```")
    text = '\n\n'.join(parts)
    text = re.sub(r'\]\((\w[\w-]*)\.html\)', r'](https://ftcourse.github.io/ftcourse/\1.html)', text)  # site links work on GitHub too
    return HEADER + text + '\n'

if __name__ == '__main__':
    want, readme = render(), root/'README.md'
    if '--check' in sys.argv:
        if not readme.exists() or readme.read_text() != want:
            sys.exit("README.md is not what nbs/index.ipynb makes: run `python tools/readme.py`")
        print("README.md agrees with nbs/index.ipynb")
    else: readme.write_text(want); print("wrote README.md")
