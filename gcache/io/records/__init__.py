"""Run records: the run log (`runlog`), saved parameters (`params`), statistics (`stats`)
and the report read back from a run's folder (`report`)."""
