"""The work of `tools/gpu-check` (read that file first): prepare here, run on a CUDA machine, or dry-run on the CPU.

  python tools/gpu_check.py prepare          here, with the package registry: wheels into .whl/, tokenizer into .gpu/
  python tools/gpu_check.py run [--dry-run]  every notebook in its GPU profile, the benches' GPU rows, the table
  python tools/gpu_check.py bench-nf4|bench-bf16   one GPU bench row (run in a subprocess by `run`)

The run writes, as it goes (a timeout still leaves something), into $OUT (else build/gpu-check/):
  gpu-check.md   per chapter: status, run time, peak CUDA memory (random weights, SmolLM2-shaped)
  failures.md    the last 40 lines of each failing or timed-out notebook's traceback or progress
  bench.md       the benches' outputs; the FSDP check's output if tests/fsdp_check.py exists
  executed.tar.gz   the executed notebooks, with their outputs (the ones that finished)
Notebooks execute as `nbdev-test --flags gpu` does: nbdev's own cell predicate with tst_flags minus 'gpu' skipped,
execnb's CaptureShell, the notebook's folder as working directory (the logic of tools/site.py's `_execute`).
"""
from __future__ import annotations
import argparse, asyncio, json, os, shutil, signal, subprocess, sys, tarfile, threading, time, zipfile
import multiprocessing as mp
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT/'nbs'
WHL, GPU_DIR = ROOT/'.whl', ROOT/'.gpu'
TOKENIZER_DIR = GPU_DIR/'tokenizer'
LIMIT_BYTES = 64 * 2**20          # what the device tool lets travel: tracked files plus carried folders
# Missing on the lent machine (its package list: /work/.library/device/KINDS.md), at the versions tested here.
# transformers and peft are there, but older: carried so that the run uses the versions the notebooks are tested with.
WHEELS = ['trl', 'datasets', 'dill', 'multiprocess', 'transformers', 'peft', 'gguf',
          'nbdev', 'execnb', 'fastcore', 'fastgit', 'watchdog', 'asttokens', 'astunparse',
          'ipython', 'ipython-pygments-lexers', 'jedi', 'parso', 'matplotlib-inline', 'pexpect', 'ptyprocess',
          'prompt_toolkit', 'wcwidth', 'stack_data', 'executing', 'pure_eval', 'traitlets',
          'ipywidgets', 'comm', 'widgetsnbextension', 'jupyterlab_widgets']
BNB = 'bitsandbytes'
BNB_KEEP = ('libbitsandbytes_cuda130.so', 'libbitsandbytes_cpu.so')   # the machine's torch is built for CUDA 13.0
PLATFORMS = ['manylinux_2_28_x86_64', 'manylinux_2_27_x86_64', 'manylinux_2_24_x86_64', 'manylinux_2_17_x86_64',
             'manylinux2014_x86_64', 'manylinux1_x86_64', 'any']
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'chat_template.jinja', 'generation_config.json')
# heaviest first, so that they get the whole budget; notebooks not named here run after these, in name order
PRIORITY = ['10_capstone', '10c_tour', '10b_methods', '07_ppo', '02b_train', '03a_peft_methods', '08_dpo', '09_orpo',
            '06_reward', '03_lora', '04_nf4', '05_checkpointing', '10a_runs', '02a_sft', '01_autoregression', '02ab_evaluate']

def log(*a): print(f"[gpu-check {time.strftime('%H:%M:%S')}]", *a, flush=True)

# ---------------------------------------------------------------- prepare (here)
def _version(name):
    import importlib.metadata as md
    return md.version(name)

def _trim_wheel(src:Path, dst:Path, keep:tuple):
    "Copy wheel `src` to `dst` without the native libraries not in `keep` (and without their RECORD lines)."
    drop = lambda n: '/libbitsandbytes_' in n and n.rsplit('/', 1)[-1] not in keep
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, 'w', zipfile.ZIP_DEFLATED) as zo:
        for item in zi.infolist():
            if drop(item.filename): continue
            data = zi.read(item)
            if item.filename.endswith('.dist-info/RECORD'):
                data = ''.join(l for l in data.decode().splitlines(True) if not drop(l.split(',')[0])).encode()
            zo.writestr(item, data)

