"""`qmlx study`: LoRA orderings × seeds trained, scored and compared (spec, runner, statistics, report)."""
