import os

from hypothesis import HealthCheck, settings

# Deterministic example generation, so a CI failure reproduces; each example still draws its own
# random inputs from a seed that hypothesis chooses. Compilation makes the first call of a shape
# slow, hence no deadline.
settings.register_profile(
    "ci",
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
