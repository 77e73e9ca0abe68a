"""One self-contained HTML file from a rendered notebook (the grid's stage notebooks and the report).

Charts in the notebooks are PNG images (base64 inside the file), so they show with no network.
nbconvert's lab template still links require.js and MathJax from a CDN; the charts do not use them
(offline, a page only loses LaTeX rendering and widget views, which the report replaces with static
tables).
"""
from __future__ import annotations

from pathlib import Path

from .io import write_text_atomic


def export_html(ipynb_path: str | Path, html_path: str | Path, hide_code: bool = False) -> Path:
    """Export a rendered notebook to one self-contained HTML file (images embedded, opens without a server).

    ``hide_code``: the shared report shows the narrative, tables and figures without the code cells and
    their prompts (it reads like a short paper); the rendered ``.ipynb`` beside it keeps the code. The
    stage notebooks keep their code."""
    import nbformat  # heavy (~1 s with its JSON-schema checks): only when a notebook is exported
    from nbconvert import HTMLExporter  # heavy: only when a notebook is exported

    ipynb_path, html_path = Path(ipynb_path), Path(html_path)
    nb = nbformat.read(ipynb_path, as_version=4)
    exporter = HTMLExporter(template_name="lab", embed_images=True, exclude_input=hide_code,
                            exclude_input_prompt=hide_code, exclude_output_prompt=hide_code)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"path": str(ipynb_path.parent)}})
    return write_text_atomic(html_path, body)
