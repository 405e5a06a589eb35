"""serve.offload: offloading mode, a sub-expert cache for memory-limited devices.

Settings:  OffloadConfig, Selection, parse_expert_memory, plan_memory, MemoryPlan
Model:     OffloadedModel, offload_model, load_offloaded
Engine:    OffloadRunner (a StepRunner for serve.Engine)
Caching:   SlotCache, LRUPolicy, LFUPolicy
Slow tier: DiskTier, HostTier, SlowTierError, prepare_offload_dir, page_cache_residency
Reports:   StepStats, OffloadStats
"""

from serve.offload.config import OffloadConfig
from serve.offload.selection import Selection
from serve.offload.memory import MemoryPlan, parse_expert_memory, plan_memory
from serve.offload.model import OffloadedModel
from serve.offload.load import load_offloaded, offload_model
from serve.offload.runner import OffloadRunner
from serve.offload.cache import SlotCache
from serve.offload.policy import LFUPolicy, LRUPolicy
from serve.offload.disk_tier import DiskTier, prepare_offload_dir
from serve.offload.host_tier import HostTier
from serve.offload.tier import SlowTierError
from serve.offload.pagecache import page_cache_residency
from serve.offload.stats import OffloadStats, StepStats
