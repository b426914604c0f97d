"""llm_serve: the pipeline API and an OpenAI-compatible server over paged-engine.

Offline::

    from llm_serve import EngineConfig, GenerationConfig, pipeline

    with pipeline("default", backend_config=EngineConfig(quant_policy=8)) as pipe:
        print(pipe("Hello", gen_config=GenerationConfig(max_tokens=32, temperature=0)).text)

Online: ``llm-serve serve [MODEL]`` (see ``llm_serve.cli``), or ``build_app`` for an app in
your own ASGI server. ``llm-serve chat`` is a terminal chat over the pipeline; ``llm-serve
bench`` load-tests any OpenAI-compatible server.
"""

from paged_engine import EngineConfig

from .pipeline import GenerationConfig, Pipeline, Response, pipeline
from .server import build_app
from .state import ServerSettings

__version__ = "0.1.0"

__all__ = [
    "EngineConfig",
    "GenerationConfig",
    "Pipeline",
    "Response",
    "ServerSettings",
    "build_app",
    "pipeline",
]
