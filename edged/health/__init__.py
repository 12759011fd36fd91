"""Endpoint health: active checks, passive outlier detection and TTL heartbeats. The policy only reads it."""

from __future__ import annotations

from edged.health.checks import CheckResult, run_check
from edged.health.monitor import EndpointHealth, HealthMonitor
from edged.health.outlier import Outlier, OutlierConfig

__all__ = ["CheckResult", "EndpointHealth", "HealthMonitor", "Outlier", "OutlierConfig", "run_check"]
