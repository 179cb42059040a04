"""What reads a run directory (``<storage>/<name>``, local or a URI) and shows it, without Ray:
``status.py`` the trials' status and each failed trial's cause (``grpo-ray status``),
``html_report.py`` the HTML report (``grpo-ray report``), ``utilization.py`` the sweep's GPU use."""
