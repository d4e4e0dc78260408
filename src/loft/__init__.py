"""loft: LoFT, low-rank adaptation that behaves like full fine-tuning (Tastan et al., ICLR 2026).

>>> import loft
>>> optimizer = loft.LoFTAdamW(peft_model, lr=1e-4)
"""

from . import federated, lr_search
from .clip import clip_grad_norm_
from .distributed import UnsupportedDistributedSetup
from .lr_search import LRSearch, find_lr
from .optim import SWITCHES, LoFTAdamW
from .pairs import LoRAPair, adapter_factors, find_lora_pairs, split_lora_parameters
from .syncs import HostSyncCounter

__all__ = [
    "HostSyncCounter",
    "LRSearch",
    "SWITCHES",
    "LoFTAdamW",
    "LoRAPair",
    "UnsupportedDistributedSetup",
    "adapter_factors",
    "clip_grad_norm_",
    "federated",
    "find_lora_pairs",
    "find_lr",
    "lr_search",
    "split_lora_parameters",
]
__version__ = "0.1.0"
