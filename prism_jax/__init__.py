"""prism-jax: elastic sub-expert Mixture-of-Experts runtime in JAX.

Config:      ModelConfig, RopeConfig, SubExpertConfig
Model:       Decoder (Flax NNX module), PrismModel, load, generate, generate_tokens
Budgets:     budget_pattern, check_budget
Sub-experts: Partition, LayerPartition, read_partition, write_partition
Kernels:     grouped_matmul
"""

__version__ = "0.1.0"

from prism_jax.budget import budget_pattern, check_budget
from prism_jax.config import ModelConfig, RopeConfig, SubExpertConfig
from prism_jax.decoder import Decoder, ForwardOutput
from prism_jax.grouped_matmul import grouped_matmul
from prism_jax.model import PrismModel, load
from prism_jax.generate import generate, generate_tokens
from prism_jax.partition_io import read_partition, write_partition
from prism_jax.subexperts import LayerPartition, Partition
