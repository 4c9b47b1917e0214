"""HTTP routes. Inference and model routes are served with and without the ``/v1`` prefix."""

from __future__ import annotations

from starlette.routing import Route

from axserving.routes import (
    dashboard,
    embeddings,
    inference,
    messages,
    models,
    ops,
    responses_api,
    utility,
)


def routes() -> list[Route]:
    out = [
        Route("/health", ops.health, methods=["GET"]),
        Route("/openapi.json", ops.openapi, methods=["GET"]),
        Route("/livez", ops.livez, methods=["GET"]),
        Route("/readyz", ops.readyz, methods=["GET"]),
        Route("/metrics", ops.metrics, methods=["GET"]),
        Route("/v1/admin/status", ops.admin_status, methods=["GET"]),
        Route("/v1/admin/audit", ops.admin_audit, methods=["GET"]),
        Route("/v1/admin/startup-report", ops.admin_startup_report, methods=["GET"]),
        Route("/v1/admin/diagnostics", ops.admin_diagnostics, methods=["GET"]),
        Route("/v1/admin/policy", ops.admin_policy, methods=["GET"]),
        Route("/v1/metrics", ops.metrics_json, methods=["GET"]),
        Route("/v1/license", ops.license_info, methods=["GET"]),
        Route("/v1/license", ops.license_activate, methods=["POST"]),
        Route("/dashboard", dashboard.page, methods=["GET"]),
    ]
    for prefix in ("/v1", ""):
        out += [
            Route(f"{prefix}/chat/completions", inference.chat_completions, methods=["POST"]),
            Route(f"{prefix}/completions", inference.completions, methods=["POST"]),
            Route(f"{prefix}/models", models.list_models, methods=["GET"]),
            Route(f"{prefix}/models", models.load_model, methods=["POST"]),
            Route(f"{prefix}/models/{{model_id:str}}", models.retrieve_model, methods=["GET"]),
            Route(f"{prefix}/models/{{model_id:str}}", models.unload_model, methods=["DELETE"]),
            Route(f"{prefix}/models/{{model_id:str}}/reload", models.reload_model, methods=["POST"]),
            Route(f"{prefix}/tokenize", utility.tokenize, methods=["POST"]),
            Route(f"{prefix}/detokenize", utility.detokenize, methods=["POST"]),
            Route(f"{prefix}/apply-template", utility.apply_template, methods=["POST"]),
            Route(f"{prefix}/messages", messages.messages, methods=["POST"]),
            Route(f"{prefix}/responses", responses_api.create_response, methods=["POST"]),
            Route(f"{prefix}/embeddings", embeddings.embeddings, methods=["POST"]),
            Route(f"{prefix}/messages/count_tokens", messages.count_tokens, methods=["POST"]),
        ]
    return out
