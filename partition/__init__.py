"""Offline refactoring engine: split each expert's neurons into N equal sub-experts.

Config:     PartitionConfig, ProfileConfig, SolverConfig, EvosaxConfig, AnnealConfig, KMeansConfig,
            RouterTuningConfig, CurveConfig
Pipeline:   build_partition (profile -> solve -> routers -> summary), partition_layer, partitioned_model
Profiling:  profile_layers, LayerProfile, make_sequences, load_token_ids, read_text
Objective:  partition_cost, expert_costs
Solvers:    solve, SOLVERS (evosax, sa, kmeans, random, identity), SolveResult
Routers:    core_neurons, repeated_linear_router, tune_linear_router
Evaluation: measure_curve, budget_quality, Curve, OperatingPoint, format_table, plot_curve
"""

from partition.build import build_partition, partition_layer, partitioned_model
from partition.calibration import load_token_ids, make_sequences, read_text
from partition.config import (AnnealConfig, EvosaxConfig, KMeansConfig, PartitionConfig, ProfileConfig,
                              RouterTuningConfig, SolverConfig)
from partition.curve import Curve, CurveConfig, OperatingPoint, budget_quality, format_table, measure_curve
from partition.objective import expert_costs, partition_cost
from partition.plot import plot_curve
from partition.profiler import LayerProfile, profile_layers
from partition.router_tuning import tune_linear_router
from partition.routers import core_neurons, repeated_linear_router
from partition.solvers import SOLVERS, SolveResult, solve
