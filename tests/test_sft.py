"Masked-label SFT: the example builder, its bad-input policy, the collator, the loss, and equality with trl."
import copy
import pytest, torch
from ftcourse.core import tiny_model, load_model, load_course_dataset
from ftcourse.sft import (build_sft_example, sft_dataset, collate_sft, sft_loss, sft_loss_fn, trl_sft_batch, IGNORE_INDEX,
                          generate_responses, prompt_messages, pad_id, answer_span, preference_dataset, preference_messages, collate_preference)
from ftcourse.data import DatasetFormatError

@pytest.fixture(scope='module')
def tiny(): return tiny_model()

@pytest.fixture(scope='module')
def rows(): return load_course_dataset('sft', 'train').select(range(16))

def test_labels_mask_exactly_the_prompt(tiny, rows):
    m, tok = tiny
    for r in rows:
        ex = build_sft_example(tok, r['messages'], 512)
        prompt = tok.apply_chat_template(r['messages'][:-1], add_generation_prompt=True, tokenize=True, return_dict=True)['input_ids']
        assert ex['labels'][:len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert ex['labels'][len(prompt):] == ex['input_ids'][len(prompt):]
        assert tok.decode(ex['input_ids'][len(prompt):]) == r['messages'][-1]['content'] + '<|im_end|>\n'

def test_too_long_policy_counts_and_reports(tiny, rows):
    m, tok = tiny
    long = dict(messages=[dict(role='user', content='x' * 600), dict(role='assistant', content='y')])
    exs, rep = sft_dataset([rows[0], long, rows[1], long], tok, max_len=256, verbose=False)
    assert len(exs) == rep.kept == 2 and rep.dropped == [1, 3] and 'dropped' in str(rep)
    with pytest.raises(ValueError, match='row 1: the prompt alone is longer'): sft_dataset([rows[0], long], tok, 256, too_long='error')
    # a response that does not fit is truncated and counted, never silently
    r = dict(messages=[dict(role='user', content='q'), dict(role='assistant', content='z' * 600)])
    exs, rep = sft_dataset([r], tok, max_len=256, verbose=False)
    assert rep.truncated == 1 and len(exs[0]['input_ids']) == 256

def test_bad_rows_name_the_row(tiny, rows):
    m, tok = tiny
    empty = dict(messages=[dict(role='user', content='q'), dict(role='assistant', content='   ')])
    with pytest.raises(DatasetFormatError, match=r'row 2: .*empty content'): sft_dataset([rows[0], rows[1], empty], tok)
    with pytest.raises(DatasetFormatError, match='row 0'): sft_dataset([dict(text='hi')], tok)

def test_no_template_no_pad_token_are_clear_errors(tiny, rows):
    m, tok = tiny
    t = copy.deepcopy(tok); t.chat_template = None
    with pytest.raises(ValueError, match='no chat template'): build_sft_example(t, rows[0]['messages'])
    t = copy.deepcopy(tok); t.pad_token = None
    with pytest.raises(ValueError, match='no pad token'): collate_sft(t)

def test_collator_pads_right_and_masks(tiny, rows):
    m, tok = tiny
    exs, _ = sft_dataset(rows, tok, 512, verbose=False)
    b = collate_sft(tok)(exs)
    lens = torch.tensor([len(e['input_ids']) for e in exs])
    assert torch.equal(b['attention_mask'].sum(1), lens)
    for i, n in enumerate(lens):
        assert (b['labels'][i, n:] == IGNORE_INDEX).all() and (b['input_ids'][i, n:] == pad_id(tok)).all()

def test_loss_equals_transformers_and_ignores_masked_positions(tiny, rows):
    m, tok = tiny
    b = collate_sft(tok)(sft_dataset(rows, tok, 512, verbose=False)[0])
    with torch.no_grad():
        out = m(**b)
        assert torch.allclose(sft_loss(out.logits, b['labels']), out.loss, rtol=1e-6, atol=0)
        # changing the logits at masked positions does not change the loss
        logits = out.logits.clone(); masked = b['labels'][:, 1:] == IGNORE_INDEX
        logits[:, :-1][masked] += torch.randn_like(logits[:, :-1][masked]) * 10
        assert torch.equal(sft_loss(logits, b['labels']), sft_loss(out.logits, b['labels']))

def test_loss_fn_over_the_answer_span_equals_every_position(tiny, rows):
    "sft_loss_fn computes logits only over the answer span: the same loss and gradients as the full logits (fp32, 1e-5/1e-6)."
    m, tok = tiny
    b = collate_sft(tok)(sft_dataset(rows.select(range(6)), tok, verbose=False)[0])
    lo, hi = answer_span(b['labels'])
    assert 0 < lo < hi <= b['input_ids'].shape[1] - 1                   # the prompt's positions are skipped
    def run(fn):
        m.zero_grad()
        loss = fn(); loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in m.parameters()])
    (ls, gs) = run(lambda: sft_loss_fn(m, b)[0])
    (lf, gf) = run(lambda: sft_loss(m(input_ids=b['input_ids'], attention_mask=b['attention_mask']).logits, b['labels']))
    assert ls == pytest.approx(lf, rel=1e-5) and torch.allclose(gs, gf, atol=1e-6)
    # a micro-batch with nothing to learn (a process's share can be all masked): loss 0, gradients 0, every weight reached
    masked = dict(b, labels=torch.full_like(b['labels'], IGNORE_INDEX))
    m.zero_grad()
    loss, metrics = sft_loss_fn(m, masked); loss.backward()
    assert loss.item() == 0 and metrics['n_items'] == 0
    assert all(p.grad is not None and not p.grad.any() for p in m.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match='every label is -100'): answer_span(masked['labels'])


