"""Weight import/export: official PyTorch checkpoints, HF BERT / LLM safetensors."""
