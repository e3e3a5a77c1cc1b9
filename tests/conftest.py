"""Shared fixtures: tiny real-format models and datasets made by the tests themselves."""

import numpy as np
import pytest


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A randomly initialised 2-layer BERT saved as a Hugging Face directory (model + tokenizer)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny-bert")
    words = ["good", "great", "fine", "bad", "awful", "poor", "movie", "food", "the", "was", "very", "not"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words

    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory):
    """A small two-class text dataset whose label is decidable from the words."""
    rng = np.random.default_rng(0)
    pos, neg = ["good", "great", "fine"], ["bad", "awful", "poor"]
    rows = ["text,label"]
    for i in range(80):
        label = i % 2
        words = rng.choice(pos if label else neg, 3).tolist() + ["the", "movie", "was"]
        rng.shuffle(words)
        rows.append(f"{' '.join(words)},{'positive' if label else 'negative'}")
    path = tmp_path_factory.mktemp("text") / "sentiment.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def one_thread():
    """Pin torch to one intra-op thread for the test (shared CPUs: more threads only oversubscribe)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def other_bert_dir(tiny_bert_dir, tmp_path_factory):
    """A second, different tiny BERT (1 layer, 48-d) with the same tokenizer."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("other-bert")
    BertTokenizerFast.from_pretrained(tiny_bert_dir).save_pretrained(d)
    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=17, hidden_size=48, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=64)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(d)
    return d
