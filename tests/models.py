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
                                                  task_type="SEQ_CLS", init="reference", alpha=200.0))
    return pm.train()


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
