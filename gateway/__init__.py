"""OpenAI-compatible gateway in front of Triton Inference Server.

Layers: ``protocol`` (Pydantic models, no I/O) → ``serving`` (requests to generations and
back) → ``routes``/``app`` (thin FastAPI). Engines plug in through ``engine.Engine``;
``triton`` holds the Triton adapters, one dialect per kind of Triton model.
"""
