"""Reward modeling: last-token pooling (left and right padding) equal to transformers' sequence-classification head, the
Bradley–Terry loss and metrics equal to trl's RewardTrainer (with and without margins, gradients too), the pipeline, and
the training entry point."""
import copy, tempfile
import pytest, torch, torch.nn.functional as F
from datasets import Dataset
from transformers import LlamaForSequenceClassification
from ftcourse.core import tiny_model, load_course_dataset, set_seed
from ftcourse.lora import apply_lora
from ftcourse.sft import preference_dataset, collate_preference
from ftcourse.train import TrainConfig
from ftcourse.reward import (last_token_index, RewardModel, reward_loss, pair_metrics, reward_loss_fn, collate_pairs, split_pairs,
                             pair_len, score_pairs, reward_metrics, score_responses, train_reward)

@pytest.fixture(scope='module')
def rows(): return list(load_course_dataset('preference', 'train').select(range(24)))

def twin(seed=0):
    "A LlamaForSequenceClassification on a tiny random Llama, and our RewardModel sharing its backbone and head."
    causal, tok = tiny_model(seed)
    cfg = copy.deepcopy(causal.config); cfg.num_labels = 1
    set_seed(seed); sc = LlamaForSequenceClassification(cfg).eval()
    sc.model.load_state_dict(causal.model.state_dict())
    with torch.no_grad(): sc.score.weight.normal_(0, 0.5)          # a head that gives rewards of order 1
    rm = RewardModel(sc.model, cfg.hidden_size); rm.head.weight = sc.score.weight
    return sc, rm, tok

def test_last_token_index():
    m = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [0, 1, 1, 1], [1, 0, 0, 0]])
    assert last_token_index(m).tolist() == [1, 3, 3, 0]

