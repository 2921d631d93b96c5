"""policy-inference: the current policy behind a dynamically batched generation engine (``engine.py``,
no gRPC) and a thin gRPC servicer over it (``server.py``)."""