def prepare():
    "Download the wheels (exact versions of this venv, for CPython 3.12 on x86-64 Linux) and copy the tokenizer files."
    pins = [f"{n}=={_version(n)}" for n in WHEELS]
    shutil.rmtree(WHL, ignore_errors=True)
    WHL.mkdir()
    tmp = ROOT/'build'/'gpu-check-bnb'
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    base = [sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', '--only-binary=:all:',
            '--python-version', '3.12', '--implementation', 'cp'] + [a for p in PLATFORMS for a in ('--platform', p)]
    subprocess.run(base + ['-d', str(WHL)] + pins, check=True)
    subprocess.run(base + ['-d', str(tmp), f"{BNB}=={_version(BNB)}"], check=True)
    for w in tmp.glob('*.whl'):
        _trim_wheel(w, WHL/w.name, BNB_KEEP)   # the full wheel (43 MB) holds 13 CUDA/ROCm builds
    shutil.rmtree(tmp)
    from ftcourse.core import _gguf_cache_path, load_model
    src = _gguf_cache_path()
    if not (src/'tokenizer.json').exists(): load_model()   # converts the packaged GGUF once
    shutil.rmtree(TOKENIZER_DIR, ignore_errors=True)
    TOKENIZER_DIR.mkdir(parents=True)
    for f in TOKENIZER_FILES:
        if (src/f).exists(): shutil.copy2(src/f, TOKENIZER_DIR/f)
    check_sizes()

def check_sizes() -> int:
    "Print the size of what travels (tracked files, .whl, .gpu); exit status 2 if it is over the device tool's limit."
    # tracked files and untracked ones that git does not ignore: what the device tool sends besides `carry`
    ls = ['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard']
    tracked = set(subprocess.run(ls, cwd=ROOT, capture_output=True, check=True).stdout.split(b'\0'))
    t = sum((ROOT/f.decode()).stat().st_size for f in tracked if f and (ROOT/f.decode()).is_file())
    carried = sum(p.stat().st_size for d in (WHL, GPU_DIR) if d.exists() for p in d.rglob('*') if p.is_file())
    total = t + carried
    print(f"travelling: the working tree {t/2**20:.1f} MiB + .whl and .gpu {carried/2**20:.1f} MiB = "
          f"{total/2**20:.1f} MiB (limit {LIMIT_BYTES/2**20:.0f} MiB)")
    for w in sorted(WHL.glob('*.whl')): print(f"  {w.stat().st_size/2**20:6.2f} MiB  {w.name}")
    return 0 if total < LIMIT_BYTES else 2

