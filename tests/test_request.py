"""The person's own figures, read from their message and put back into tool calls (agent/request.py, issue 13)."""

from __future__ import annotations

import pytest

from agent.request import correct_args, read_request

LLAMA = "meta-llama/Llama-3.1-8B"


@pytest.mark.parametrize("text, expected", [
    ("I have one RTX 4090. Can I fine-tune Llama-3.1-8B on ~20k support tickets (about 1k tokens each)? How long will it take?",
     {"model": LLAMA, "hardware": "NVIDIA RTX 4090", "seq_len": 1024, "examples": 20000}),
    ("Full fine-tuning of Qwen2.5-14B on 2x A100 80GB: will it fit? ZeRO-2, ZeRO-3 or FSDP?",
     {"model": "Qwen/Qwen2.5-14B", "hardware": "2x NVIDIA A100 SXM 80GB", "method": "full"}),
    ("My LoRA run of Llama-3.1-8B dies with CUDA out of memory at step 200 on an A10G: seq 4096, batch 4, r=64. What should I change?",
     {"model": LLAMA, "hardware": "NVIDIA A10G", "method": "lora", "seq_len": 4096, "micro_batch": 4, "r": 64}),
    ("LoRA or QLoRA for Mistral-7B on an RTX 4090 (24 GB), and which r?",
     {"model": "mistralai/Mistral-7B-v0.1", "hardware": "NVIDIA RTX 4090", "methods": ["lora", "qlora"]}),
    ("EleutherAI/polyglot-ko-1.3b를 T4 한 장에서 파인튜닝할 수 있어? 메모리는 얼마나 필요해?",
     {"model": "EleutherAI/polyglot-ko-1.3b", "hardware": "NVIDIA T4"}),
    ("polyglot-ko-5.8b를 T4 두 장으로 풀 파인튜닝", {"model": "EleutherAI/polyglot-ko-5.8b", "hardware": "2x NVIDIA T4", "method": "full"}),
    ("two 3090s and llama 3.1 8b, context of 8k", {"model": LLAMA, "hardware": "2x NVIDIA RTX 3090", "seq_len": 8192}),
    ("A100 40GB x 4, Qwen2.5-7B, max_length=2048, batch size 2",
     {"model": "Qwen/Qwen2.5-7B", "hardware": "4x NVIDIA A100 SXM 40GB", "seq_len": 2048, "micro_batch": 2}),
    ("what is LoRA?", {"method": "lora"}),
])
def test_read_request_finds_what_the_message_states(text, expected):
    assert read_request(text).stated() == expected


def test_read_request_wants_language_price_and_sharding():
    r = read_request("Llama-3.1-70B QLoRA on 2x RTX 3090 with FSDP: will it fit? Write the training script.")
    assert r.wants_script and not r.wants_trial and r.fsdp and r.language == "en" and not r.price_given
    assert read_request("do a trial run of it").wants_trial and read_request("스크립트 써줘").wants_script
    assert read_request("at $1.99/h on runpod").price_given and read_request("시간당 2000원").price_given
    assert read_request("ZeRO-2 or ZeRO-3?").zero_stages == [2, 3]
    assert read_request("T4에서 돼?").language == "ko"


def test_the_first_call_gets_the_persons_figures_back():
    req = read_request("I have one RTX 4090. Can I fine-tune Llama-3.1-8B on ~20k support tickets (about 1k tokens each)?")
    # what a 1.5B model really sent (bench/results, q1): wrong length, examples as tokens, an invented price
    args = {"model": "llama-3.1-8B", "hardware": "local", "seq_len": 2048, "dataset_examples": 1000, "dataset_tokens": 10000,
            "method": "auto", "price_per_gpu_hour": 0.05}
    new, notes = correct_args("plan_training", args, req, first=True)
    assert new == {"model": "llama-3.1-8B", "hardware": "NVIDIA RTX 4090", "seq_len": 1024, "dataset_examples": 20000, "method": "auto"}
    assert any("seq_len 1024" in n and "2048" in n for n in notes) and any("price_per_gpu_hour" in n for n in notes)
    # a later call is a what-if: the model's own change stays; only what is missing or unusable is filled
    later, notes = correct_args("plan_training", {"model": LLAMA, "hardware": "RTX 4090", "seq_len": 512}, req, first=False)
    assert later["seq_len"] == 512 and not any("seq_len" in n for n in notes)
    later, _ = correct_args("plan_training", {"model": "mistral-8b-ultra", "hardware": "my gpu"}, req, first=False)
    assert later["model"] == LLAMA and later["hardware"] == "NVIDIA RTX 4090"


