"""Chapter 0's version check: the installed libraries against the versions the course was tested with
(tools/constraints.txt)."""
import importlib.metadata as md
from pathlib import Path
from ftcourse.core import check_versions
from ftcourse import core   # (`tested_versions` by its module: pytest would collect a bare test_* name)

ROOT = Path(__file__).resolve().parent.parent

def test_tested_versions_are_the_constraints():
    pins = core.tested_versions()
    assert pins == core.tested_versions(ROOT/'tools'/'constraints.txt')
    assert pins['transformers'].count('.') == 2 and 'trl' in pins and 'peft' in pins

def test_warns_where_versions_differ(tmp_path, capsys):
    f = tmp_path/'constraints.txt'
    f.write_text(f"# a comment\nnumpy==0.0.1\nfastcore=={md.version('fastcore')}\nsurely-not-installed==1.0\n")
    assert check_versions(f) == ['numpy']
    out = capsys.readouterr().out
    line = {l.split()[0]: l for l in out.splitlines() if l and not l.startswith('WARNING')}
    assert 'WARNING' in line['numpy']
    assert 'WARNING' not in line['fastcore'] and 'WARNING' not in line['surely-not-installed']
    assert "pip install 'numpy==0.0.1'" in out

def test_unreadable_source(tmp_path, capsys):
    assert core.tested_versions(tmp_path/'missing.txt') == {}
    assert check_versions(tmp_path/'missing.txt') == [] and 'tested versions unknown' in capsys.readouterr().out
