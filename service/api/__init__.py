"""The REST API (FastAPI): OpenAI-shaped files and fine-tuning jobs, plus lorapool's models,
adapters and nodes. `create_app(settings, store, artifacts, executor)` builds it."""
