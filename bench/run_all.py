"""Rerun every bench and rewrite its table: `python bench/run_all.py [--only nf4 limit ...] [--list]`.

Each bench times ours and the library on the same work, alternating between them over several repeats and reporting
medians (bench/_timing.py). This driver runs the benches one after the other, each in its own process, records the
load average before and after each, and writes bench/<name>.md with a first line giving the date, the versions and
the load, marked when the machine was loaded (load average above the core count). bench/gpu-check.md, written by
tools/gpu-check on a GPU machine, is left alone; bench/grpo.* and bench/precision.* are run when they exist."""
import argparse, os, subprocess, sys, time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _timing import header, load_average

# name: (arguments, whether the script writes bench/<name>.md itself; otherwise its stdout is the table)
BENCHES = {
    'limit':             ([], True),
    'head':              ([], True),
    'checkpointing':     (['--tokens', '128', '--repeats', '5'], False),
    'nf4':               ([], False),
    'lora':              (['--reps', '5'], False),
    'generate_kv_cache': (['--reps', '3'], False),
    'sft':               (['--steps', '10', '--repeats', '3'], True),
    'reward':            (['--steps', '8', '--repeats', '3'], True),
    'dpo_orpo':          (['--steps', '8', '--repeats', '2'], True),
    'grpo':              ([], True),
    'precision':         ([], True),
}

def run(name, args, writes_own):
    script = HERE / f'{name}.py'
    if not script.exists(): return f"{name}: no bench/{name}.py, skipped"
    md = HERE / f'{name}.md'
    load0, t0 = load_average(), time.time()
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=HERE.parent,
                         env={**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1'})
    if out.returncode != 0: return f"{name}: FAILED ({out.returncode})\n{out.stderr[-2000:]}"
    body = md.read_text() if writes_own else out.stdout
    lines = [l for l in body.splitlines() if not l.startswith(('Written ', '**Measured on a loaded machine**'))]
    title, rest = (lines[0], lines[1:]) if lines and lines[0].startswith('# ') else (f'# {name}', lines)
    text = '\n'.join([title, '', header(load0), f"Command: `python bench/{name}.py {' '.join(args)}`, {time.time() - t0:.0f} s.",
                      *rest]) + '\n'
    md.write_text(text)
    return f"{name}: wrote {md.relative_to(HERE.parent)} ({time.time() - t0:.0f} s, load {load0:.1f} -> {load_average():.1f})"

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--only', nargs='*', default=None, help=f'benches to run (default: all): {", ".join(BENCHES)}')
    ap.add_argument('--list', action='store_true', help='print the benches and exit')
    a = ap.parse_args()
    if a.list:
        for name, (args, _) in BENCHES.items(): print(f"python bench/{name}.py {' '.join(args)}")
        return
    names = a.only or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown: sys.exit(f"unknown bench {unknown}: choose from {', '.join(BENCHES)}")
    for name in names: print(run(name, *BENCHES[name]), flush=True)

if __name__ == '__main__': main()
