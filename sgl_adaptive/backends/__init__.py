"""Backends: a real SGLang server (``endpoint``) and the in-process Hugging Face engine (``local``)."""
