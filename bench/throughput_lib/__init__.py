"""bench/throughput.py's implementation, one concern per module (the entry point, its CLI and
its docstring stay in bench/throughput.py):

* ``common``           the repository root, the results folder, the CPU note, exit statuses, UsageError
* ``config``           the fastcog / reference configs, the device and the recipes
* ``models``           what every path shares: architecture, scheduler, VAE, batches (Bench)
* ``rows``             the switches and the path plan: the reference, then the rows --rows names
* ``paths``            one path: starting adapters, building it, the training step, running it
* ``attention_probe``  the attention ops and kernels a profiled warm-up step ran
* ``reuse``            --reference-from: the reference's results from an earlier run, checked
* ``planned``          fastcog.plan_report's plan of a path: estimated peak and step-time bound
* ``metrics``          step-time metrics, loss / gradient-norm parity and its tolerances, the targets
* ``report``           hardware, versions, commit, the JSON report, file names
* ``markdown``         the markdown table
* ``plot``             the PNG
* ``runner``           running every path and writing the outputs; the exit status
"""