# ---------------------------------------------------------------- one notebook, in its own process group
def _run_notebook(src:str, dst:str, result:str, progress:str):
    "Execute notebook `src` as `nbdev-test --flags gpu` does; write it to `dst`, the outcome to `result` (json)."
    os.setsid()   # its own process group: a timeout kills the notebook and everything it started
    os.environ['IN_TEST'] = '1'
    t0 = time.time()
    out = dict(ok=False, secs=0.0, peak_mib=None, reserved_mib=None, err='')
    try:
        import torch
        from fastcore.nbio import write_nb
        from fastcore.xtras import working_directory
        from execnb.shell import CaptureShell
        from nbdev.config import get_config
        from nbdev.process import NBProcessor
        from nbdev.test import _skip_cell
        src = Path(src)
        cfg = get_config(src.parent)
        sys.path.insert(0, str(cfg.config_path))
        flags = cfg.tst_flags.split() if isinstance(cfg.tst_flags, str) else list(cfg.tst_flags)
        nb = NBProcessor(src, rm_directives=False, process=True).nb
        skip = _skip_cell(nb, flags, ['gpu'])   # as `nbdev-test --flags gpu`: gpu cells run, slow and notest do not
        todo = [c for c in nb.cells if not skip(c)]
        pf = open(progress, 'w', buffering=1)
        pf.write(f"{len(todo)} cells to run\n")
        done = [0]
        def post(cell):
            done[0] += 1
            secs = cell.metadata['execution']['total']
            pf.write(f"cell {done[0]}/{len(todo)} (index {cell.idx_}) done in {secs:.1f} s, "
                     f"at {time.time()-t0:.0f} s: {cell.source.splitlines()[0][:80] if cell.source else ''}\n")
        k = CaptureShell(src, profile=bool(cfg.exec_profile))
        timeout = int(cfg.cell_timeout) or None
        # execnb's run_all, except that, on random weights, a failed `assert` (about answer quality, say) is recorded
        # and the run goes on, so that the later cells' time and memory are measured too; any other error stops it
        keep_going = (os.environ.get('GPU_CHECK_STOP_ON_ASSERT') != '1'
                      and os.environ.get('FTCOURSE_RANDOM_WEIGHTS') == '1')
        out['asserts'] = []
        with working_directory(src.parent):
            before = asyncio.all_tasks(k.loop)
            for cell in nb.cells:
                if skip(cell): continue
                k.cell(cell, timeout=timeout)
                post(cell)
                if k.exc is None: continue
                if keep_going and isinstance(k.exc, AssertionError):
                    out['asserts'].append(k.prettytb(fname=src))
                    continue
                break
            k.leaks = k._reap(before, 5)
        if k.exc is None: out['ok'] = True
        else: out['err'] = k.prettytb(fname=src)
        write_nb(nb, dst)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out['peak_mib'] = torch.cuda.max_memory_allocated() / 2**20
            out['reserved_mib'] = torch.cuda.max_memory_reserved() / 2**20
    except BaseException:
        import traceback
        out['err'] = traceback.format_exc()
    out['secs'] = time.time() - t0
    Path(result).write_text(json.dumps(out))
    sys.stdout.flush()
    os._exit(0)   # skip interpreter teardown (IPython, CUDA): the parent waits on this process

class GPUMemory(threading.Thread):
    "Polls nvidia-smi once a second: the peak memory of each process group (a notebook and what it started), in MiB."
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = {}, False
        self.ok = shutil.which('nvidia-smi') is not None
    def run(self):
        while self.ok and not self.stop:
            try:
                query = ['nvidia-smi', '--query-compute-apps=pid,used_memory', '--format=csv,noheader,nounits']
                r = subprocess.run(query,
                                   capture_output=True, text=True, timeout=10)
                used = {}
                for line in r.stdout.strip().splitlines():
                    pid, mib = (int(x) for x in line.split(','))
                    try: g = os.getpgid(pid)
                    except OSError: continue
                    used[g] = used.get(g, 0) + mib
                for g, mib in used.items(): self.peak[g] = max(self.peak.get(g, 0), mib)
            except Exception: pass
            time.sleep(1)

def _tail(text:str, n:int=40) -> str: return '\n'.join(text.rstrip().splitlines()[-n:])

