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
