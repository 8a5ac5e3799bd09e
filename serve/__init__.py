"""The HTTP service: chat API, web chat page, health, metrics and request batching (docs/design.md).

`create_app(settings)` in serve.app builds the FastAPI application; `supportbot serve` runs it
under uvicorn. Everything one app needs lives on one `Runtime` (serve.runtime) in `app.state`.
"""