# ---------------------------------------------------------------- run
class Report:
    "The table, the failure log and the bench log under `out`, rewritten after every result."
    def __init__(self, out:Path, header:list[str]):
        self.out, self.header, self.rows, self.failures = out, header, {}, []
        out.mkdir(parents=True, exist_ok=True)
        (out/'bench.md').write_text('# GPU rows of the benches\n\n'); (out/'failures.md').write_text('# Failures\n\n')
        self.write()
    def row(self, nb:str, **kw):
        self.rows[nb] = kw
        self.write()
    def failure(self, nb:str, text:str, n:int=40):
        with open(self.out/'failures.md', 'a') as f: f.write(f"## {nb}\n\n```\n{_tail(text, n)}\n```\n\n")
    def bench(self, title:str, cmd:str, secs:float, status:str, text:str):
        with open(self.out/'bench.md', 'a') as f:
            f.write(f"## {title}\n\n`{cmd}`: {status} in {secs:.0f} s\n\n```\n{text.rstrip()}\n```\n\n")
    def table(self) -> str:
        lines = self.header + ['',
                               '| chapter | status | run time s | peak CUDA memory MiB | peak GPU memory MiB | note |',
                               '|---|---|---:|---:|---:|---|']
        for nb, r in sorted(self.rows.items()):   # chapters in reading order, whatever order they ran in
            f = lambda v: '-' if v is None else f"{v:.0f}"
            cols = [nb, r['status'], f(r.get('secs')), f(r.get('peak')), f(r.get('smi')), r.get('note', '')]
            lines.append('| ' + ' | '.join(cols) + ' |')
        lines += ['', 'peak CUDA memory: torch.cuda.max_memory_allocated() in the notebook\'s process '
                  '(not its subprocesses); '
                  'peak GPU memory: nvidia-smi, polled each second, summed over the notebook\'s process group (CUDA '
                  'contexts and subprocesses included; "-" where nvidia-smi gave nothing).']
        return '\n'.join(lines) + '\n'
    def write(self): (self.out/'gpu-check.md').write_text(self.table())

def notebooks(only:list[str]|None) -> list[Path]:
    nbs = sorted(p for p in NBS.glob('*.ipynb') if not p.name.startswith(('_', '.')))
    if only:
        nbs = [p for p in nbs if p.name in only or p.stem in only]
        if not nbs: sys.exit(f"gpu-check: no notebook in nbs/ matches {only}")
    rank = {s: i for i, s in enumerate(PRIORITY)}
    return sorted(nbs, key=lambda p: (rank.get(p.stem, len(rank)), p.name))

def run_notebooks(nbs:list[Path], jobs:int, deadline:float, work:Path, report:Report, note:str):
    "Up to `jobs` notebooks at once, each in a fresh process; whatever is still running at `deadline` is killed."
    ctx = mp.get_context('spawn')
    mon = GPUMemory()
    mon.start()
    queue, running = list(nbs), {}
    for nb in nbs: report.row(nb.stem, status='waiting')
    while queue or running:
        while queue and len(running) < jobs and time.time() < deadline - 5:
            nb = queue.pop(0)
            files = {k: str(work/f"{nb.stem}.{k}") for k in ('ipynb', 'json', 'progress')}
            p = ctx.Process(target=_run_notebook, args=(str(nb), files['ipynb'], files['json'], files['progress']))
            p.start()
            running[nb] = (p, time.time(), files)
            report.row(nb.stem, status='running')
            log(f"started {nb.name} (pid {p.pid})")
        for nb, (p, t0, files) in list(running.items()):
            late = time.time() > deadline
            if p.is_alive() and not late: continue
            if late and p.is_alive():
                try: os.killpg(p.pid, signal.SIGKILL)
                except OSError: pass
            p.join(10)
            del running[nb]
            smi = mon.peak.get(p.pid)
            prog = Path(files['progress']).read_text() if Path(files['progress']).exists() else ''
            res = json.loads(Path(files['json']).read_text()) if Path(files['json']).exists() else None
            if res is None:
                status = 'TIMEOUT' if late else f'CRASHED (exit {p.exitcode})'
                last = prog.strip().splitlines()[-1] if prog.strip() else 'no cell finished'
                report.row(nb.stem, status=status, secs=time.time() - t0, smi=smi, note=f"{note}; last: {last[:90]}")
                report.failure(nb.stem, f"{status} after {time.time()-t0:.0f} s; progress:\n{prog}")
            else:
                asserts = res.get('asserts') or []
                status = 'ok' if res['ok'] else 'FAILED'
                if asserts: status += f" ({len(asserts)} assert(s) failed, went on)"
                report.row(nb.stem, status=status, secs=res['secs'], peak=res['peak_mib'], smi=smi, note=note)
                for i, text in enumerate(asserts):
                    report.failure(f"{nb.stem}: failed assert {i+1} (the run went on)", text, 15)
                if not res['ok']: report.failure(nb.stem, res['err'])
            log(f"{nb.name}: {report.rows[nb.stem]['status']} in {time.time()-t0:.0f} s")
        time.sleep(1)
    for nb in queue: report.row(nb.stem, status='NOT RUN (out of time)')
    mon.stop = True
    with tarfile.open(report.out/'executed.tar.gz', 'w:gz') as tf:
        for f in sorted(work.glob('*.ipynb')): tf.add(f, arcname=f.name)

