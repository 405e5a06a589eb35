"""serve: the online scheduling engine and its OpenAI-style HTTP server.

Config:     EngineConfig, Program, bucket_sizes, POLICIES
Requests:   SamplingParams, QoS, RequestHandle, TokenEvent, Completion,
            InvalidRequest, QueueFull, EngineStopped
Engine:     Engine (serve loop), ModelRunner (compiled steps), StepRecord
Scheduling: make_scheduler, SCHEDULERS, LatencyTable, measure_latency
HTTP:       create_app, ServerConfig, serve_app, ServeMetrics
Workloads:  WorkloadConfig, make_workload, replay_realtime, replay_simulated
"""

from serve.config import POLICIES, EngineConfig, Program, bucket_sizes
from serve.request import (Completion, EngineStopped, InvalidRequest, QoS, QueueFull, RequestHandle, SamplingParams,
                           TokenEvent)
from serve.engine import Engine
from serve.runner import ModelRunner
from serve.step import StepRecord
from serve.scheduler import SCHEDULERS, make_scheduler
from serve.latency import LatencyTable, measure_latency
from serve.metrics import ServeMetrics
from serve.app import ServerConfig, create_app
from serve.server import serve_app
from serve.workload import WorkloadConfig, make_workload, replay_realtime, replay_simulated
