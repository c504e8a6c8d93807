"""lora_edu: the tested code behind the LoRA and QLoRA textbook."""

__version__ = "0.1.0"
