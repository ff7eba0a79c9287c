"Statistics of ftcourse.evaluate against scipy and exact arithmetic; judged and sampled evaluation on the tiny model."
import math
from fractions import Fraction
import numpy as np, pytest, torch
from ftcourse.core import tiny_model
from ftcourse.sft import chat_ids
from ftcourse.evaluate import (wilson_interval, paired_test, pass_at_k, JudgeResult, judge_eval, compare, compare_table,
                               task_table, plot_scores, sample_responses, sampled_eval)

stats = pytest.importorskip('scipy.stats')   # scipy only proves the formulas; the package does not need it

ROWS = [dict(messages=[dict(role='user', content=q), dict(role='assistant', content=a)], task=t, answer=a)
        for q, a, t in [('What is 2 + 2?', '4', 'add'), ('Is 7 even or odd?', 'odd', 'parity'),
                        ('What is 10 + 5?', '15', 'add'), ('Capital of France?', 'Paris', 'capital')]]

def test_wilson_matches_scipy():
    rng = np.random.default_rng(0)
    for _ in range(500):
        n = int(rng.integers(1, 3000))
        s, conf = int(rng.integers(0, n + 1)), float(rng.uniform(0.5, 0.999))
        ref = stats.binomtest(s, n).proportion_ci(conf, method='wilson')
        low, high = wilson_interval(s, n, conf)
        assert abs(low - ref.low) < 1e-9 and abs(high - ref.high) < 1e-9

def test_wilson_by_hand_and_ends():
    low, high = wilson_interval(18, 48)
    assert abs(low - 0.2522) < 5e-5 and abs(high - 0.5164) < 5e-5
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0

@pytest.mark.parametrize('args', [(0, 0), (1, 0), (5, 4), (-1, 4), (1.5, 4), (1, 4, 0.0), (1, 4, 1.0)])
def test_wilson_bad_input(args):
    with pytest.raises(ValueError): wilson_interval(*args)

def test_mcnemar_matches_scipy():
    rng = np.random.default_rng(1)
    for _ in range(500):
        n = int(rng.integers(1, 300))
        a = rng.random(n) < rng.random()
        b = np.where(rng.random(n) < rng.random(), a, rng.random(n) < rng.random())
        w, l = int((~a & b).sum()), int((a & ~b).sum())
        ours = paired_test(a.astype(int).tolist(), b.astype(int).tolist())
        if w + l == 0: assert ours == 1.0
        else: assert ours == pytest.approx(stats.binomtest(w, w + l, 0.5).pvalue, rel=1e-9)

def test_mcnemar_by_hand_and_bad_input():
    a, b = [1] + [0] * 7 + [1] * 10, [0] + [1] * 7 + [1] * 10
    assert paired_test(a, b) == 18 / 256 == paired_test(b, a)
    assert paired_test([0, 1], [0, 1]) == 1.0 and paired_test([1.0, 0.0], [0, 0]) == 1.0
    with pytest.raises(ValueError, match='same rows'): paired_test([1, 0], [1])
    with pytest.raises(ValueError, match='only 0 and 1'): paired_test([2, 0], [1, 0])

def test_pass_at_k_exact_and_monte_carlo():
    for n in range(1, 31):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                assert abs(pass_at_k(n, c, k) - float(exact)) < 1e-12
    rng = np.random.default_rng(2)
    n, c, k, draws = 20, 3, 5, 20_000
    hits = np.mean([rng.permutation(n)[:k].min() < c for _ in range(draws)])
    p = pass_at_k(n, c, k)
    assert abs(hits - p) < 4 * math.sqrt(p * (1 - p) / draws)
    assert pass_at_k(10, 0, 3) == 0.0 and pass_at_k(10, 8, 3) == 1.0 and pass_at_k(10, 3, 1) == pytest.approx(0.3, abs=1e-15)
    assert 0 < pass_at_k(100_000, 1, 50_000) < 1                # no overflow where C(n, k) has no float

@pytest.mark.parametrize('args', [(5, 6, 1), (5, 2, 6), (5, 2, 0), (0, 0, 1), (5, -1, 1), (5, 2.5, 1)])
def test_pass_at_k_bad_input(args):
    with pytest.raises(ValueError): pass_at_k(*args)

def test_judge_result_compare_and_tables():
    base = JudgeResult([1, 0, 0, 1], ['a'] * 4, ['x', 'x', 'y', 'y'])
    new = JudgeResult([1, 1, 1, 0], ['b'] * 4, ['x', 'x', 'y', 'y'])
    assert (base.n, base.successes, base.score) == (4, 2, 0.5) and base.interval() == wilson_interval(2, 4)
    pt = new.per_task()
    assert list(pt.columns) == ['task', 'n', 'correct', 'score', 'low', 'high'] and list(pt['score']) == [1.0, 0.5]
    c = compare(base, new)
    assert (c['wins'], c['losses'], c['diff'], c['p']) == (2, 1, 0.25, paired_test(base.correct, new.correct))
    t = compare_table({'base': base, 'new': new}, 'base')
    assert math.isnan(t.loc['base', 'p']) and t.loc['new', 'p'] == c['p'] and t.loc['new', 'wins'] == 2
    assert list(task_table({'base': base, 'new': new}).columns) == ['n', 'base', 'new']
    assert plot_scores({'base': base, 'new': new}) is not None
    with pytest.raises(ValueError, match='same rows'): compare(base, JudgeResult([1], ['a'], ['x']))
    with pytest.raises(ValueError, match='baseline'): compare_table({'base': base}, 'nope')
    with pytest.raises(ValueError, match='one entry per row'): JudgeResult([1, 0], ['a'], ['x', 'y'])

