import os

from hypothesis import HealthCheck, settings

# CI runs a fixed, derandomised set of examples so that a red build always reproduces.
settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
