"""Tiny random Hugging Face PyTorch models of every supported family, written to disk for tests."""

import os

import numpy as np
import torch
import transformers

VOCAB = 97

FAMILY_CONFIGS = {
        "bert": lambda: transformers.BertConfig(
                vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
                max_position_embeddings=64, type_vocab_size=2, pad_token_id=0),
        "roberta": lambda: transformers.RobertaConfig(
                vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
                max_position_embeddings=66, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2),
        "gpt2": lambda: transformers.GPT2Config(
                vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64, pad_token_id=0),
        "llama": lambda: transformers.LlamaConfig(
                vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48, max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=False),
        "qwen2": lambda: transformers.Qwen2Config(
                vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48, max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=True),
        "mistral": lambda: transformers.MistralConfig(
                vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                intermediate_size=48, max_position_embeddings=64, pad_token_id=0, sliding_window=None,
                tie_word_embeddings=False),
        # Families added with the family table: each exercises its own switches on a tiny config.
        "qwen3": lambda: transformers.Qwen3Config(
                vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                head_dim=12, intermediate_size=48, max_position_embeddings=64, pad_token_id=0,
                tie_word_embeddings=False),
        "gemma2": lambda: transformers.Gemma2Config(
                vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, intermediate_size=48, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                eos_token_id=2, sliding_window=4, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                final_logit_softcapping=3.0),
        "gemma3_text": lambda: transformers.Gemma3TextConfig(
                vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, intermediate_size=48, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                eos_token_id=2, sliding_window=4, query_pre_attn_scalar=16,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                 "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}}),
        "phi3": lambda: transformers.Phi3Config(
                vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48, max_position_embeddings=64, original_max_position_embeddings=64, pad_token_id=0,
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
        "mixtral": lambda: transformers.MixtralConfig(
                vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
                vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, intermediate_size=48, moe_intermediate_size=20, num_experts=6, num_experts_per_tok=2,
                norm_topk_prob=False, max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=False),
}

HEAD_CLASSES = {
        "bert": {"base": "BertModel", "mlm": "BertForMaskedLM", "classification": "BertForSequenceClassification"},
        "roberta": {"base": "RobertaModel", "mlm": "RobertaForMaskedLM",
                                "classification": "RobertaForSequenceClassification"},
        "gpt2": {"base": "GPT2Model", "causal_lm": "GPT2LMHeadModel", "classification": "GPT2ForSequenceClassification"},
        "llama": {"base": "LlamaModel", "causal_lm": "LlamaForCausalLM",
                            "classification": "LlamaForSequenceClassification"},
        "qwen2": {"base": "Qwen2Model", "causal_lm": "Qwen2ForCausalLM",
                            "classification": "Qwen2ForSequenceClassification"},
        "mistral": {"base": "MistralModel", "causal_lm": "MistralForCausalLM",
                                "classification": "MistralForSequenceClassification"},
        "qwen3": {"base": "Qwen3Model", "causal_lm": "Qwen3ForCausalLM",
                  "classification": "Qwen3ForSequenceClassification"},
        "gemma2": {"causal_lm": "Gemma2ForCausalLM"},
        "gemma3_text": {"base": "Gemma3TextModel", "causal_lm": "Gemma3ForCausalLM"},
        "phi3": {"causal_lm": "Phi3ForCausalLM"},
        "mixtral": {"causal_lm": "MixtralForCausalLM"},
        "qwen3_moe": {"base": "Qwen3MoeModel", "causal_lm": "Qwen3MoeForCausalLM"},
}

ORIGINAL_FAMILIES = ("bert", "roberta", "gpt2", "llama", "qwen2", "mistral")
CASES = [(family, head) for family, heads in HEAD_CLASSES.items() for head in heads if family in ORIGINAL_FAMILIES]
NEW_CASES = [(family, head) for family, heads in HEAD_CLASSES.items() for head in heads
             if family not in ORIGINAL_FAMILIES]


def make_hf_model(family: str, head: str, seed: int = 0, num_labels: int = 3):
    """A randomly initialized HF model whose every parameter (norms and biases too) is perturbed."""
    torch.manual_seed(seed)
    config = FAMILY_CONFIGS[family]()
    config.num_labels = num_labels
    config._attn_implementation = "eager"
    model = getattr(transformers, HEAD_CLASSES[family][head])(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    return model


def save_hf_model(model, directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    return directory


def padded_batch(family: str, batch: int = 3, seq: int = 9, seed: int = 0):
    """Right-padded ids (valid ids avoid the pad id) and the attention mask, as numpy int arrays."""
    rng = np.random.default_rng(seed)
    pad = 1 if family == "roberta" else 0
    ids = rng.integers(3, VOCAB, size=(batch, seq))
    lengths = np.array([seq, seq - 3, seq - 5][:batch])
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, pad)
    return ids.astype(np.int64), mask


def torch_outputs(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True,
                                  output_attentions=True)