def test_judge_eval_tiny_under_autocast():
    model, tok = tiny_model()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        r = judge_eval(model, tok, ROWS, max_new_tokens=6, batch_size=3)
    assert r.n == len(r.responses) == len(r.tasks) == 4 and set(r.correct) <= {0, 1}
    assert r.tasks == [row['task'] for row in ROWS] and sorted(r.per_task()['task']) == ['add', 'capital', 'parity']
    with pytest.raises(ValueError, match="no 'answer'"): judge_eval(model, tok, [dict(messages=ROWS[0]['messages'], task='add')])
    with pytest.raises(ValueError, match='at least one row'): judge_eval(model, tok, [])

def test_sample_responses_seeded_with_ids():
    model, tok = tiny_model()
    convs = [row['messages'][:1] for row in ROWS[:3]]
    texts, ids = sample_responses(model, tok, convs, 3, max_new_tokens=8, seed=0, batch_size=4, return_ids=True)
    assert texts == sample_responses(model, tok, convs, 3, max_new_tokens=8, seed=0, batch_size=4)
    assert texts != sample_responses(model, tok, convs, 3, max_new_tokens=8, seed=1, batch_size=4)
    assert [len(t) for t in texts] == [3, 3, 3] and [len(i) for i in ids] == [3, 3, 3]
    for conv, answers, pairs in zip(convs, texts, ids):
        for text, (prompt_ids, completion_ids) in zip(answers, pairs):
            assert prompt_ids == chat_ids(tok, conv, add_generation_prompt=True)
            assert 1 <= len(completion_ids) <= 8 and tok.eos_token_id not in completion_ids[:-1]
            assert tok.decode(completion_ids, skip_special_tokens=True).strip() == text
    with pytest.raises(ValueError, match='temperature'): sample_responses(model, tok, convs, 2, temperature=0)
    with pytest.raises(ValueError, match='n_samples'): sample_responses(model, tok, convs, 0)

def test_sampled_eval_tiny():
    model, tok = tiny_model()
    out = sampled_eval(model, tok, ROWS, k=3, max_new_tokens=6, seed=0)
    assert out['n'] == 4 and out['k'] == 3 and len(out['counts']) == 4 and all(0 <= c <= 3 for c in out['counts'])
    assert out['pass@1'] == pytest.approx(np.mean(out['counts']) / 3)
    assert out['pass@k'] == pytest.approx(np.mean([c > 0 for c in out['counts']]))
    lo, hi = out['pass@1_interval']
    assert 0 <= lo <= out['pass@1'] <= hi <= 1 and list(out['pass_at']) == [1, 2, 3]
    assert list(out['per_task']['task']) == ['add', 'capital', 'parity']

def test_judge_eval_caches_answers_by_weights_and_settings(monkeypatch, tmp_path):
    "A second evaluation of the same weights, rows and settings reuses the answers, batch by batch; any change generates afresh."
    import ftcourse.evaluate as ev
    monkeypatch.setenv('FTCOURSE_CACHE', str(tmp_path))
    model, tok = tiny_model()
    first = judge_eval(model, tok, ROWS, max_new_tokens=6, batch_size=3)
    assert len(list((tmp_path/'answers').glob('*.json'))) == 2          # one file per batch: rows 0-2 and row 3
    def no_generation(*a, **k): raise AssertionError('generated again')
    monkeypatch.setattr(ev, 'generate_responses', no_generation)
    again = judge_eval(model, tok, ROWS, max_new_tokens=6, batch_size=3)
    assert (again.correct, again.responses) == (first.correct, first.responses)
    head = judge_eval(model, tok, ROWS[:3], max_new_tokens=6, batch_size=3)   # the first batch alone: read, not generated
    assert head.responses == first.responses[:3]
    for change in (dict(max_new_tokens=5), dict(batch_size=2)):
        with pytest.raises(AssertionError, match='generated again'): judge_eval(model, tok, ROWS, **dict(dict(max_new_tokens=6, batch_size=3), **change))
    with torch.autocast('cpu', dtype=torch.bfloat16), pytest.raises(AssertionError, match='generated again'):
        judge_eval(model, tok, ROWS, max_new_tokens=6, batch_size=3)
    with pytest.raises(AssertionError, match='generated again'): judge_eval(model, tok, ROWS, max_new_tokens=6, batch_size=3, cache=False)
    with torch.no_grad(): next(model.parameters()).view(-1)[0] += 1e-3    # one weight moved: another model
    with pytest.raises(AssertionError, match='generated again'): judge_eval(model, tok, ROWS, max_new_tokens=6, batch_size=3)

def test_weights_digest_counts_switched_off_adapters_as_their_base():
    "The model with adapters switched off computes its base: same digest as the plain model; switched on, another one."
    from ftcourse.evaluate import weights_digest
    from ftcourse.lora import apply_lora, adapters_disabled
    model, _ = tiny_model()
    plain = weights_digest(model)
    apply_lora(model, r=4, alpha=8, target_modules='all-linear')
    assert weights_digest(model) != plain
    with adapters_disabled(model): assert weights_digest(model) == plain
    with torch.no_grad(): model.model.layers[0].self_attn.q_proj.base.weight[0, 0] += 1e-3   # the base itself changed
    with adapters_disabled(model): assert weights_digest(model) != plain
