"""Every chapter's GPU profile fits a 16 GB T4, checked on the CPU (issue 19).

Each chapter declares its heaviest GPU workloads in one place, `ftcourse.core.GPU_WORKLOADS` (model, method,
micro-batch, sequence length, checkpointing, other models held); chapter 4's estimator
(`ftcourse.quant.estimate_training_memory`) turns each into bytes, which must stay under `T4_MARGIN` of the T4's
memory. The GPU profile's `micro_batch_size` is the largest micro-batch with which the course's training shapes fit,
and the chapters must use it where they train on the settings' batch."""
import ast, json, re
from pathlib import Path
import pytest
from ftcourse.core import (GPU_SETTINGS, CPU_SETTINGS, GPU_WORKLOADS, T4_BYTES, T4_MARGIN, Workload, workload_bytes,
                           tiny_tokenizer, load_course_dataset)

ROOT = Path(__file__).resolve().parent.parent
BUDGET = T4_MARGIN * T4_BYTES
G = GPU_SETTINGS

def _src(c) -> str: return ''.join(c['source']) if isinstance(c['source'], list) else c['source']

def _code_cells(nb_path):
    "(index, source) of the notebook's code cells that are not library code (`#| export`)."
    cells = json.loads(nb_path.read_text())['cells']
    def library(c): return re.search(r'^#\|\s*export', _src(c), re.M)
    return [(i, _src(c)) for i, c in enumerate(cells) if c['cell_type'] == 'code' and not library(c)]

@pytest.mark.parametrize('chapter', sorted(GPU_WORKLOADS))
def test_chapter_fits_a_t4(chapter):
    for i, w in enumerate(GPU_WORKLOADS[chapter]):
        e = workload_bytes(w)
        assert e['total'] <= BUDGET, (f"{chapter} workload #{i} ({w}) needs an estimated {e['total'] / 2**30:.1f} GiB, "
                                      f"over {T4_MARGIN:.0%} of a T4's {T4_BYTES / 2**30:.0f} GiB: {e}")

def test_estimate_adds_up():
    "The estimate is the estimator's, plus 4 bytes per parameter of each other model held (float32)."
    from transformers import LlamaConfig
    from ftcourse.core import SMOLLM2_CONFIGS
    from ftcourse.quant import estimate_training_memory, llama_param_counts
    w = Workload('lora', 2, 256, seqs_per_item=2, other_models=(G.model,))
    cfg = LlamaConfig(**SMOLLM2_CONFIGS[G.model])
    alone = estimate_training_memory(cfg, 'lora', 4, 256, lora_r=8)['total']
    assert workload_bytes(w)['total'] == alone + 4 * sum(llama_param_counts(cfg).values())

def test_micro_batch_size_is_the_largest_that_fits():
    "Computed from the estimate: the GPU micro-batch is the largest divisor of the batch with which every shape fits."
    shapes = [dict(method='full'), dict(method='lora'), dict(method='lora', seqs_per_item=2), dict(method='qlora')]
    def fits(m):
        need = [workload_bytes(Workload(micro_batch_size=m, seq_len=G.max_len, **s))['total'] for s in shapes]
        return max(need) <= BUDGET
    divisors = [d for d in range(1, G.batch_size + 1) if G.batch_size % d == 0]
    assert max(d for d in divisors if fits(d)) == G.micro_batch_size
    assert not fits(G.batch_size), "the whole batch fits: micro-batching would not be needed"
    assert CPU_SETTINGS.micro_batch_size == CPU_SETTINGS.batch_size   # on the CPU a step is one forward/backward

def test_ppo_sequences_within_declared_length():
    """Chapter 7's PPO workload declares prompt + response <= its seq_len: the longest prompt of the SFT set, counted in
    bytes (a byte-level BPE token covers at least one byte, so bytes bound SmolLM2's tokens), plus the GPU response."""
    tok = tiny_tokenizer()   # one token per byte, with the default model's chat template
    rows = load_course_dataset('sft', 'train')
    prompts = [tok.apply_chat_template(r['messages'][:-1], add_generation_prompt=True, tokenize=False) for r in rows]
    longest = max(len(p.encode()) for p in prompts)
    ppo = GPU_WORKLOADS['07_ppo'][-1]
    assert longest + G.max_new_tokens * 2 // 3 <= ppo.seq_len, (longest, ppo)

def _trains_on_settings(src:str) -> bool:
    settings = re.search(r'\bs\.(batch_size|max_len|full_steps)\b', src)
    return bool(settings and re.search(r'TrainConfig\(|train_\w+\(|\btrain\(', src))

def test_every_training_chapter_declares_its_workload():
    nbs = sorted((ROOT/'nbs').glob('0*.ipynb'))
    chapters = [p.stem for p in nbs if any(_trains_on_settings(s) for _, s in _code_cells(p))]
    assert chapters, "no chapter trains on the settings?"
    missing = [c for c in chapters if c not in GPU_WORKLOADS]
    assert not missing, f"chapters that train on course_settings() without a GPU_WORKLOADS entry: {missing}"

@pytest.mark.parametrize('chapter', sorted(GPU_WORKLOADS))
def test_chapter_trains_in_micro_batches(chapter):
    "A TrainConfig whose batch comes from the settings takes the settings' micro-batch too: what the workload declares."
    bad = []
    for i, src in _code_cells(ROOT/'nbs'/f'{chapter}.ipynb'):
        try: tree = ast.parse('\n'.join('' if l.lstrip().startswith(('%', '!')) else l for l in src.splitlines()))
        except SyntaxError: continue
        for n in ast.walk(tree):
            if not (isinstance(n, ast.Call) and ast.unparse(n.func).endswith('TrainConfig')): continue
            kw = {k.arg: k.value for k in n.keywords if k.arg}
            if 'batch_size' not in kw or isinstance(kw['batch_size'], ast.Constant): continue   # tiny-model tests
            if 'micro_batch' not in ast.unparse(kw.get('micro_batch_size', ast.Constant(None))):
                bad.append(f"cell {i}: {ast.unparse(n)[:110]}")
    assert not bad, (f"{chapter}: TrainConfig without micro_batch_size=s.micro_batch_size (or s.micro_batch_for(n)); "
                     "on a T4 the whole batch does not fit:\n  " + '\n  '.join(bad))
