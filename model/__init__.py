"""DeepSeek-V3-style MoE + MLA model in plain PyTorch (imports torch, safetensors and the standard library only).

Public API: ModelArgs, CONFIGS, get_config, Transformer, init_random, generate, save_checkpoint, load_checkpoint,
from_pretrained (Hugging Face DeepSeek folders), args_from_hf_config, weight_dequant, quantize_weight,
kv_cache_bytes_per_token.
"""
from .args import CONFIGS, ModelArgs, get_config
from .checkpoint import save_checkpoint
from .fp8 import quantize_weight, weight_dequant
from .generate import generate
from .hf import args_from_hf_config, from_pretrained
from .loader import load_checkpoint
from .model import Transformer, init_random, kv_cache_bytes_per_token

__all__ = ["ModelArgs", "CONFIGS", "get_config", "Transformer", "init_random", "generate", "save_checkpoint",
           "load_checkpoint", "from_pretrained", "args_from_hf_config", "weight_dequant", "quantize_weight",
           "kv_cache_bytes_per_token"]
