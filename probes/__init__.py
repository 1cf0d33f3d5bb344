"""probes: measure, layer by layer, how an instruct model differs from its base model."""
from probes.activations import Activations, record, record_pair, run_with_cache
from probes.chat import ROLES, ChatBatch, encode
from probes.pairs import ModelPair, PairingError, load_model, load_pair

__all__ = [
    "ROLES", "Activations", "ChatBatch", "ModelPair", "PairingError",
    "encode", "load_model", "load_pair", "record", "record_pair", "run_with_cache",
]
__version__ = "0.1.0"
