"""GGUF files, without llama.cpp: what a sweep needs to start from a GGUF base model and to write
GGUF files that llama.cpp tokenizes exactly as training did.

* ``reader.py``: a fast, exact reader of a GGUF's metadata and a key/value rewriter;
* ``tokenizer.py``: the ``tokenizer.*`` metadata kept verbatim (the ``tokenizer.gguf`` sidecar)
  and a ``tokenizers`` BPE that tokenizes exactly as llama.cpp's SentencePiece tokenizer;
* ``cache.py``: the node's build cache (sha256 key, file lock, atomic rename);
* ``hf_dir.py``: a GGUF base model as a cached Hugging Face directory (``materialize_gguf``).

The GGUF *writer* of an exported model lives in :mod:`grpo_ray.export`.
"""
