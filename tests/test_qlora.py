"QLoRA from scratch: LoRA adapters on a frozen NF4 base train, and the base is exactly the NF4 round trip of the weights."
import pytest, torch
from ftcourse.core import tiny_model
from ftcourse.lora import apply_lora, lora_layers, count_trainable
from ftcourse.quant import quantize_lora_bases, NF4Linear, quantize_nf4, dequantize_nf4

def test_qlora_bases_are_nf4_and_only_adapters_train():
    m, tok = tiny_model(hidden_size=128, intermediate_size=256)
    ref = {n: l.weight.detach().clone() for n, l in m.named_modules() if isinstance(l, torch.nn.Linear) and 'lm_head' not in n}
    apply_lora(m, r=4, alpha=8, target_modules='all-linear')
    n = quantize_lora_bases(m)
    layers = lora_layers(m)
    assert n == len(layers) == 7 * m.config.num_hidden_layers
    for name, l in layers.items():
        assert isinstance(l.base, NF4Linear)
        w = dequantize_nf4(l.base.packed, l.base.state, torch.float32)
        packed, st = quantize_nf4(ref[name], 64, True)
        assert torch.equal(w, dequantize_nf4(packed, st, torch.float32))        # the base is the NF4 round trip, bit for bit
    assert count_trainable(m) == sum(l.lora_A.numel() + l.lora_B.numel() for l in layers.values())
    x = tok(["hello there"], return_tensors='pt')
    out = m(**x, labels=x['input_ids']); out.loss.backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if 'lora_' in n)
    assert all(not p.requires_grad for n, p in m.named_parameters() if 'lora_' not in n)

def test_qlora_needs_lora_first():
    m, _ = tiny_model()
    with pytest.raises(ValueError, match='apply_lora first'): quantize_lora_bases(m)