def run_cmd(report:Report, title:str, cmd:list[str], timeout:float, env:dict|None=None):
    "Run a bench command with a timeout, in its own process group; its output goes into bench.md."
    if timeout < 10:
        report.bench(title, ' '.join(cmd), 0, 'SKIPPED (out of time)', '')
        return
    t0 = time.time()
    log(f"bench: {title} (timeout {timeout:.0f} s)")
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True, env={**os.environ, **(env or {})})
    try:
        text, _ = p.communicate(timeout=timeout)
        status = 'ok' if p.returncode == 0 else f'FAILED (exit {p.returncode})'
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)   # the bench and anything it started
        text, _ = p.communicate()
        status = f'TIMEOUT ({timeout:.0f} s)'
    text = _tail(text or '', 80)
    report.bench(title, ' '.join(cmd[1:] if cmd[0] == sys.executable else cmd), time.time() - t0, status, text)
    log(f"bench: {title}: {status} in {time.time()-t0:.0f} s")
    print(text, flush=True)

def seed_hub_cache(hub:Path) -> list[str]:
    """The SmolLM2 models of `SMOLLM2_CONFIGS` as a local hub cache at `hub` (bf16, as on the hub), with the weights
    that FTCOURSE_RANDOM_WEIGHTS gives: cells that call `from_pretrained(name)` themselves (chapter 4's 4-bit load
    through bitsandbytes) then find them offline instead of failing."""
    import torch
    from ftcourse.core import SMOLLM2_CONFIGS, random_model
    done, threads = [], torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)   # nothing else runs yet: all the cores for the weights' initialisation
    for name in SMOLLM2_CONFIGS:
        t0 = time.time()
        repo = hub/f"models--{name.replace('/', '--')}"
        commit = '0' * 40   # the revision that refs/main names; offline, the hub client reads the snapshot it points to
        model, tok = random_model(name, dtype=torch.bfloat16)
        model.save_pretrained(repo/'snapshots'/commit)
        tok.save_pretrained(repo/'snapshots'/commit)
        (repo/'refs').mkdir(parents=True, exist_ok=True)
        (repo/'refs'/'main').write_text(commit)
        done.append(f"{name} ({time.time()-t0:.0f} s)")
        del model
    torch.set_num_threads(threads)
    return done

def environment() -> list[str]:
    import importlib.metadata as md, platform
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"no CUDA (CPU: {platform.machine()})"
    vs = []
    for n in ('torch', 'transformers', 'peft', 'trl', 'bitsandbytes', 'accelerate', 'datasets', 'nbdev', 'execnb'):
        try: vs.append(f"{n} {md.version(n)}")
        except md.PackageNotFoundError: vs.append(f"{n} MISSING")
    return [f"GPU: {gpu}; Python {platform.python_version()}; " + ', '.join(vs)]

