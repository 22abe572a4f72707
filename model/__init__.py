"""DeepSeek-style model in plain PyTorch."""
