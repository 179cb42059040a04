"""The task a trial learns: the reasoning format and its prompts (``template.py``), the data sets
(``data.py``), the GRPO rewards (``rewards.py``) and the held-out evaluation (``evaluate.py``)."""