def run(a):
    t_start = float(os.environ.get('GPU_CHECK_T0') or time.time())   # set by tools/gpu-check before the install
    end = t_start + a.budget
    out = Path(os.environ.get('OUT') or ROOT/'build'/'gpu-check')
    work = Path(os.environ.get('GPU_CHECK_WORK') or '/tmp/gpu-check-nbs')
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ.setdefault('FTCOURSE_RANDOM_WEIGHTS', '1')
    os.environ.setdefault('FTCOURSE_TOKENIZER_DIR', str(TOKENIZER_DIR))
    os.environ.setdefault('FTCOURSE_CACHE', str(work/'ftcache'))
    os.environ['HF_HUB_CACHE'] = str(work/'hub')   # before anything imports huggingface_hub: seed_hub_cache fills it
    for k, v in dict(HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', TOKENIZERS_PARALLELISM='false', MPLBACKEND='Agg',
                     PYTHONUNBUFFERED='1').items(): os.environ.setdefault(k, v)
    # each notebook gets an even share of the cores; torch's default (all cores each) would oversubscribe them
    threads = max(1, (os.cpu_count() or 2) // a.jobs)
    os.environ.setdefault('OMP_NUM_THREADS', str(threads))
    os.environ.setdefault('MKL_NUM_THREADS', str(threads))
    threads = os.environ['OMP_NUM_THREADS']
    if not (TOKENIZER_DIR/'tokenizer.json').exists():
        print("gpu-check: .gpu/tokenizer/ is missing: run `bash tools/gpu-check --prepare` first", file=sys.stderr)
        sys.exit(2)
    import torch
    if not torch.cuda.is_available() and not a.dry_run:
        print("gpu-check: no CUDA device here; use --dry-run to exercise the script on the CPU", file=sys.stderr)
        sys.exit(2)
    nbs = notebooks(a.only or (['00a_data'] if a.dry_run else None))
    head = ['# tools/gpu-check: every notebook in its GPU profile (`nbdev-test --flags gpu` semantics)', '']
    head += environment() + [
        '', f"**Random weights, SmolLM2-shaped** (FTCOURSE_RANDOM_WEIGHTS=1: the packaged GGUF does not travel): "
        f"run times "
        f"and memory hold for the real models; anything a notebook asserts about answer quality does not, so a failed "
        f"`assert` is recorded in failures.md and the notebook goes on. Up to {a.jobs} notebooks ran at once "
        f"({threads} CPU threads each) and shared the GPU, so each time is an upper bound.",
        f"Started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; notebook budget until +{a.nb_budget:.0f} s, "
        f"whole run {a.budget:.0f} s."]
    report = Report(out, head)
    log('\n'.join(head))
    log('a local hub cache with the random SmolLM2 models: ' + ', '.join(seed_hub_cache(work/'hub')))
    note = 'random weights, SmolLM2-shaped'
    run_notebooks(nbs, a.jobs, min(t_start + a.nb_budget, end - 20), work, report, note)
    if not a.no_bench:
        py = sys.executable
        left = lambda cap: min(cap, end - time.time() - 15)
        cpu = ['--cpu'] if a.dry_run else []
        run_cmd(report, 'NF4 on CUDA: ours vs bitsandbytes', [py, __file__, 'bench-nf4'] + cpu, left(60))
        if not a.dry_run:
            lora = [py, 'bench/lora.py', '--device', 'cuda', '--reps', '5']
            run_cmd(report, 'LoRA vs peft (bench/lora.py)', lora, left(60))
        bf16 = [py, __file__, 'bench-bf16'] + cpu
        run_cmd(report, 'bf16 vs fp32 steps (ftcourse.train, full fine-tune)', bf16, left(90))
        fsdp = ROOT/'tests'/'fsdp_check.py'
        if fsdp.exists() and not a.dry_run:
            torchrun = [py, '-m', 'torch.distributed.run', '--nproc_per_node', '1', str(fsdp)]
            run_cmd(report, 'FSDP check (torchrun, 1 process)', torchrun, left(60))
        else:
            why = 'dry run' if fsdp.exists() else 'absent'
            report.bench('FSDP check', 'tests/fsdp_check.py', 0, f'SKIPPED ({why})', '')
        if not a.dry_run:
            run_cmd(report, 'DPO/ORPO vs trl (bench/dpo_orpo.py)', [py, 'bench/dpo_orpo.py', '--steps', '4'], left(90))
    print('\n' + report.table(), flush=True)
    print(f"gpu-check: done in {time.time()-t_start:.0f} s; files in {out}", flush=True)

# ---------------------------------------------------------------- GPU bench rows
def _timed(f, sync, n=10):
    "Median seconds of `n` calls after two warm-ups."
    import statistics
    for _ in range(2): f()
    sync()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        sync()   # CUDA runs asynchronously: time the work, not its launch
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)

