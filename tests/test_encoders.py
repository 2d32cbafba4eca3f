"""Each tokenizer family's own special tokens and chat template; per-record gradients for an encoder.

All tokenizers and models here are built offline from tiny configs, so the tests need no
download and cover the BERT-style and Llama-style schemes side by side.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer, ByT5Tokenizer, PreTrainedTokenizerFast

from fedtune.config import LoraSettings
from fedtune.data.records import Record
from fedtune.models import attach_lora
from fedtune.privacy.dpsgd import DPSGDParams, DPSGDTrainer
from fedtune.tasks import get_task

CLASSIFY = get_task("classification")
LM = get_task("causal_lm")
WORDS = ["great", "film", "dull", "plot", "a", "very", "long", "and", "boring", "story", "fine"]


def bert_tokenizer(tmp_path) -> BertTokenizer:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizer(str(vocab))


def llama_style_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer with Llama's scheme: BOS first, no EOS."""
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def test_bert_style_records_start_with_cls_and_end_with_sep(tmp_path) -> None:
    tok = bert_tokenizer(tmp_path)
    example = CLASSIFY.encode(Record("", "great film", label=1), tok, max_length=16)
    assert example.input_ids[0] == tok.cls_token_id and example.input_ids[-1] == tok.sep_token_id
    assert tok.convert_ids_to_tokens(list(example.input_ids)) == ["[CLS]", "great", "film", "[SEP]"]
    cut = CLASSIFY.encode(Record("", " ".join(WORDS * 3), label=0), tok, max_length=8)
    assert len(cut.input_ids) == 8 and cut.input_ids[0] == tok.cls_token_id and cut.input_ids[-1] == tok.sep_token_id


def test_llama_style_records_start_with_bos(tmp_path) -> None:
    tok = llama_style_tokenizer()
    example = CLASSIFY.encode(Record("", "a dull plot", label=0), tok, max_length=16)
    assert tok.convert_ids_to_tokens(list(example.input_ids)) == ["<s>", "a", "dull", "plot"]


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_with_a_chat_template_the_loss_covers_exactly_the_assistant_turn(caplog) -> None:
    import logging

    tok = ByT5Tokenizer(extra_ids=0)
    tok.chat_template = CHAT_TEMPLATE
    with caplog.at_level(logging.INFO, logger="fedtune"):
        [example] = LM.encode_all([Record("Summarise: chest pain.", "Angina suspected.")], tok, max_length=256)
    assert "chat template" in caplog.text
    text = tok.decode(list(example.input_ids))
    assert text == "<|user|>Summarise: chest pain.<|end|><|assistant|>Angina suspected.<|end|>"
    targets = [i for i, m in zip(example.input_ids, example.target_mask) if m]
    assert tok.decode(targets) == "Angina suspected.<|end|>"
    # Plain text and template-less tokenizers keep the plain scheme: every token after the first is a target.
    [plain] = LM.encode_all([Record("", "a note")], tok, max_length=64)
    assert tok.decode(list(plain.input_ids)) == "a note</s>" and all(plain.target_mask)


def test_padding_never_changes_another_records_gradient_in_an_encoder(tmp_path) -> None:
    tok = bert_tokenizer(tmp_path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base = BertForSequenceClassification(config)
    for p in base.parameters():
        p.requires_grad_(False)
    model = attach_lora(base, LoraSettings(rank=4, target_modules=["query", "value"]), seed=0,
                        task_type="SEQ_CLS")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    records = [Record("", t, label=i % 2) for i, t in enumerate(["fine", "great film", "a very long and boring story"])]
    examples = CLASSIFY.encode_all(records, tok, max_length=16)
    model.train()
    expected = []
    for ex in examples:
        model.zero_grad(set_to_none=True)
        CLASSIFY.per_record_loss(model, CLASSIFY.collate([ex], tok.pad_token_id)).sum().backward()
        expected.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    model.zero_grad(set_to_none=True)
    params = DPSGDParams(noise_multiplier=0.0, max_grad_norm=1e6, sample_rate=0.5, steps=1, learning_rate=0.1,
                         optimizer="sgd")
    with DPSGDTrainer(CLASSIFY, model, params, num_records=len(examples)) as trainer:
        got = trainer.per_record_gradients(CLASSIFY.collate(examples, tok.pad_token_id))
    for i in range(len(examples)):
        for name, grad in expected[i].items():
            torch.testing.assert_close(got[name][i], grad, atol=2e-6, rtol=1e-4)
