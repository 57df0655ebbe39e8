"""FCMAE (ConvNeXt V2's masked autoencoder) on the sparse engine: the model, its steps and the official layout."""
from .model import (FCMAE, FCMAEModelError, FCMAEOutput, LoadResult, build_fcmae, check_fcmae_model,
                    fcmae_len_keep)

__all__ = ["FCMAE", "FCMAEOutput", "FCMAEModelError", "LoadResult", "build_fcmae", "check_fcmae_model",
           "fcmae_len_keep"]
