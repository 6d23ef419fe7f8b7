"""bench/throughput.py's implementation, one concern per module (the entry point, its CLI and
its docstring stay in bench/throughput.py):

* ``common``   the repository root, the results folder, the CPU note, exit statuses, UsageError
* ``config``   the fastcog / reference configs, the device and the recipes
* ``models``   what every path shares: architecture, scheduler, VAE, batches (Bench)
* ``paths``    the path plan (reference, fastcog, ablation rows), building and running one path
* ``planned``  fastcog.plan_report's plan of a path: estimated peak and step-time bound
* ``metrics``  step-time metrics, loss / gradient-norm parity, the targets
* ``report``   hardware, versions, commit, the JSON report, the markdown table, the PNG, file names
* ``runner``   running every path and writing the outputs; the exit status
"""