def test_method_model_and_the_users_config_are_kept():
    req = read_request("Full fine-tuning of Qwen2.5-14B on 2x A100 80GB: will it fit?")
    new, _ = correct_args("plan_training", {"model": "qwen2.5-14B", "hardware": "A100 80GB", "method": "auto"}, req, first=True)
    assert new["method"] == "full" and new["hardware"] == "2x NVIDIA A100 SXM 80GB" and new["model"] == "qwen2.5-14B"
    oom = read_request("My LoRA run of Llama-3.1-8B dies with OOM on an A10G: seq 4096, batch 4, r=64.")
    new, notes = correct_args("estimate_memory", {"model": LLAMA, "hardware": "A10G", "setup": {"r": 8}}, oom, first=True)
    assert new["setup"] == {"r": 64, "method": "lora", "per_device_train_batch_size": 4} and new["seq_len"] == 4096
    assert any("setup.r 64" in n and "8" in n for n in notes)
    # another model named on purpose in a later call (a comparison) is left alone
    new, notes = correct_args("estimate_memory", {"model": "Qwen/Qwen2.5-7B"}, oom, first=False)
    assert new == {"model": "Qwen/Qwen2.5-7B"} and notes == []


def test_two_methods_named_become_one_plan_each():
    req = read_request("LoRA or QLoRA for Mistral-7B on an RTX 4090 (24 GB), and which r?")
    new, notes = correct_args("plan_training", {"model": "mistral-7b", "hardware": "RTX 4090"}, req, first=True)
    assert new["compare_methods"] == ["lora", "qlora"] and "method" not in new and notes
    # a method the model chose itself is not overridden by the comparison
    new, _ = correct_args("plan_training", {"model": "mistral-7b", "hardware": "RTX 4090", "method": "qlora"}, req, first=True)
    assert new["method"] == "qlora" and "compare_methods" not in new


def test_fsdp_named_on_several_gpus_plans_fsdp_only(tmp_path):
    req = read_request("Llama-3.1-70B QLoRA on 2x RTX 3090 with FSDP: will it fit, and do I need CPU offload?")
    new, notes = correct_args("plan_training", {"model": "meta-llama/Llama-3.1-70B", "hardware": "2x RTX 3090"}, req, first=True)
    assert new["fsdp"] == "full_shard" and any("FSDP full_shard only" in n for n in notes)
    one = read_request("Mistral-7B with FSDP on one RTX 4090?")
    assert "fsdp" not in correct_args("plan_training", {"model": "mistral-7b", "hardware": "RTX 4090"}, one, first=True)[0]
    # the real tool then ranks FSDP setups only (the planner's own engine restriction)
    from tools.agent_tools import ToolContext, plan_training_tool, tool_context

    with tool_context(ToolContext(workdir=tmp_path)):
        _, art = plan_training_tool(model="mistral-7b", hardware="2x RTX 4090", seq_len=1024, exact=False, method="lora",
                                    fsdp="full_shard")
    assert art["setup"]["fsdp"] == "full_shard" and art["setup"]["zero_stage"] == 0


def test_tools_without_setup_arguments_are_untouched():
    req = read_request("Llama-3.1-8B on a 4090, seq 4096")
    assert correct_args("lookup_model", {"model": "x"}, req, first=True) == ({"model": "x"}, [])
    assert correct_args("web_search", {"query": "q"}, req, first=True) == ({"query": "q"}, [])


def test_knobs_the_person_did_not_ask_for_are_left_out_of_the_first_call():
    # what the 1.5B model sent for the OOM question (bench/agent_eval.py q3): every knob filled in
    req = read_request("My LoRA run of Llama-3.1-8B dies with CUDA out of memory at step 200 on an A10G: seq 4096, batch 4, r=64.")
    junk = {"r": 64, "gradient_accumulation_steps": 16, "gradient_checkpointing": False, "optim": "adamw", "precision": "fp16",
            "zero_stage": 0, "fsdp": False, "offload": False, "attn_implementation": "torch", "packing": False, "learning_rate": 1e-4}
    new, notes = correct_args("estimate_memory", {"model": LLAMA, "hardware": "A10G", "setup": junk}, req, first=True)
    assert new["setup"] == {"r": 64, "method": "lora", "per_device_train_batch_size": 4}
    assert any(n.startswith("left out setup knobs the person did not ask for: gradient_accumulation_steps=16") for n in notes)
    # named in the message: kept; and a later call in the turn (the model's own what-if) is left alone
    asked = read_request("Llama-3.1-8B on an A10G without gradient checkpointing, optimizer paged_adamw_8bit, fp16")
    new, _ = correct_args("estimate_memory", {"setup": {"gradient_checkpointing": False, "optim": "paged_adamw_8bit",
                                                        "precision": "fp16", "packing": True}}, asked, first=True)
    assert new["setup"] == {"gradient_checkpointing": False, "optim": "paged_adamw_8bit", "precision": "fp16"}
    new, notes = correct_args("estimate_memory", {"setup": {"packing": True}}, asked, first=False)
    assert new["setup"] == {"packing": True} and notes == []


