"""The student: curated SFT data, the LoRA finetune (a Ray job), and its adapter as GGUF or in object storage."""
