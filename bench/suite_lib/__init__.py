"""The pieces of bench/gpu_suite.py: running a command under a deadline (proc), the stages and
their commands (stages), the environment record (environment) and the summary (summary)."""
