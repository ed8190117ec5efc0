"""`qmlx serve`: an OpenAI-compatible HTTP server for one model, many users at once.

The package, top to bottom (each imports only those above it):

    schemas   what clients send (pydantic, strict types) and APIError, the refusal object
    engine    the generation thread around one continuous batch (qmlx/batch.py): admission,
              shared prefix caches, timeouts, failures, metrics; no HTTP
    prepare   requests -> jobs: chat template, limits, tools and grammars; 400s name the field
    stream    jobs -> responses: the one consume loop, chat and completion formats, SSE
    app       the FastAPI app (routes, auth, body limit) and `serve`

Behaviour worth knowing:
* Up to `max_concurrency` requests decode together, one batched forward pass per step; a new
  request joins between steps once its prompt is read, a chunk per step, so a long prompt never
  holds the others up for more than one chunk. Greedy output is the same batched or alone.
* Finished requests leave their KV cache in an LRU bounded by `--prompt-cache-bytes`; a request
  sharing a prefix with one (a system prompt, a conversation's earlier turns) reads only what is
  new, reported as usage.prompt_tokens_details.cached_tokens.
* With `--prompt-cache-dir`, caches evicted from memory go to files there and are read back by
  a request sharing their prefix, also after a restart.
* `seed` makes sampling reproducible, batched or not: each seeded request draws from its own key.
* With `response_format` (json_object / json_schema) or a required tool call, decoding is
  constrained (qmlx/constrain.py); stop strings do not apply, and an answer cut short by
  max_tokens is closed so it still parses (finish_reason stays "length").
* `tool_choice` "none" hides the tools from the model; "required" or a named function starts
  the answer inside `<tool_call>` and constrains the call's JSON to the tools' schemas.
* Never hangs: a failure inside the engine fails the requests it was serving with an error
  object and the engine goes on; a full queue answers 429 with Retry-After; a client that
  leaves frees its row at the next step; SIGTERM drains the requests in flight, then exits.
"""

from .app import DEFAULT_MAX_BODY, create_app, listen, serve
from .engine import Engine, Job
from .schemas import APIError

__all__ = ["APIError", "DEFAULT_MAX_BODY", "Engine", "Job", "create_app", "listen", "serve"]
