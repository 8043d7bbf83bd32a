"""`meshserve bench`: load for the mesh (gRPC) or any OpenAI-compatible server, and what each request saw.

Read in order: workload.py (what each request asks), levels.py (how hard to push), target.py with
grpc_target.py and openai_target.py (how a request is sent and its stream timed), records.py (one request's
TTFT, inter-token latencies, tokens), runner.py (`run_level`), results.py (percentiles per level), report.py,
plot.py and progress.py (what a person sees), cli.py (the subcommand).
"""
