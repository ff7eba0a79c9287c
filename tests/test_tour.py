"The tour's report: intervals, paired tests against the SFT model and per-task scores, from per-row results."
import json
from ftcourse.evaluate import paired_test, wilson_interval
from ftcourse.tour import significance_rows, task_rows, write_report

def _policy(method, correct, wins):
    tasks = ['add', 'sub'] * (len(correct) // 2)
    return dict(method=method, judge=sum(correct) / len(correct), judge_correct=correct, tasks=tasks,
                answers=[f'a{i}' for i in range(len(correct))], pref_accuracy=sum(wins) / len(wins), pref_wins=wins,
                answer_tokens=3.0, kl=0.1, trainable_params=10, steps=2, train_seconds=1.0, peak_mb=None)

def _rows():
    sft = _policy('sft', [1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0], [1, 0, 1, 0, 1, 0, 0, 0])
    dpo = _policy('dpo', [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1, 1, 0])
    start = _policy('start', [0] * 12, [0] * 8)
    return [start, sft, dict(method='reward', rm_accuracy=0.75, rm_margin=1.0, trainable_params=5, steps=2, train_seconds=1.0,
                             peak_mb=None), dpo]

def test_significance_rows_compare_each_policy_with_sft_on_the_same_rows():
    rows = _rows()
    sig = {r['method']: r for r in significance_rows(rows)}
    assert set(sig) == {'start', 'sft', 'dpo'}                     # the reward model is not a policy
    assert sig['sft']['judge_p'] is None and sig['sft']['judge_diff'] == 0
    assert sig['dpo']['judge_p'] == paired_test(rows[1]['judge_correct'], rows[3]['judge_correct'])
    assert sig['dpo']['pref_p'] == paired_test(rows[1]['pref_wins'], rows[3]['pref_wins'])
    low, high = wilson_interval(11, 12)
    assert sig['dpo']['judge'] == f"{11 / 12:.3f} [{low:.3f}, {high:.3f}]"
    assert abs(sig['dpo']['judge_diff'] - (11 - 2) / 12) < 1e-12

def test_task_rows_and_report(tmp_path):
    rows = _rows()
    tasks, per_task = task_rows(rows)
    assert tasks == ['add', 'sub'] and per_task['sft'] == {'add': 2 / 6, 'sub': 0.0}
    hists = {'sft': [dict(step=1, loss=2.0), dict(step=2, loss=1.5)], 'dpo': [dict(step=1, loss=0.7), dict(step=2, loss=0.6)]}
    sft_rows = [dict(messages=[dict(role='user', content=f'q{i}')], answer='1') for i in range(12)]
    write_report(tmp_path, rows, hists, sft_rows, dict(model='m', n_eval=12, quick=False, seconds=60.0, device='cpu'))
    md = (tmp_path/'report.md').read_text()
    assert '## Against the SFT model, with 95% intervals' in md and '## Judge score per task' in md
    assert '| dpo | 0.917 [' in md and '| add | 6 |' in md
    saved = json.loads((tmp_path/'report.json').read_text())
    assert [r['method'] for r in saved['against_sft']] == ['start', 'sft', 'dpo']
    assert (tmp_path/'metrics.png').exists() and (tmp_path/'training.png').exists()
