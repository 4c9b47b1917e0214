"""Loaded models by id, each with the supervisor of its engine process."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from axserving.engine.supervisor import EngineState, EngineSupervisor
from axserving.errors import ModelNotFound


@dataclass
class ModelEntry:
    id: str
    path: str
    backend: str
    supervisor: EngineSupervisor
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def ready(self) -> bool:
        return self.supervisor.state is EngineState.ready


class ModelRegistry:
    def __init__(self) -> None:
        self._models: dict[str, ModelEntry] = {}

    def add(self, entry: ModelEntry) -> None:
        self._models[entry.id] = entry

    def get(self, model_id: str) -> ModelEntry:
        try:
            return self._models[model_id]
        except KeyError:
            raise ModelNotFound(
                f"The model '{model_id}' does not exist or is not loaded", param="model"
            ) from None

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._models.values()))

    def __len__(self) -> int:
        return len(self._models)

    def any_ready(self) -> bool:
        return any(m.ready for m in self._models.values())
