"""Property-based fuzzing of every reader of a user's bytes (see docs/reliability.md, "Fuzzing the readers").

CI runs a fixed, bounded set of examples (``derandomize``: the same inputs every run, so a failure reproduces).
``VITSCALE_FUZZ=long pytest tests/fuzz`` runs 2000 random examples per property (50x CI), for a soak.
"""
import os

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                     HealthCheck.filter_too_much], print_blob=True)
settings.register_profile("ci", max_examples=40, derandomize=True, database=None, **_COMMON)
settings.register_profile("long", max_examples=2000, derandomize=False, **_COMMON)
settings.load_profile("long" if os.environ.get("VITSCALE_FUZZ") == "long" else "ci")
