"""Model code (loading, LoRA adapters, embeddings, training, generation): torch, transformers and PEFT.

Importing this package alone does not import torch.
"""

EMBEDDED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def base_model_id(model_name: str) -> str:
    """The model a ``model.name`` setting means: the embedded default's Hugging Face id, or the name itself."""
    return EMBEDDED_NAME if model_name == "smollm2" else model_name
