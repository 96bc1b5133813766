"""Model code (loading, LoRA adapters, embeddings, training, generation): torch, transformers and PEFT.

Importing this package alone does not import torch.
"""

EMBEDDED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
