"""Small real architectures built from configs (no download)."""
import torch
from transformers import BertConfig, BertForSequenceClassification


def tiny_bert(num_labels=2, hidden=48, layers=2):
    cfg = BertConfig(vocab_size=120, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg).eval()


def tokens(batch, seq, vocab=120):
    return torch.randint(0, vocab, (batch, seq))


def trainable_lsr_bert():
    """The tiny BERT with LSR on query/value through peft, in training mode, the same every call."""
    import lsr_compile as lc
    from peft import get_peft_model

    torch.manual_seed(0)
    pm = get_peft_model(tiny_bert(), lc.LSRConfig(s=2, r=2, target_modules=["query", "value"],
                                                  task_type="SEQ_CLS"))
    return strong_adapters(pm).train()


def labelled_batches(n, batch=8, length=12):
    """``n`` fixed (input_ids, labels) batches."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 120, (batch, length), generator=g), torch.randint(0, 2, (batch,), generator=g))
            for _ in range(n)]


def each_sample_alone(pm, ids, names):
    """The logits a peft model gives each sample run alone with its adapter (``"__base__"``: adapters off):
    what a mixed batch (``adapter_names``) must reproduce."""
    out = []
    for i, name in enumerate(names):
        if name == "__base__":
            with pm.disable_adapter():
                out.append(pm(input_ids=ids[i:i + 1]).logits)
        else:
            pm.set_adapter(name)
            out.append(pm(input_ids=ids[i:i + 1]).logits)
    return torch.cat(out)


@torch.no_grad()
def strong_adapters(module, seed: int = 0, gain: float = 1.0):
    """Every LSR layer's factors drawn so that its update is about ``gain`` times as large as its base weight: the
    adapter's share of every output, and each factor's gradient, then stand orders of magnitude above any
    tolerance a test compares with (a layer that dropped its adapter, or a factor whose gradient was lost, fails). Returns
    ``module``."""
    import lsr_compile as lc

    g = torch.Generator().manual_seed(seed)
    layers = []
    for m in module.modules():
        if isinstance(m, lc.LSRLinear):
            layers.append(((m.A1, m.A2, m.B1, m.B2), m.scale, m.weight))
        elif hasattr(m, "lsr_A1") and hasattr(m, "base_layer"):
            for name in m.lsr_A1:
                layers.append(((m.lsr_A1[name], m.lsr_A2[name], m.lsr_B1[name], m.lsr_B2[name]), m.lsr_scale[name],
                               m.base_layer.weight))
    for factors, scale, weight in layers:
        s, q = factors[0].shape[0], factors[0].shape[1] * factors[1].shape[1]
        target = gain * (float(weight.float().std()) if weight.is_floating_point() and weight.numel() > 1 else 0.1)
        sigma = (target / (abs(scale) * q ** 0.5 * s)) ** 0.25  # ΔW ~ scale·√q·s·σ⁴ per entry
        for p in factors:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).mul_(sigma).to(p.dtype))
    assert layers, "no LSR layer to strengthen"
    return module


def adapter_share(run, module) -> float:
    """How much the LSR adapters move ``run()``'s result: max |with - without| (the B2 factors zeroed for the
    second call, then restored)."""
    import lsr_compile as lc

    with torch.no_grad():
        want = run().detach().double()
        saved = []
        for m in module.modules():
            if isinstance(m, lc.LSRLinear):
                saved.append((m.B2, m.B2.detach().clone()))
            elif hasattr(m, "lsr_B2"):
                saved += [(p, p.detach().clone()) for p in m.lsr_B2.values()]
        for p, _ in saved:
            p.zero_()
        try:
            base = run().detach().double()
        finally:
            for p, v in saved:
                p.copy_(v)
    return (want - base).abs().max().item()
