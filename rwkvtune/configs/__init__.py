"""Model configs: the registry of released RWKV-7 sizes and checkpoint detection."""

from rwkvtune.configs.model_loader import (
    ModelConfig,
    list_available_models,
    load_model_config,
    models_dir,
)

__all__ = ["ModelConfig", "list_available_models", "load_model_config", "models_dir"]
