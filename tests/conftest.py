import os

from hypothesis import HealthCheck, settings

# CI runs a dozen fuzzed shapes per rule; HYPOTHESIS_PROFILE=thorough runs many more.
settings.register_profile("default", max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
