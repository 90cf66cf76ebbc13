"""The EPLB placement planner, pure numpy (no torch): fresh plans (`planner`), migration-aware
plans (`migration`) and plan reports (`report`). `eplb/api.py` wraps it for torch callers."""
