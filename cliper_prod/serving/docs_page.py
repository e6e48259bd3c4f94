"""``GET /docs``: the OpenAPI schema as one self-contained HTML page, made on the server.

FastAPI's own ``/docs`` loads Swagger UI's scripts and styles from a CDN, so on a host without
internet access it is a blank page; no Python package here ships those assets. This page needs
nothing but itself (no script, no external link): each endpoint with its description and the
schemas of its body and answer, then every schema as JSON. ``/openapi.json`` stays the
machine-readable source.
"""

from __future__ import annotations

import json
from html import escape

STYLE = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
         "pre{background:#f4f4f4;padding:.6em;overflow-x:auto}"
         "code.method{font-weight:bold;margin-right:.5em}h3{margin-bottom:.2em}")


def _ref_name(schema: dict | None) -> str | None:
    """The component a ``$ref`` (or an array of them) names."""
    if not schema:
        return None
    ref = schema.get("$ref") or schema.get("items", {}).get("$ref")
    return ref.rsplit("/", 1)[-1] if ref else None


def _link(name: str | None) -> str:
    return f'<a href="#schema-{escape(name)}">{escape(name)}</a>' if name else "-"


def docs_html(openapi: dict) -> str:
    """The page for an OpenAPI document (as ``FastAPI.openapi()`` returns it)."""
    info = openapi.get("info", {})
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>"
             f"{escape(info.get('title', 'API'))} docs</title><style>{STYLE}</style></head>"
             f"<body><h1>{escape(info.get('title', 'API'))} {escape(info.get('version', ''))}"
             f"</h1><p>{escape(info.get('description', ''))}</p><p>Machine-readable: "
             f"<a href='/openapi.json'>/openapi.json</a></p><h2>Endpoints</h2>"]
    for path, methods in openapi.get("paths", {}).items():
        for method, op in methods.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            answer = op.get("responses", {}).get("200", {}).get("content", {}).get(
                "application/json", {})
            parts.append(f"<h3><code class='method'>{escape(method.upper())}</code>"
                         f"<code>{escape(path)}</code></h3><p>"
                         f"{escape(op.get('description') or op.get('summary', ''))}</p>"
                         f"<p>body: {_link(_ref_name(body.get('schema')))}; answer: "
                         f"{_link(_ref_name(answer.get('schema')))}</p>")
    parts.append("<h2>Schemas</h2>")
    for name, schema in openapi.get("components", {}).get("schemas", {}).items():
        parts.append(f"<h3 id='schema-{escape(name)}'>{escape(name)}</h3>"
                     f"<pre>{escape(json.dumps(schema, indent=2))}</pre>")
    parts.append("</body></html>")
    return "".join(parts)