@pytest.mark.parametrize('which', ['tiny', 'real'])
def test_same_labels_and_loss_as_trl(tiny, rows, which):
    m, tok = tiny if which == 'tiny' else load_model()
    max_len = 512 if which == 'tiny' else 128
    trl_b, trainer = trl_sft_batch(rows, tok, m, max_len)
    ours = collate_sft(tok)(sft_dataset(rows, tok, max_len, verbose=False)[0])
    for k in ('input_ids', 'labels', 'attention_mask'): assert torch.equal(ours[k], trl_b[k]), k
    with torch.no_grad():
        l_trl = trainer.compute_loss(m, dict(trl_b)); l_ours, met = sft_loss_fn(m, ours)
    # trl's fused LM head sums the log-softmax in another order: a few parts in a million
    assert torch.allclose(l_trl, l_ours, rtol=2e-5, atol=0)
    assert met['n_items'] == int((ours['labels'][:, 1:] != IGNORE_INDEX).sum())

def test_generate_responses_answers_every_row_and_restores_padding_side(tiny, rows):
    m, tok = tiny
    side = tok.padding_side
    convs = [prompt_messages(r) for r in rows.select(range(4))]
    out = generate_responses(m, tok, convs, max_new_tokens=4, batch_size=3)
    assert len(out) == 4 and all(isinstance(a, str) for a in out) and tok.padding_side == side

def test_preference_pairs_are_two_sft_examples_and_drop_whole(tiny):
    m, tok = tiny
    prefs = load_course_dataset('preference', 'train').select(range(8))
    pairs, rep = preference_dataset(prefs, tok, max_len=512, verbose=False)
    assert rep.kept == len(pairs) == 8
    for r, p in zip(prefs, pairs):
        c = build_sft_example(tok, r['prompt'] + r['chosen'], 512)
        assert (p['chosen_input_ids'], p['chosen_labels']) == (c['input_ids'], c['labels'])
        assert tok.decode([t for t, l in zip(p['rejected_input_ids'], p['rejected_labels']) if l != IGNORE_INDEX]) == r['rejected'][0]['content'] + '<|im_end|>\n'
    b = collate_preference(tok)(pairs[:3])
    assert b['input_ids'].shape[0] == 6
    for i, p in enumerate(pairs[:3]):   # chosen rows first, then rejected, each right-padded and masked
        for row, k in ((i, 'chosen'), (i + 3, 'rejected')):
            n = len(p[f'{k}_input_ids'])
            assert b['input_ids'][row, :n].tolist() == p[f'{k}_input_ids'] and b['attention_mask'][row].sum() == n
            assert (b['labels'][row, n:] == IGNORE_INDEX).all()
    # a pair that does not fit whole is dropped and counted under its reason, never cut
    long_answer = dict(prefs[0], rejected=[dict(role='assistant', content='y' * 600)])
    long_prompt = dict(prefs[1], prompt=[dict(role='user', content='x' * 600)])
    pairs, rep = preference_dataset([long_answer, prefs[2], long_prompt], tok, max_len=256, verbose=False)
    assert rep.kept == 1 and rep.response_too_long == [0] and rep.prompt_too_long == [2] and '2 dropped' in str(rep)
    with pytest.raises(DatasetFormatError, match='row 0'): preference_dataset([dict(prefs[0], chosen=[])], tok, verbose=False)

