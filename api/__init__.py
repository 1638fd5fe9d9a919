"""FastAPI sidecar: POST /predict, GET /health, GET /models on top of engine.inference."""
