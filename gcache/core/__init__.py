"""The pure core: torch functions of explicit state. No I/O, no environment, no globals."""
