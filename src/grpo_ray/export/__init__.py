"""Export a trained LoRA adapter: the adapter itself, a merged 16-bit HF model, GGUF files and an
Ollama ``Modelfile``, with read-back and llama.cpp checks.

In the order :func:`~grpo_ray.export.pipeline.export_model` runs them:

* ``merge.py``: the adapter copied, the LoRA merged into the base (bf16 or fp16);
* ``hf_to_gguf.py`` (with ``vocab.py``): the HF -> GGUF writer (f32, f16, bf16, q8_0);
* ``llama_cpp.py``: llama.cpp's bindings, and its quantizer for the K-quants (q4_k_m ...);
* ``lora_gguf.py``: the LoRA as a llama.cpp adapter GGUF, for a base that ships as its own GGUF;
* ``modelfile.py``: the Ollama Modelfile;
* ``checks.py``: read-back, llama.cpp against the merged HF model, greedy agreement;
* ``base.py``: what they share (supported architectures and types, :class:`ExportError`);
* ``best.py``: the sweep's winner through all of it into ``<run>/best``, and its model card.
"""