@pytest.mark.parametrize('side', ['right', 'left'])
def test_pooling_equals_transformers_seqcls(rows, side):
    sc, rm, tok = twin()
    exs, _ = preference_dataset(rows[:8], tok, 256, verbose=False)
    b = collate_preference(tok, side)(exs)
    assert (b['attention_mask'] == 0).any()                          # the batch really is padded
    pos = (b['attention_mask'].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        hf = sc(b['input_ids'], attention_mask=b['attention_mask'], position_ids=pos).logits.squeeze(-1)
        ours = rm(b['input_ids'], b['attention_mask'])
        alone = torch.cat([rm(torch.tensor([e[k]])) for k in ('chosen_input_ids', 'rejected_input_ids') for e in exs])
    torch.testing.assert_close(ours, hf, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours, alone, atol=1e-5, rtol=1e-5)      # padding does not change a reward
    if side == 'right':                                              # with right padding transformers needs no position ids
        with torch.no_grad(): torch.testing.assert_close(sc(b['input_ids'], attention_mask=b['attention_mask']).logits.squeeze(-1), ours, atol=1e-6, rtol=1e-5)

def test_naive_last_position_is_wrong_under_right_padding(rows):
    sc, rm, tok = twin()
    exs, _ = preference_dataset(rows[:8], tok, 256, verbose=False)
    b = collate_preference(tok)(exs)
    with torch.no_grad():
        h = rm.backbone(input_ids=b['input_ids'], attention_mask=b['attention_mask']).last_hidden_state
        naive = rm.head(h[:, -1]).squeeze(-1)
        ours = rm(b['input_ids'], b['attention_mask'])
    padded = b['attention_mask'][:, -1] == 0
    assert not torch.allclose(naive[padded], ours[padded], atol=1e-4)

def trl_step(sc, tok, exs, margins=None):
    from trl import RewardTrainer, RewardConfig
    cols = dict(chosen_ids=[e['chosen_input_ids'] for e in exs], rejected_ids=[e['rejected_input_ids'] for e in exs])
    if margins is not None: cols['margin'] = margins
    with tempfile.TemporaryDirectory() as d:
        args = RewardConfig(output_dir=d, use_cpu=True, bf16=False, report_to=[], per_device_train_batch_size=len(exs))
        tr = RewardTrainer(model=sc, args=args, train_dataset=Dataset.from_dict(cols), processing_class=tok)
        batch = tr.data_collator([tr.train_dataset[i] for i in range(len(exs))])
        sc.train(); loss = tr.compute_loss(sc, batch)
        return batch, loss, {k: v[-1] for k, v in tr._metrics['train'].items()}

@pytest.mark.parametrize('margins', [None, [0.0, 0.5, 1.0, 0.25, 0.0, 2.0]])
def test_loss_metrics_and_gradients_equal_trl(rows, margins):
    sc, rm, tok = twin()
    exs, _ = preference_dataset(rows[:6], tok, 256, verbose=False)
    tb, tloss, tm = trl_step(sc, tok, exs, margins)
    tloss.backward(); tgrad = {n: p.grad.clone() for n, p in rm.named_parameters() if p.grad is not None}
    rm.zero_grad()
    ob = collate_pairs(tok)(exs)
    if margins is not None: ob['margin'] = torch.tensor(margins)
    assert torch.equal(tb['input_ids'], ob['input_ids']) and torch.equal(tb['attention_mask'], ob['attention_mask'])
    oloss, om = reward_loss_fn(rm, ob)
    oloss.backward()
    torch.testing.assert_close(oloss, tloss, atol=1e-6, rtol=1e-6)
    assert om['accuracy'] == pytest.approx(tm['accuracy'], abs=1e-7) and om['margin'] == pytest.approx(tm['margin'], abs=1e-6)
    assert 0 < om['accuracy'] < 1                                    # a case where the metric is informative
    assert om['n_items'] == len(exs)
    for n, p in rm.named_parameters():
        torch.testing.assert_close(p.grad, tgrad[n], atol=1e-6, rtol=1e-4)

def test_loss_by_hand_margin_and_stability():
    c, r = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 3.0])
    by_hand = -(torch.log(torch.sigmoid(torch.tensor([1.0, 0.0, -4.0])))).mean()
    torch.testing.assert_close(reward_loss(c, r), by_hand)
    torch.testing.assert_close(reward_loss(c, r, margin=0.5), -torch.log(torch.sigmoid(c - r - 0.5)).mean())
    assert reward_loss(torch.tensor([-300.]), torch.tensor([0.])).item() == 300.0       # log σ computed stably
    m = pair_metrics(c, r)
    assert m['accuracy'] == pytest.approx(1 / 3) and m['margin'] == -1.0                # the tie counts as wrong
    # the four keys chapter 8 reports for DPO's implicit rewards too
    assert pair_metrics(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])) == dict(chosen_reward=0.5, rejected_reward=-0.5,
                                                                                    accuracy=0.5, margin=1.0)

def test_split_sorts_only_validation(rows):
    _, tok = tiny_model()
    exs, _ = preference_dataset(rows, tok, 256, verbose=False)
    tr, val = split_pairs(exs, 8, seed=1)
    assert len(tr) == 16 and len(val) == 8
    assert [pair_len(e) for e in val] == sorted((pair_len(e) for e in val), reverse=True)
    assert [pair_len(e) for e in tr] != sorted((pair_len(e) for e in tr), reverse=True)  # training order stays shuffled
    ids = lambda xs: {tuple(e['chosen_input_ids']) for e in xs}
    assert not ids(tr) & ids(val) and ids(tr) | ids(val) == ids(exs)
    assert split_pairs(exs, 8, seed=1) == (tr, val)
    with pytest.raises(ValueError): split_pairs(exs, len(exs))

def test_filtering_counts(rows):
    _, tok = tiny_model()
    long = dict(rows[0], chosen=[dict(role='assistant', content='x' * 300)])
    exs, rep = preference_dataset([rows[0], long, rows[1]], tok, 200, verbose=False)
    assert len(exs) == rep.kept == 2 and rep.response_too_long == [1]

