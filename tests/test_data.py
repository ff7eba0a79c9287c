"The course datasets: rebuilt byte for byte from their seed, validated with errors that name file, row and field."
import hashlib, json
import pytest
from ftcourse.data import (build_course_datasets, load_course_dataset, validate_jsonl, DatasetFormatError, DATA_DIR, judge,
                           make_sft_rows, TASKS)

def test_rebuild_is_byte_identical(tmp_path):
    hashes = build_course_datasets(tmp_path)
    assert len(hashes) == 4
    for name, h in hashes.items():
        assert (tmp_path/name).read_bytes() == (DATA_DIR/name).read_bytes(), name
        assert hashlib.sha256((DATA_DIR/name).read_bytes()).hexdigest() == h

def test_a_different_seed_gives_different_data(tmp_path):
    assert build_course_datasets(tmp_path, seed=1) != build_course_datasets(tmp_path/'b')

@pytest.mark.parametrize('name,split,n', [('sft', 'train', 1000), ('sft', 'test', 200), ('preference', 'train', 1000), ('preference', 'test', 200)])
def test_sizes_and_fields(name, split, n):
    ds = load_course_dataset(name, split)
    assert len(ds) == n
    cols = {'messages', 'task', 'answer'} if name == 'sft' else {'prompt', 'chosen', 'rejected', 'task', 'answer'}
    assert set(ds.column_names) == cols
    assert set(ds['task']) == set(TASKS)   # every task in every split

def test_splits_do_not_overlap():
    q = lambda name, split: {(r['messages'] if 'messages' in r else r['prompt'])[0]['content'] for r in load_course_dataset(name, split)}
    held_out = q('sft', 'test') | q('preference', 'test')
    assert not held_out & q('sft', 'train')           # the SFT model, which later stages start from, never saw a test prompt
    assert not held_out & q('preference', 'train')

def test_rejected_are_plausible_and_wrong():
    for r in load_course_dataset('preference', 'train'):
        c, j = r['chosen'][0]['content'], r['rejected'][0]['content']
        assert judge(r, c) == 1 and judge(r, j) == 0 and c != j
        # the rejected answer has the chosen's sentence, differing only in the answer
        assert c[:len(c) - len(r['answer']) - 1] == j[:len(c) - len(r['answer']) - 1]

BAD = [
    ({'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'a'}]}, None),
    ({'msgs': []}, "row 2: missing field 'messages'"),
    ({'messages': 'hello'}, "row 2: field 'messages' must be a non-empty list"),
    ({'messages': [{'role': 'user', 'content': 'q'}, {'role': 'bot', 'content': 'a'}]}, "row 2: field 'messages', message 1: unknown role 'bot'"),
    ({'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': ''}]}, "row 2: field 'messages', message 1: empty content"),
    ({'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 7}]}, "message 1: 'content' must be a string"),
    ({'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant'}]}, "message 1: missing 'content'"),
    ({'messages': [{'role': 'user', 'content': 'q'}]}, "must end with an assistant message"),
]

@pytest.mark.parametrize('row,err', BAD[1:])
def test_sft_validation_names_file_row_field(tmp_path, row, err):
    f = tmp_path/'mine.jsonl'
    f.write_text(json.dumps(BAD[0][0]) + '\n' + json.dumps(row) + '\n')
    with pytest.raises(DatasetFormatError) as e: load_course_dataset(str(f), kind='sft')
    assert str(f) in str(e.value) and err in str(e.value), str(e.value)

@pytest.mark.parametrize('row,err', [
    ({'prompt': 'q', 'chosen': 'a'}, "missing field 'rejected'"),
    ({'prompt': 'q', 'chosen': 'a', 'rejected': 3}, "field 'rejected' must be a non-empty list"),
    ({'prompt': '  ', 'chosen': 'a', 'rejected': 'b'}, "field 'prompt' is empty"),
    ({'prompt': [{'role': 'user', 'content': 'q'}], 'chosen': [{'role': 'critic', 'content': 'a'}], 'rejected': 'b'}, "unknown role 'critic'"),
])
def test_preference_validation(tmp_path, row, err):
    f = tmp_path/'pref.jsonl'; f.write_text(json.dumps(row) + '\n')
    with pytest.raises(DatasetFormatError) as e: validate_jsonl(f, 'preference')
    assert f"{f}, row 1" in str(e.value) and err in str(e.value)

def test_invalid_json_and_nothing_dropped(tmp_path):
    f = tmp_path/'x.jsonl'; f.write_text(json.dumps(BAD[0][0]) + '\n{not json\n')
    with pytest.raises(DatasetFormatError, match=r'row 2: not valid JSON'): validate_jsonl(f, 'sft')
    f.write_text((json.dumps(BAD[0][0]) + '\n') * 5)
    assert len(load_course_dataset(str(f), kind='sft')) == 5

def test_bad_split_and_kind():
    with pytest.raises(ValueError, match='split'): load_course_dataset('sft', 'validation')
    with pytest.raises(ValueError, match='kind'): validate_jsonl(DATA_DIR/'sft_test.jsonl', 'pretraining')

@pytest.mark.parametrize('resp,want', [('432', 1), ('47 + 385 = 432.', 1), ('The answer is: 432', 1), ('1432', 0),
                                       ('432 or 433', 0), ('I think 433', 0), ('', 0), ('432 is the answer', 0), ('-432', 0)])
def test_judge(resp, want):
    assert judge({'answer': '432'}, resp) == want

def test_generator_is_seeded():
    assert make_sft_rows(24, seed=5) == make_sft_rows(24, seed=5) != make_sft_rows(24, seed=6)
