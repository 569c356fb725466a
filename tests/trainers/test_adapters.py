import pytest
import torch
from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from trainers_helpers import skip_refused_prefix_tuning
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from trainers.adapters import build_peft_config, method_params, prefix_tuning_problem
from trainers.settings import PeftSettings


@pytest.fixture(scope="module")
def bert(tiny_bert):
    return AutoModelForSequenceClassification.from_pretrained(tiny_bert)


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama)


def test_lora_config_from_settings(bert):
    config = build_peft_config(PeftSettings("lora", {"r": 4, "lora_alpha": 16, "lora_dropout": 0.1,
                                                     "target_modules": ["query", "value"], "use_rslora": True,
                                                     "use_dora": True}), bert, "sequence-classification")
    assert isinstance(config, LoraConfig)
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_rslora, config.use_dora) == (4, 16, 0.1, True, True)
    assert set(config.target_modules) == {"query", "value"} and config.task_type == "SEQ_CLS"


def test_lora_alpha_defaults_to_twice_r_or_alpha_ratio(bert):
    assert build_peft_config(PeftSettings("lora", {"r": 4, "target_modules": ["query"]}), bert,
                             "sequence-classification").lora_alpha == 8
    assert build_peft_config(PeftSettings("lora", {"r": 4, "alpha_ratio": 4, "target_modules": ["query"]}), bert,
                             "sequence-classification").lora_alpha == 16


def test_unknown_parameter_names_the_known_ones():
    with pytest.raises(ValueError, match=r"peft.rank: not a parameter of lora; known: .*lora_alpha.*\br\b"):
        method_params(PeftSettings("lora", {"rank": 8}))
    with pytest.raises(ValueError, match="peft.method must be one of"):
        method_params(PeftSettings("adalora"))


@pytest.mark.parametrize("init", ["random", "sample-vocab", "text"])
def test_prompt_tuning_inits(llama, tiny_llama, init):
    params = {"num_virtual_tokens": 5, "prompt_init": init, "prompt_init_text": "one two three" if init == "text" else None}
    config = build_peft_config(PeftSettings("prompt-tuning", params), llama, "causal-lm", tokenizer_path=tiny_llama)
    assert isinstance(config, PromptTuningConfig) and config.num_virtual_tokens == 5
    assert config.prompt_tuning_init == {"random": "RANDOM", "sample-vocab": "SAMPLE_VOCAB", "text": "TEXT"}[init]
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), config)
    prompt = model.prompt_encoder["default"].embedding.weight
    vocabulary = model.get_input_embeddings().weight
    # sample-vocab and text start on rows of the embedding matrix, random does not
    on_vocab = all(any(torch.equal(row, word) for word in vocabulary) for row in prompt)
    assert on_vocab == (init != "random")


def test_text_init_needs_text(llama):
    with pytest.raises(ValueError, match="prompt_init_text"):
        build_peft_config(PeftSettings("prompt-tuning", {"prompt_init": "text"}), llama, "causal-lm", "x")


def test_prefix_and_ia3(llama):
    prefix = build_peft_config(PeftSettings("prefix-tuning", {"num_virtual_tokens": 3}), llama, "causal-lm")
    assert isinstance(prefix, PrefixTuningConfig) and prefix.num_virtual_tokens == 3
    ia3 = build_peft_config(PeftSettings("ia3", {"target_modules": ["k_proj", "down_proj"],
                                                 "feedforward_modules": ["down_proj"]}), llama, "causal-lm")
    assert isinstance(ia3, IA3Config) and set(ia3.feedforward_modules) == {"down_proj"}


def test_auto_target_modules_use_the_architecture_presets(bert, llama):
    lora = build_peft_config(PeftSettings("lora", {"target_modules": "auto"}), bert, "sequence-classification")
    assert set(lora.target_modules) == {"query", "value"}
    lora = build_peft_config(PeftSettings("lora"), llama, "causal-lm")
    assert {"q_proj", "v_proj"} <= set(lora.target_modules)
    ia3 = build_peft_config(PeftSettings("ia3"), llama, "causal-lm")
    assert set(ia3.feedforward_modules) <= set(ia3.target_modules) and ia3.feedforward_modules


@pytest.mark.parametrize("method,params", [("lora", {"target_modules": ["query"]}), ("prompt-tuning", {}),
                                           ("prefix-tuning", {}), ("ia3", {"target_modules": ["value"]})])
def test_classification_head_is_trainable(tiny_bert, method, params):
    skip_refused_prefix_tuning(method, tiny_bert)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    config = build_peft_config(PeftSettings(method, {**params, **({"num_virtual_tokens": 2} if "prefix" in method
                                                                   or "prompt" in method else {})}),
                               model, "sequence-classification")
    peft_model = get_peft_model(model, config)
    trainable = [name for name, param in peft_model.named_parameters() if param.requires_grad]
    assert any("classifier" in name for name in trainable)


def test_prefix_tuning_of_a_classifier_needs_a_backbone_taking_past_key_values(bert, monkeypatch):
    """PEFT's own test, by the forward signatures of the classifier and its backbone."""
    def head(input_ids=None, labels=None, **kwargs):
        pass

    def renamed(input_ids=None, cache=None, **kwargs):   # transformers 5.24 on
        pass

    def classic(input_ids=None, past_key_values=None, **kwargs):
        pass

    monkeypatch.setattr(bert, "forward", head)
    monkeypatch.setattr(bert.bert, "forward", renamed)
    problem = prefix_tuning_problem(bert, "sequence-classification")
    assert "past_key_values" in problem and "BertModel" in problem and "prompt-tuning" in problem
    assert prefix_tuning_problem(bert, "causal-lm") is None   # PEFT passes it as a keyword there
    monkeypatch.setattr(bert.bert, "forward", classic)
    assert prefix_tuning_problem(bert, "sequence-classification") is None


def test_a_refused_prefix_tuning_names_the_key_before_peft_runs(bert):
    problem = prefix_tuning_problem(bert, "sequence-classification")
    if problem is None:
        pytest.skip("this transformers still passes past_key_values to BERT: nothing to refuse")
    with pytest.raises(ValueError, match=r"^peft\.method: prefix-tuning cannot train"):
        build_peft_config(PeftSettings("prefix-tuning", {"num_virtual_tokens": 4}), bert, "sequence-classification")