def test_micro_batches_weighted_by_pairs(rows):
    "The loop weights micro-batches by `count_items` = pairs: the weighted micro-batch gradient equals the full batch's."
    from ftcourse.train import count_items
    sc, rm, tok = twin()
    exs, _ = preference_dataset(rows[:4], tok, 256, verbose=False)
    col = collate_pairs(tok)
    def grads(parts, weigh=True):
        rm.zero_grad(); n = sum(count_items(col(p)) for p in parts)
        for p in parts: (reward_loss_fn(rm, col(p))[0] * (count_items(col(p)) / n if weigh else 1 / len(parts))).backward()
        return torch.cat([p.grad.flatten() for p in rm.parameters()])
    assert [count_items(col(exs[:k])) for k in (1, 3)] == [1, 3]
    g_micro, g_full = grads([exs[:1], exs[1:]]), grads([exs])
    assert (g_micro - g_full).norm() / g_full.norm() < 1e-4           # float rounding (different padding)
    assert (grads([exs[:1], exs[1:]], weigh=False) - g_full).norm() / g_full.norm() > 1e-2   # a mean of means is not
    losses = []
    for mb in (None, 1):                                             # and the loop reports the same loss either way
        causal, tok = tiny_model(); apply_lora(causal, r=4, alpha=8, target_modules='all-linear')
        cfg = TrainConfig(steps=1, batch_size=4, micro_batch_size=mb, eval_every=0, progress=False, shuffle=False,
                          mixed_precision='no')                       # the two runs are compared: fp32 on every CPU
        losses.append(train_reward(causal, tok, rows[:4], cfg=cfg, verbose=False)[-1]['loss'])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)

def test_train_reward_learns_and_save_load(rows, tmp_path):
    causal, tok = tiny_model(); apply_lora(causal, r=4, alpha=8, target_modules='all-linear')
    # fp32: the loop leaves a bf16 run's forward under autocast, and the reloaded copy is compared bit for bit
    cfg = TrainConfig(steps=12, batch_size=4, lr=3e-3, warmup_steps=0, eval_every=6, progress=False, mixed_precision='no')
    h = train_reward(causal, tok, rows, cfg=cfg, val_size=6, verbose=False)
    rm = h.reward_model
    assert isinstance(rm, RewardModel) and rm.head.weight.requires_grad
    assert [r['step'] for r in h if 'eval_accuracy' in r] == [0, 6, 12]
    assert h.series('loss')[1][-1] < h.series('loss')[1][0]          # it fits the training pairs
    m = reward_metrics(rm, tok, rows[:6])
    assert set(m) >= {'accuracy', 'margin', 'loss', 'chosen', 'rejected'} and len(m['chosen']) == 6
    rm.save(tmp_path/'rm.safetensors')
    c2, _ = tiny_model(); apply_lora(c2, r=4, alpha=8, target_modules='all-linear')
    rm2 = RewardModel.from_causal_lm(c2).load(tmp_path/'rm.safetensors')
    exs, _ = preference_dataset(rows[:4], tok, 256, verbose=False)
    a, b = score_pairs(rm, exs, tok), score_pairs(rm2, exs, tok)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c3, _ = tiny_model()                                              # no LoRA layers: the names do not match
    with pytest.raises(KeyError): RewardModel.from_causal_lm(c3).load(tmp_path/'rm.safetensors')

def test_reward_metrics_in_row_order_and_score_responses(rows):
    "reward_metrics scores longest first but returns every pair's rewards in row order; score_responses scores the same conversations alike."
    sc, rm, tok = twin()
    rows = rows[:10]
    m = reward_metrics(rm, tok, rows, batch_size=3)
    exs, _ = preference_dataset(rows, tok, 256, verbose=False)
    one = [score_pairs(rm, [e], tok) for e in exs]                    # each pair alone: no padding, no reordering
    torch.testing.assert_close(torch.tensor(m['chosen']), torch.cat([c for c, _ in one]), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(m['rejected']), torch.cat([r for _, r in one]), atol=1e-5, rtol=0)
    assert m['accuracy'] == pytest.approx(sum(c > r for c, r in zip(m['chosen'], m['rejected'])) / len(rows))
    assert {'chosen_reward', 'rejected_reward', 'accuracy', 'margin', 'loss', 'n'} <= m.keys()
    texts = [r['chosen'][0]['content'] for r in rows]
    torch.testing.assert_close(score_responses(rm, tok, rows, texts, batch_size=4), torch.tensor(m['chosen']), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match='one response per row'): score_responses(rm, tok, rows, texts[:3])
    rm.train(); score_responses(rm, tok, rows[:2], texts[:2]); assert rm.training