def bench_nf4(cpu:bool):
    "NF4 quantize/dequantize on CUDA: our ftcourse.quant against bitsandbytes' CUDA kernels on the same tensors."
    import torch, bitsandbytes as bnb, bitsandbytes.functional as bnbF
    from ftcourse.quant import quantize_nf4, dequantize_nf4, NF4Linear
    dev = 'cpu' if cpu else 'cuda'
    sync = torch.cuda.synchronize if dev == 'cuda' else (lambda: None)
    n = 1024 if cpu else 8192
    print(f"bitsandbytes {bnb.__version__}, torch {torch.__version__}, device {dev}")
    print('| tensor | double quant | codes equal | dequantized max abs diff | quantize ours ms | bnb ms '
          '| dequantize ours ms | bnb ms |')
    print('|---|---|---|---|---:|---:|---:|---:|')
    g = torch.Generator(device=dev).manual_seed(0)
    for dt in (torch.float32, torch.bfloat16):
        w = (torch.randn(n, n, device=dev, generator=g) * 0.02).to(dt)
        for dq in (False, True):
            q, s = bnbF.quantize_4bit(w, blocksize=64, quant_type='nf4', compress_statistics=dq)
            p, st = quantize_nf4(w, 64, dq)
            eq = (p.reshape(-1) == q.reshape(-1)).float().mean().item()
            diff = (dequantize_nf4(p, st).float() - bnbF.dequantize_4bit(q, s).float()).abs().max().item()
            tq_o = _timed(lambda: quantize_nf4(w, 64, dq), sync)
            tq_b = _timed(lambda: bnbF.quantize_4bit(w, blocksize=64, quant_type='nf4', compress_statistics=dq), sync)
            td_o = _timed(lambda: dequantize_nf4(p, st), sync)
            td_b = _timed(lambda: bnbF.dequantize_4bit(q, s), sync)
            print(f"| {n}x{n} {str(dt).split('.')[1]} | {dq} | {eq:.6f} | {diff:.2e} | {1e3*tq_o:.2f} | "
                  f"{1e3*tq_b:.2f} | "
                  f"{1e3*td_o:.2f} | {1e3*td_b:.2f} |", flush=True)
    # a 4-bit linear layer's forward and backward on a batch of activations: ours (NF4Linear) vs bnb.nn.Linear4bit
    torch.manual_seed(0)
    lin = torch.nn.Linear(n // 2, n // 2, bias=False, device=dev)
    x = torch.randn(16 if cpu else 8192, n // 2, device=dev, dtype=torch.bfloat16, requires_grad=True)
    ours = NF4Linear.from_linear(lin, compress_statistics=True, compute_dtype=torch.bfloat16)
    theirs = bnb.nn.Linear4bit(n // 2, n // 2, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                               quant_type='nf4')
    theirs.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type='nf4',
                                      compress_statistics=True)   # quantized by bitsandbytes when moved to the GPU
    theirs = theirs.to(dev)
    ya, yb = ours(x), theirs(x)
    rel = ((ya.float() - yb.float()).norm() / yb.float().norm()).item()
    def step(m):
        x.grad = None
        m(x).sum().backward()
    t_ours, t_bnb = _timed(lambda: step(ours), sync), _timed(lambda: step(theirs), sync)
    print(f"\nNF4 linear {n//2}x{n//2}, {x.shape[0]} tokens bf16, forward+backward: ours {1e3*t_ours:.2f} ms, "
          f"bnb Linear4bit {1e3*t_bnb:.2f} ms; outputs' relative difference {rel:.2e}")

def bench_bf16(cpu:bool):
    "Full fine-tune steps of the GPU profile's model (random weights) with ftcourse.train: fp32 against bf16 autocast."
    import torch
    os.environ.setdefault('FTCOURSE_RANDOM_WEIGHTS', '1')
    os.environ.setdefault('FTCOURSE_TOKENIZER_DIR', str(TOKENIZER_DIR))
    from ftcourse.core import load_model, load_course_dataset, course_settings
    from ftcourse.sft import sft_dataset, collate_sft, sft_loss_fn
    from ftcourse.train import TrainConfig, train
    s = course_settings('cpu' if cpu else 'cuda')
    name, B, L, steps = (s.model, 2, 64, 2) if cpu else (s.model, s.batch_size, s.max_len, 6)
    rows = load_course_dataset('sft', 'train').select(range(B * steps))
    print(f"{name} (random weights), batch {B} x up to {L} tokens, {steps} optimizer steps, AdamW, on {s.device}")
    print('| precision | s/step (all steps) | peak CUDA memory MiB | last loss |'); print('|---|---:|---:|---:|')
    for mp_ in ('no', 'bf16'):
        model, tok = load_model(name, device=s.device)
        exs, _ = sft_dataset(rows, tok, L, verbose=False)
        if s.device == 'cuda':
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        cfg = TrainConfig(steps=steps, batch_size=B, lr=5e-5, warmup_steps=1, eval_every=0, shuffle=False,
                          progress=False, mixed_precision=mp_)
        t = time.perf_counter()
        h = train(model, sft_loss_fn, exs, cfg, collate_fn=collate_sft(tok))
        if s.device == 'cuda': torch.cuda.synchronize()
        dt = (time.perf_counter() - t) / steps
        peak = torch.cuda.max_memory_allocated() / 2**20 if s.device == 'cuda' else float('nan')
        label = 'fp32' if mp_ == 'no' else 'bf16 autocast'
        print(f"| {label} | {dt:.3f} | {peak:.0f} | {h[-1]['loss']:.3f} |", flush=True)
        del model

def main(argv=None):
    ap = argparse.ArgumentParser(prog='tools/gpu-check', description=__doc__.split('\n')[0])
    sub = ap.add_subparsers(dest='cmd', required=True)
    sub.add_parser('prepare'); sub.add_parser('sizes')
    r = sub.add_parser('run')
    r.add_argument('--dry-run', action='store_true',
                   help='on the CPU: one small notebook (00a_data; or --only) and the CPU-safe bench rows, one job')
    r.add_argument('--only', nargs='*', help='these notebooks only (names or stems)')
    r.add_argument('--jobs', type=int, default=None,
                   help='notebooks at once (default: $GPU_CHECK_JOBS or 6; dry run: 1)')
    r.add_argument('--budget', type=float, default=float(os.environ.get('GPU_CHECK_BUDGET', 520)),
                   help='seconds for the whole run, counted from GPU_CHECK_T0 (the wrapper sets it before the install)')
    r.add_argument('--nb-budget', type=float, default=float(os.environ.get('GPU_CHECK_NB_BUDGET', 360)),
                   help='seconds (from the same start) after which notebooks still running are killed')
    r.add_argument('--no-bench', action='store_true')
    for name in ('bench-nf4', 'bench-bf16'): sub.add_parser(name).add_argument('--cpu', action='store_true')
    a = ap.parse_args(argv)
    if a.cmd == 'prepare': prepare()
    elif a.cmd == 'sizes': sys.exit(check_sizes())
    elif a.cmd == 'run':
        a.jobs = a.jobs or (1 if a.dry_run else int(os.environ.get('GPU_CHECK_JOBS', 6)))
        run(a)
    elif a.cmd == 'bench-nf4': bench_nf4(a.cpu)
    elif a.cmd == 'bench-bf16': bench_bf16(a.cpu)

if __name__ == '__main__': main()
