"""Task benchmarks (`qmlx eval`): HumanEval run in a sandbox, scores with confidence intervals."""
