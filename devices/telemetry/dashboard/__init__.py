"""The fleet dashboard: a read-only ASGI app over the collector database (``edgeadapt
dashboard``). Starlette and uvicorn come with the ``dashboard`` extra; the chart library
(uPlot, MIT) is vendored under ``static/vendor`` and served locally (no CDN)."""