def test_text_form_preference_rows(tiny, tmp_path):
    "Text prompt and answers (trl's format, which validation accepts): one user turn and one assistant turn each."
    import json
    m, tok = tiny
    prefs = load_course_dataset('preference', 'train').select(range(3))
    text = [{k: r[k][0]['content'] for k in ('prompt', 'chosen', 'rejected')} for r in prefs]
    assert preference_messages(text[0]) == (prefs[0]['prompt'], prefs[0]['chosen'], prefs[0]['rejected'])
    mixed = dict(prefs[1], chosen=text[1]['chosen'])                  # messages and text in one row
    ours, rep = preference_dataset(text + [mixed], tok, verbose=False)
    want, _ = preference_dataset(list(prefs) + [prefs[1]], tok, verbose=False)
    assert rep.kept == 4 and ours == want
    # through a JSONL file, as a user would bring them: validation and tokenization agree
    f = tmp_path/'pairs.jsonl'
    f.write_text(''.join(json.dumps(r) + '\n' for r in text))
    assert preference_dataset(load_course_dataset(str(f), kind='preference'), tok, verbose=False)[0] == want[:3]
    with pytest.raises(DatasetFormatError, match='row 1'):
        preference_dataset([text[0], dict(text[1], rejected='  ')], tok, verbose=False)

LLAMA3_TEMPLATE = ("{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
                   " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
                   "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

def test_llama3_template_needs_and_gets_a_split_boundary(rows):
    tok = load_model()[1]   # the course tokenizer: its merges split '\n\n' before text (the tiny one has no merges)
    lt = copy.deepcopy(tok)
    lt.add_special_tokens({'bos_token': '<|begin_of_text|>', 'eos_token': '<|eot_id|>',
                           'additional_special_tokens': ['<|start_header_id|>', '<|end_header_id|>']})
    lt.chat_template = LLAMA3_TEMPLATE
    chat = [dict(role='user', content='What is 7 times 6?'), dict(role='assistant', content='42')]
    with pytest.raises(ValueError, match='not a prefix'): build_sft_example(lt, chat)   # '\n\n' merges differently before '42'
    ex = build_sft_example(lt, chat, boundary='split')
    prompt = lt.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=True, return_dict=True)['input_ids']
    assert ex['input_ids'][:len(prompt)] == list(prompt) and ex['labels'][:len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert lt.decode(ex['labels'][len(prompt):]) == '42<|eot_id|>'
    exs, _ = sft_dataset(rows, lt, 512, boundary='split', verbose=False)
    for e, r in zip(exs, rows):
        assert lt.decode([t for t, l in zip(e['input_ids'], e['labels']) if l != IGNORE_INDEX]) == r['messages'][-1]['content'] + '<|eot_id|>'
    # with ChatML both boundaries agree; an unknown one is refused
    assert all(build_sft_example(tok, r['messages']) == build_sft_example(tok, r['messages'], boundary='split') for r in rows)
    with pytest.raises(ValueError, match="boundary must be"): build_sft_example(tok, rows[0]['messages'], boundary='guess')

def test_packing_equals_padding_and_refuses_a_long_example(tiny, rows):
    from ftcourse.sft import pack_examples, collate_packed, packed_sft_loss_fn
    m, tok = tiny
    exs, _ = sft_dataset(rows.select(range(8)), tok, verbose=False)
    packed_rows = pack_examples(exs, 256)
    assert len(packed_rows) < len(exs) and all(len(r['input_ids']) <= 256 for r in packed_rows)
    assert [t for r in packed_rows for t in r['input_ids']] == [t for e in exs for t in e['input_ids']]   # order kept
    def loss_and_grads(loss_fn, b):
        m.zero_grad()
        loss, _ = loss_fn(m, b)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in m.parameters()])
    l1, g1 = loss_and_grads(sft_loss_fn, collate_sft(tok)(exs))
    l2, g2 = loss_and_grads(packed_sft_loss_fn, collate_packed(tok)(packed_rows))
    assert abs(l1 - l2) < 1e-5 and torch.allclose(g1, g2, atol=1e-6)
    short, long = sorted(exs[:2], key=lambda e: len(e['input_ids']))
    with pytest.raises(ValueError, match='example 1 has'): pack_examples([short, long], len(long['input_ids']) - 1)
