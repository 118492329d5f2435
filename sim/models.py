"""What ``/v1/models`` lists: the served model and the LoRA adapters loaded at runtime.

Follows vLLM's ``OpenAIServingModels`` (``vllm/entrypoints/openai/models/serving.py``):
an adapter gets the next ``lora_int_id`` from a counter starting at 1; loading a name that
is loaded already is a 400 unless ``load_inplace``; a name equal to the base model is a
400; unloading an unknown name is a 404; the API keeps every loaded adapter listed (the
``max_cpu_loras`` cap applies to the worker's cache, see ``scheduler.py``). Cards carry
``root`` (the base model's path, or the adapter's ``lora_path``) and ``parent`` (the base
model's served name for an adapter, null for the base).

``--lora-modules name=path`` preloads adapters, like vLLM's flag. Without
``--enable-lora`` the load/unload routes are absent (404), as in vLLM without
``VLLM_ALLOW_RUNTIME_LORA_UPDATING``; the simulator ties both to ``--enable-lora``.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from sim.errors import RequestError

__all__ = ["Adapter", "ModelRegistry"]


@dataclass(frozen=True, slots=True)
class Adapter:
    name: str
    lora_int_id: int
    path: str
    created: int


def _permission() -> dict[str, Any]:
    return {
        "id": f"modelperm-{secrets.token_hex(8)}",
        "object": "model_permission",
        "created": int(time.time()),
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }


class ModelRegistry:
    def __init__(self, served_name: str, model_path: str, max_model_len: int) -> None:
        self.served_name = served_name
        self.model_path = model_path
        self.max_model_len = max_model_len
        self.created = int(time.time())
        self.adapters: dict[str, Adapter] = {}
        self._next_id = 1

    def resolve(self, model: str | None) -> Adapter | None:
        """The adapter a request's ``model`` names, None for the base model; 404 otherwise."""
        if not model or model == self.served_name:
            return None
        adapter = self.adapters.get(model)
        if adapter is None:
            raise RequestError(
                f"The model `{model}` does not exist. Valid aliases: {self.served_name}.",
                404,
                "NotFoundError",
                "model",
            )
        return adapter

    def load(self, body: Any) -> Adapter:
        if not isinstance(body, dict):
            raise RequestError("request body must be a JSON object", 400, "Bad Request")
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path or not isinstance(name, str) or not isinstance(path, str):
            raise RequestError(
                "Both 'lora_name' and 'lora_path' must be provided.", 400, "InvalidUserInput"
            )
        if name == self.served_name:
            raise RequestError(
                f"The lora adapter '{name}' conflicts with a served base model.",
                400,
                "InvalidUserInput",
            )
        existing = self.adapters.get(name)
        if existing is not None and not body.get("load_inplace"):
            raise RequestError(
                f"The lora adapter '{name}' has already been loaded. If you want to load the "
                "adapter in place, set 'load_inplace' to True.",
                400,
                "InvalidUserInput",
            )
        if existing is not None:
            lora_id = existing.lora_int_id
        else:
            lora_id, self._next_id = self._next_id, self._next_id + 1
        adapter = Adapter(name, lora_id, path, int(time.time()))
        self.adapters[name] = adapter
        return adapter

    def unload(self, body: Any) -> Adapter:
        name = body.get("lora_name") if isinstance(body, dict) else None
        if not name or not isinstance(name, str):
            raise RequestError(
                "'lora_name' needs to be provided to unload a LoRA adapter.",
                400,
                "InvalidUserInput",
            )
        adapter = self.adapters.pop(name, None)
        if adapter is None:
            raise RequestError(f"The lora adapter '{name}' cannot be found.", 404, "NotFoundError")
        return adapter

    def model_list(self) -> dict[str, Any]:
        base = {
            "id": self.served_name,
            "object": "model",
            "created": self.created,
            "owned_by": "vllm",
            "root": self.model_path,
            "parent": None,
            "max_model_len": self.max_model_len,
            "permission": [_permission()],
        }
        cards = [base] + [
            {
                "id": a.name,
                "object": "model",
                "created": a.created,
                "owned_by": "vllm",
                "root": a.path,
                "parent": self.served_name,
                "max_model_len": None,
                "permission": [_permission()],
            }
            for a in self.adapters.values()
        ]
        return {"object": "list", "data": cards}
