"""Fleet models: one GPU instance (``instance``), shared by the simulated engine and the fleet simulator."""

from extproc.fleet.instance import PROFILES, InstanceProfile, kv_capacity_tokens, profile_named

__all__ = ["PROFILES", "InstanceProfile", "kv_capacity_tokens", "profile_named"]