def test_knob_values_as_small_models_write_them_are_understood():
    import json

    from tools.agent_tools import estimate_memory_tool

    text, _ = estimate_memory_tool(model="Llama-3.1-8B", hardware="RTX 4090", fast=True,
                                   setup={"method": "qlora", "optim": "adamw", "fsdp": False, "offload": False, "attn_implementation": "torch"})
    setup = json.loads(text)["setup"]
    assert setup["optim"] == "adamw_torch" and setup["sharding"] == "single" and setup["method"] == "qlora"
    from tools.agent_tools import normalise_knobs

    assert normalise_knobs({"attention": "flash", "fsdp": True, "offload": "cpu", "precision": "bfloat16"}) == {
        "attn_implementation": "flash_attention_2", "fsdp": "full_shard", "offload": "optimizer", "precision": "bf16"}


def test_two_gpus_named_are_no_one_hardware_and_objectives_are_read():
    req = read_request("Should I rent an A100 or use my 4090 for Llama-3.1-8B?")
    assert req.hardware is None and req.model == LLAMA
    new, notes = correct_args("plan_training", {"model": LLAMA, "hardware": "RTX 4090"}, req, first=True)
    assert new["hardware"] == "RTX 4090" and notes == []  # a comparison of GPUs: the model's choice stands
    assert read_request("A100 PCIe, qwen2.5-7b").hardware == "NVIDIA A100 PCIe 80GB"  # one GPU, written two ways
    dpo = read_request("DPO my Qwen2.5-7B on 2x RTX 4090")
    new, notes = correct_args("plan_training", {"model": "Qwen2.5-7B", "hardware": "2x RTX 4090"}, dpo, first=True)
    assert new["setup"] == {"objective": "dpo"} and notes == ["setup.objective 'dpo' from the person's message"]
    assert read_request("GRPO with a reward function on Qwen2.5-1.5B").objective == "grpo"
    assert read_request("train a reward model on my preference pairs").objective == "reward"
    assert read_request("fine-tune Llama-3.1-8B").objective is None


def test_no_gpu_named_and_none_here_means_memory_only():
    from agent.request import _local_gpu

    if _local_gpu():
        pytest.skip("this machine has a GPU: 'local' means it")
    req = read_request("How much memory does full fine-tuning of Llama-3.1-8B need?")
    new, notes = correct_args("estimate_memory", {"model": LLAMA, "hardware": "local"}, req, first=True)
    assert "hardware" not in new and notes[0].startswith("hardware 'local' left out")
    # plan_training needs GPUs: its 'local' stays, and its error asks the model to ask the person
    assert correct_args("plan_training", {"model": LLAMA, "hardware": "local"}, req, first=True)[0]["hardware"] == "local"


def test_a_data_size_the_person_did_not_give_is_left_out():
    req = read_request("Can I fine-tune Qwen2.5-7B with QLoRA on one RTX 4090, 2k tokens per example?")
    # what the 1.5B model sent: 1000 examples nobody mentioned (the plan then showed "10 min per epoch")
    new, notes = correct_args("plan_training", {"model": "Qwen2.5-7B", "hardware": "RTX 4090", "seq_len": 2048,
                                                "dataset_examples": 1000, "dataset_tokens": 2048000}, req, first=True)
    assert "dataset_examples" not in new and "dataset_tokens" not in new and sum("left out" in n for n in notes) == 2
    sized = read_request("Qwen2.5-7B on a 4090 with 50M tokens of support chats")
    assert sized.total_tokens == 50_000_000
    new, _ = correct_args("plan_training", {"model": "Qwen2.5-7B", "hardware": "RTX 4090", "dataset_tokens": 50_000_000}, sized, first=True)
    assert new["dataset_tokens"] == 50_000_000
